"""The study's steps, in order, and the runner that executes them.

A step is a stage plus a variant (a CPT branch, an unlearning method, a model to fine-tune or evaluate); each step
has its own folder. With ``engine="papermill"`` (the batch path) the runner executes each stage's notebook once,
for all of the stage's unfinished variants, into ``<run>/<stage>/notebook.ipynb``: a notebook execution costs ~10 s
of kernel start and imports (torch + transformers) on 2 cores, so one execution per stage instead of one per step
takes a seed of the default study from 31 executions to 8. ``engine="inprocess"`` calls the same library functions
without notebooks. Each step is marked done as it finishes. The order and the fan-out live here and nowhere else.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path

from synthflaw import config as config_mod
from synthflaw.runs import Step, StepConfigChanged, write_json_atomic

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"

# stage -> the library module whose `run(cfg, step)` the stage's notebook calls.
STAGE_MODULES = {
    "01_generate_data": "synthflaw.generate",
    "02_data_flaws": "synthflaw.flaws",
    "03_base_model": "synthflaw.base_model",
    "04_continued_pretraining": "synthflaw.pretraining",
    "05_unlearning": "synthflaw.unlearning.stage",
    "06_sft": "synthflaw.sft",
    "07_evaluate": "synthflaw.evaluate",
    "08_figures": "synthflaw.figures",
}


@dataclass(frozen=True)
class StepSpec:
    stage: str
    variant: str | None = None

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.variant}" if self.variant else self.stage


def models_of(cfg: config_mod.StudyConfig) -> list[str]:
    """Every model that is fine-tuned and evaluated: the CPT branches, then one per unlearning method."""
    return list(cfg.cpt.branches) + [f"unlearn-{m}" for m in cfg.unlearn.methods]


def study_steps(cfg: config_mod.StudyConfig) -> list[StepSpec]:
    """The whole study, in execution order."""
    steps = [StepSpec("01_generate_data"), StepSpec("02_data_flaws"), StepSpec("03_base_model")]
    steps += [StepSpec("04_continued_pretraining", b) for b in cfg.cpt.branches]
    steps += [StepSpec("05_unlearning", m) for m in cfg.unlearn.methods]
    steps += [StepSpec("06_sft", m) for m in models_of(cfg)]
    steps += [StepSpec("07_evaluate", m) for m in models_of(cfg)]
    steps.append(StepSpec("08_figures"))
    return steps


def stage_variants(cfg: config_mod.StudyConfig, stage: str, variants=None) -> list[str]:
    """The variants `cfg` runs for a stage, in study order; `variants` (a subset, e.g. a notebook parameter) or all."""
    known = [s.variant for s in study_steps(cfg) if s.stage == stage and s.variant]
    if not variants:
        return known
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"{stage}: {', '.join(map(repr, unknown))} not among this configuration's variants "
                         f"({', '.join(known) or 'none'}); leave `variants` empty to run them all")
    return [v for v in known if v in variants]


class StepFailed(RuntimeError):
    """A step raised; the message says which cell and where the executed notebook is."""


def _run_papermill(stage: str, variants: list[str], run_dir: Path, preset: str, overrides: dict) -> None:
    """Execute the stage's notebook once for `variants` (empty for a stage without variants)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    notebook = NOTEBOOKS_DIR / f"{stage}.ipynb"
    out = Path(run_dir) / stage / "notebook.ipynb"
    if variants and out.exists():  # an earlier execution ran other variants: keep its record
        out.rename(out.with_name(f"notebook-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(out.stat().st_mtime))}.ipynb"))
    params = {"run_dir": str(Path(run_dir).resolve()), "preset": preset, "overrides": overrides}
    if variants:
        params["variants"] = list(variants)
    name = f"{stage}/{{{','.join(variants)}}}" if variants else stage
    try:
        pm.execute_notebook(str(notebook), str(out), parameters=params, progress_bar=False,
                            cwd=str(NOTEBOOKS_DIR.parent), kernel_name="python3")
    except PapermillExecutionError as err:
        raise StepFailed(f"step {name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                         f"the executed notebook is {out}") from err


def _run_inprocess(spec: StepSpec, step: Step) -> None:
    module = importlib.import_module(STAGE_MODULES[spec.stage])
    try:
        step.run(module.run)
    except Exception as err:  # noqa: BLE001 - re-raised with the step named
        raise StepFailed(f"step {spec.name} failed ({type(err).__name__}: {err}); its folder is {step.path}") from err


def run_study(preset: str, run_id: str, overrides: dict | None = None, *, overwrite: bool = False,
              runs_root: str | Path = "runs", engine: str = "papermill", stages: list[str] | None = None,
              log=print) -> Path:
    """Run the study (or the listed `stages`) into ``<runs_root>/<run_id>``; returns the run folder.

    Everything is validated before anything is written: bad overrides raise ConfigError, and a step that already ran
    with another configuration raises StepConfigChanged (unless `overwrite`).
    """
    if engine not in ("papermill", "inprocess"):
        raise ValueError(f"engine must be papermill or inprocess, got {engine!r}")
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(f"run id {run_id!r} must be a plain folder name such as 'study-2026-11-21'")
    overrides = dict(overrides or {})
    cfg = config_mod.resolve(preset, overrides)
    run_dir = Path(runs_root) / run_id
    specs = [s for s in study_steps(cfg) if stages is None or s.stage in stages or s.stage[:2] in stages]
    if not specs:
        raise ValueError(f"no step matches stages={stages}; stages: {', '.join(STAGE_MODULES)}")
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

    for stage in dict.fromkeys(spec.stage for spec in specs):  # stages in order
        todo = []
        for spec in (s for s in specs if s.stage == stage):
            step = Step(run_dir, spec.stage, spec.variant)
            if step.status(cfg) == "done":
                log(f"{prefix(spec, spec.name)} skipped (done, same config)")
                continue
            todo.append((spec, step.open(cfg, overwrite=overwrite)))
        if not todo:
            continue
        t0 = time.time()
        if engine == "papermill":
            _run_papermill(stage, [spec.variant for spec, _ in todo if spec.variant], run_dir, preset, overrides)
            for _, step in todo:
                step.complete()  # the notebook completed each step already; this only checks it can
            names = ", ".join(spec.variant or spec.stage for spec, _ in todo)
            log(f"{prefix(todo[-1][0], f'{stage} ({names})')} done in {time.time() - t0:6.1f} s")
            continue
        for spec, step in todo:
            t0 = time.time()
            _run_inprocess(spec, step)
            step.complete()
            log(f"{prefix(spec, spec.name)} done in {time.time() - t0:6.1f} s")
    log(f"run {run_dir} finished in {time.time() - started:.1f} s")
    return run_dir

