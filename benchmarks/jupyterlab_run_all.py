"""Step through notebooks 01-08 in a real JupyterLab, driven in headless Chromium: Run All on each, in order.

What tests/test_notebooks.py checks through nbclient, seen as a researcher sees it: for each notebook, the number
of stderr blocks JupyterLab renders (red) and of progress-bar widgets it draws, a screenshot taken while the stage
runs and one of the whole notebook at the end.

Needs what the package does not: a Chromium (`apt-get install chromium`) and Playwright's Python client
(`pip install playwright`, in any environment; it drives the system Chromium, no browser download). Run from the
repository root:

    python benchmarks/jupyterlab_run_all.py --out /tmp/lab-check     # JSON summary on stdout, PNGs in --out

It copies notebooks/ into a scratch folder (so the notebooks' default run_dir, ../runs/notebook, lands there),
starts `.venv/bin/jupyter lab` on it with the repository first on PYTHONPATH, and leaves the default parameters
(smoke preset). JupyterLab's default kernel is the Python it runs in, the .venv's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
WIDGET_BAR = ".jp-OutputArea-output .widget-hprogress"


def wait_for_server(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"JupyterLab did not answer at {url}")


def run_all(page, base: str, notebook: str, out: Path, timeout: float) -> dict:
    """Open `notebook`, Run All, wait until every code cell has run; count stderr blocks and widget bars."""
    page.goto(f"{base}/lab/tree/{notebook}?reset")  # reset: the workspace without the notebooks opened before
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    select = page.locator(".jp-Dialog button:has-text('Select')")  # JupyterLab asks for the kernel: its default
    try:
        select.click(timeout=15_000)
    except PlaywrightTimeout:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    started = time.time()
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    widget_seen_running = False
    mid_shot = None
    while time.time() - started < timeout:
        time.sleep(2)
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)")
        bars = page.locator(WIDGET_BAR).count()
        if bars and mid_shot is None:  # the stage while it runs: its bar live
            mid_shot = out / f"{Path(notebook).stem}-running.png"
            page.screenshot(path=str(mid_shot))
            widget_seen_running = True
        if prompts and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts):
            break
    else:
        page.screenshot(path=str(out / f"{Path(notebook).stem}-timeout.png"), full_page=True)
        raise TimeoutError(f"{notebook}: not finished after {timeout} s; cell prompts {prompts}")
    wall = time.time() - started
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
    stderr = page.eval_on_selector_all(STDERR, "els => els.map(e => e.textContent.slice(0, 300))")
    result = {"notebook": notebook, "wall_s": round(wall, 1), "errors": errors, "stderr_blocks": stderr,
              "widget_bars": page.locator(WIDGET_BAR).count(), "widget_seen_running": widget_seen_running,
              "images": page.locator(".jp-OutputArea-output img").count()}
    page.screenshot(path=str(out / f"{Path(notebook).stem}-end.png"), full_page=True)
    page.click(".lm-MenuBar-itemLabel:text-is('Kernel')")
    page.click(".lm-Menu-itemLabel:text-is('Shut Down Kernel')")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--jupyter", default=str(REPO / ".venv" / "bin" / "jupyter"), help="the .venv's jupyter")
    parser.add_argument("--port", type=int, default=8899)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one notebook may take")
    parser.add_argument("--notebooks", nargs="*", default=[f"{n:02d}" for n in range(1, 9)])
    parser.add_argument("--scratch", type=Path, help="a folder to keep (its runs/notebook: the run the notebooks "
                        "write, or one made before, e.g. by `synthflaw run --runs-root DIR/runs --run-id notebook`)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lab-check-"))
    shutil.copytree(REPO / "notebooks", scratch / "notebooks", dirs_exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    token = "lab-check"
    server = subprocess.Popen(
        [args.jupyter, "lab", "--no-browser", f"--port={args.port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={scratch / 'notebooks'}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    results = []
    try:
        wait_for_server(f"{base}/api/status?token={token}")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1400, "height": 2400})  # tall: a stage's end in view
            context.new_page().goto(f"{base}/lab?token={token}")  # the token's cookie
            names = sorted(p.name for p in (scratch / "notebooks").glob("*.ipynb"))
            for prefix in args.notebooks:
                notebook = next(n for n in names if n.startswith(prefix))
                page = context.new_page()
                results.append(run_all(page, base, notebook, args.out, args.timeout))
                page.close()
                print(json.dumps(results[-1]), file=sys.stderr)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
