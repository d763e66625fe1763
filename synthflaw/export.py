"""Export a finished run's small outputs for committing (``runs/reference/``): `synthflaw export`.

What is kept is what the figures, tables and findings are made from, plus a readable record of the run:
``study.json``, and per step ``config.json``, ``meta.json``, ``result.json``, ``done.json``, the metrics JSON and
every CSV, PNG and Markdown file (PNGs of a multi-seed run: the first seed's and the cross-seed ones); the executed
notebooks as HTML (``notebooks/<stage>.html``, of the first seed of a multi-seed run). Left out: weights and
checkpoints (never committed), the generated data sets and per-item samples (megabytes per seed, regenerated exactly
by re-running with the same seed) and the ``.ipynb`` copies (the HTML is their readable form). ``08_figures`` and the cross-seed tables regenerate from the export alone:
``synthflaw figures --run-id reference`` (tested against the committed tables).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from synthflaw.reporting.aggregate import seed_runs

KEEP_SUFFIXES = (".json", ".csv", ".png", ".md")
SKIP_DIRS = {"model", "checkpoints", "data", "generation", "harness"}
SKIP_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "trainer_state.json"}


def _kept(path: Path, root: Path, first_seed: str | None) -> bool:
    rel = path.relative_to(root)
    if any(part in SKIP_DIRS or part.startswith("checkpoint-") for part in rel.parts[:-1]):
        return False
    if path.suffix == ".png" and first_seed and rel.parts[0].startswith("seed-") and rel.parts[0] != first_seed:
        return False  # other seeds' figures: regenerated from their CSVs by `synthflaw figures`
    return path.suffix in KEEP_SUFFIXES and path.name not in SKIP_NAMES


def export_run(run_dir: str | Path, out_dir: str | Path, *, html: bool = True) -> list[Path]:
    """Copy the kept files of `run_dir` into `out_dir` (which must not exist) and export notebooks as HTML.

    Returns the written files. Writes into a temporary sibling and renames it at the end, so an interrupted export
    leaves no half-written reference.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "study.json").exists() and not any(run_dir.glob("seed-*/study.json")):
        raise ValueError(f"{run_dir} is not a finished run (no study.json, no seed-*/study.json)")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it first (git keeps the committed version) or pick another")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    written = []
    # the first finished seed in numeric order (seed-2 before seed-10), as the cross-seed summary orders them
    seed_dirs = [] if (run_dir / "study.json").exists() else seed_runs(run_dir)
    first_seed = seed_dirs[0].name if seed_dirs else None
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and _kept(p, run_dir, first_seed)):
        target = tmp / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        written.append(out_dir / path.relative_to(run_dir))
    if html:
        source = seed_dirs[0] if seed_dirs else run_dir
        notebooks = sorted(source.glob("*/notebook.ipynb"))
        if notebooks:
            staged = tmp / "notebooks"
            staged.mkdir(parents=True, exist_ok=True)
            for notebook in notebooks:  # named by stage, so that one nbconvert call converts them all
                shutil.copy2(notebook, staged / f"{notebook.parent.name}.ipynb")
            inputs = sorted(staged.glob("*.ipynb"))
            # the `basic` template: the cells and their outputs without the 280 kB of JupyterLab CSS per file
            subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--template", "basic",
                            *map(str, inputs)], check=True, capture_output=True)
            for staged_notebook in inputs:
                staged_notebook.unlink()
                written.append(out_dir / "notebooks" / f"{staged_notebook.stem}.html")
    tmp.rename(out_dir)
    return written
