"""The study's steps, in order, and the runner that executes them.

A step is a stage plus a variant (a CPT branch, an unlearning method, a model to fine-tune or evaluate); each step
has its own folder. With ``engine="papermill"`` (the batch path) the runner executes each stage's notebook once,
for all of the stage's unfinished variants, into ``<run>/<stage>/notebook.ipynb``. Starting a kernel and importing
torch and transformers costs seconds per execution, so a run starts one kernel and executes every stage's notebook
in it, resetting the notebook namespace in between (the imported modules stay loaded; what a notebook defines does
not reach the next one). ``engine="inprocess"`` calls the same library functions without notebooks. Each step is
marked done as it finishes. The order and the fan-out are :mod:`synthflaw.registry`'s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from synthflaw import config as config_mod
from synthflaw import stages
from synthflaw.registry import FIGURES, STAGES, Stage, StepSpec, study_steps
from synthflaw.registry import stage as find
from synthflaw.runs import Step, StepConfigChanged, write_json_atomic

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class StepFailed(RuntimeError):
    """A step raised; the message says which cell and where the executed notebook is."""


@contextlib.contextmanager
def notebook_kernel(cwd: Path):
    """One Python kernel for a run's notebook executions, shut down at the end.

    IPC transport: the kernel listens on local socket files, not TCP ports (nothing else on the host can connect, and
    the kernel has nothing to warn about).
    """
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3", transport="ipc")
    km.start_kernel(cwd=str(cwd))
    try:
        yield km
    finally:
        km.shutdown_kernel(now=True)
        km.cleanup_resources()


def _reset_namespace(km) -> None:
    """Forget what the previous notebook defined (and restart the execution count); imports stay loaded."""
    client = km.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        client.execute_interactive("get_ipython().reset(new_session=True)", timeout=120, output_hook=lambda msg: None)
    finally:
        client.stop_channels()


def _run_papermill(stage: Stage, variants: list[str], run_dir: Path, preset: str, overrides: dict, km) -> None:
    """Execute the stage's notebook once for `variants` (empty for a stage without variants) in the kernel `km`."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    notebook = NOTEBOOKS_DIR / stage.notebook
    out = Path(run_dir) / stage.name / "notebook.ipynb"
    if variants and out.exists():  # an earlier execution ran other variants: keep its record
        out.rename(out.with_name(f"notebook-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(out.stat().st_mtime))}.ipynb"))
    params = {"run_dir": str(Path(run_dir).resolve()), "preset": preset, "overrides": overrides}
    if variants:
        params["variants"] = list(variants)
    name = f"{stage.name}/{{{','.join(variants)}}}" if variants else stage.name
    _reset_namespace(km)
    try:
        pm.execute_notebook(str(notebook), str(out), parameters=params, progress_bar=False,
                            cwd=str(NOTEBOOKS_DIR.parent), kernel_name="python3", km=km)
    except PapermillExecutionError as err:
        raise StepFailed(f"step {name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                         f"the executed notebook is {out}") from err


def _run_inprocess(spec: StepSpec, step: Step) -> None:
    module = stages.stage_module(spec.stage)
    try:
        step.run(module.run)
    except Exception as err:  # noqa: BLE001 - re-raised with the step named
        raise StepFailed(f"step {spec.name} failed ({type(err).__name__}: {err}); its folder is {step.path}") from err


def run_study(preset: str, run_id: str, overrides: dict | None = None, *, overwrite: bool = False,
              runs_root: str | Path = "runs", engine: str = "papermill", only: list[str] | None = None,
              log=print) -> Path:
    """Run the study (or only the listed stages, by number or name) into ``<runs_root>/<run_id>``; returns the run
    folder.

    Everything is validated before anything is written: bad overrides raise ConfigError, and a step that already ran
    with another configuration raises StepConfigChanged (unless `overwrite`).
    """
    if engine not in ("papermill", "inprocess"):
        raise ValueError(f"engine must be papermill or inprocess, got {engine!r}")
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(f"run id {run_id!r} must be a plain folder name such as 'study-2026-11-21'")
    overrides = dict(overrides or {})
    cfg = config_mod.resolve(preset, overrides)
    stages.check(cfg)
    run_dir = Path(runs_root) / run_id
    wanted = None if only is None else {find(s) for s in only}
    specs = [s for s in study_steps(cfg) if wanted is None or s.stage in wanted]
    if not specs:
        raise ValueError(f"no step matches stages={only}; stages: {', '.join(s.name for s in STAGES)}")
    changed = [s.name for s in specs if Step(run_dir, s.stage, s.variant).status(cfg) == "changed"]
    if changed and not overwrite:
        raise StepConfigChanged(f"these steps of {run_dir} ran with a different configuration: {', '.join(changed)}."
                                " Use another --run-id, or --overwrite to run them again")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "study.json", {"preset": preset, "overrides": overrides, "config": cfg.to_dict()})
    started = time.time()
    position = {spec.name: i for i, spec in enumerate(specs, 1)}

    def prefix(spec: StepSpec, label: str) -> str:
        return f"[{position[spec.name]:2d}/{len(specs)}] {label:40s}"

    with contextlib.ExitStack() as stack:
        km = None
        for stage in dict.fromkeys(spec.stage for spec in specs):  # stages in order
            todo = [(spec, Step(run_dir, spec.stage, spec.variant)) for spec in specs if spec.stage == stage]
            for spec, step in todo:
                if step.status(cfg) == "done":
                    log(f"{prefix(spec, spec.name)} skipped (done, same config)")
            todo = [(spec, step.open(cfg, overwrite=overwrite)) for spec, step in todo if step.status(cfg) != "done"]
            if not todo:
                continue
            t0 = time.time()
            if engine == "papermill":
                if km is None:  # started when the first notebook runs: a run with every step done starts none
                    km = stack.enter_context(notebook_kernel(NOTEBOOKS_DIR.parent))
                _run_papermill(stage, [spec.variant for spec, _ in todo if spec.variant], run_dir, preset, overrides,
                               km)
                for _, step in todo:
                    step.complete()  # the notebook completed each step already; this only checks it can
                names = ", ".join(spec.variant or spec.stage.name for spec, _ in todo)
                log(f"{prefix(todo[-1][0], f'{stage.name} ({names})')} done in {time.time() - t0:6.1f} s")
                continue
            for spec, step in todo:
                t0 = time.time()
                _run_inprocess(spec, step)
                step.complete()
                log(f"{prefix(spec, spec.name)} done in {time.time() - t0:6.1f} s")
    log(f"run {run_dir} finished in {time.time() - started:.1f} s")
    return run_dir


def regenerate(run_id: str, runs_root: str | Path = "runs", engine: str = "papermill") -> Path:
    """Re-make stage 08 of a finished run from its files (no training): `synthflaw figures --run-id ID`.

    On a multi-seed run (``runs/ID/seed-<k>/``) it re-makes every seed's figures and the cross-seed tables, intervals
    and findings in ``runs/ID/seeds/``."""
    from synthflaw.reporting.aggregate import summarize

    run_dir = Path(runs_root) / run_id
    study = run_dir / "study.json"
    seed_dirs = sorted(p for p in run_dir.glob("seed-*") if (p / "study.json").exists())
    if not study.exists() and seed_dirs:  # a multi-seed run: each seed's figures, then the intervals across seeds
        for seed_dir in seed_dirs:
            regenerate(seed_dir.name, runs_root=run_dir, engine=engine)
        summarize(run_dir)
        return run_dir
    if not study.exists():
        raise ValueError(f"{run_dir} is not a run folder (no study.json); runs: "
                         f"{', '.join(sorted(p.name for p in Path(runs_root).glob('*'))) or 'none'}")
    saved = json.loads(study.read_text())
    step = Step(run_dir, FIGURES)
    if step.path.exists():
        shutil.rmtree(step.path)
    return run_study(saved["preset"], run_id, saved["overrides"], runs_root=runs_root, engine=engine,
                     only=[FIGURES.name])
