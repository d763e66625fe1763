"""The package installs: a wheel built from the checkout, installed into a fresh virtual environment, runs stages 01
and 02 of the smoke study from a folder outside the checkout, its notebooks and accelerate configs taken from the
installed package.

To keep it cheap and offline, the fresh environment reuses this environment's installed dependencies (a path file
naming this environment's site-packages, whose own path files, the editable install among them, are not read) and
gets only the wheel, installed without its dependencies.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "synthflaw", "notebooks", "accelerate")


def run(command: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow  # building and installing the wheel, then stages 01-02 under papermill: ~30-60 s
def test_a_wheel_installed_elsewhere_runs_the_first_stages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # nothing from the checkout
    env["HF_HUB_OFFLINE"] = "1"
    # the sources copied (links kept: synthflaw/_shipped's), so the build writes nothing into the checkout
    source = tmp_path / "source"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet", "-w",
         str(tmp_path / "dist"), str(source)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("synthflaw-*.whl"))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    env).strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import synthflaw.runner as r; print(r.__file__); print(r.NOTEBOOKS_DIR)"],
                elsewhere, env).split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the installed package and its notebooks
    run([str(venv / "bin" / "synthflaw"), "run", "--preset", "smoke", "--stages", "01", "02", "--run-id", "w",
         "--runs-root", "runs"], elsewhere, env)
    run_dir = elsewhere / "runs" / "w"
    for stage in ("01_generate_data", "02_data_flaws"):
        assert (run_dir / stage / "done.json").is_file() and (run_dir / stage / "notebook.ipynb").is_file()
    assert not (run_dir / "03_base_model").exists()
