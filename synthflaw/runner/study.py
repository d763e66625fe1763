"""Running a study into a run folder: its configuration resolved and checked once (:class:`Study`), the run planned
(:func:`synthflaw.runner.plan.plan_run`), then its steps stage by stage, by either engine; several seeds of one study
(:func:`run_seeds`); and the figures of a finished run made again (:func:`regenerate`)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from synthflaw import config as config_mod
from synthflaw import stages
from synthflaw.config import StudyConfig
from synthflaw.registry import FIGURES, STAGES, Stage, StepSpec, selected_steps
from synthflaw.runner.notebooks import NOTEBOOKS_DIR, DoneWatcher, StepFailed, execute_notebook, notebook_kernel
from synthflaw.runs.provenance import code_state
from synthflaw.runner.plan import Plan, plan_run, upstream_candidates
from synthflaw.runs import (
    STUDY_FIX,
    folder_kind,
    read_seed_record,
    record_seeds,
    require_every_seed,
    seeds_status,
    Step,
    decide,
    read_run_json,
    refuse_other_kind,
    run_folder,
    run_lock,
    write_json_atomic,
)

ENGINES = ("papermill", "inprocess")


@dataclass(frozen=True)
class Study:
    """A study's configuration, resolved from its preset and overrides and checked by every stage, once
    (:func:`resolve_study`): what a run, each seed of a multi-seed run and each point of a sweep is given. The preset
    and overrides travel with it: study.json records them, and the notebooks resolve them again in their kernel."""

    preset: str
    overrides: dict
    cfg: StudyConfig

    def steps(self, only=None) -> list[StepSpec]:
        """The steps of the stages `only` (by number or name; all without); ValueError when none matches."""
        specs = selected_steps(self.cfg, only)
        if not specs:
            raise ValueError(f"no step matches stages={only}; stages: {', '.join(s.name for s in STAGES)}")
        return specs


def resolve_study(preset: str, overrides: dict | None = None) -> Study:
    """The study `preset` with `overrides`, every check made and nothing written: ConfigError for bad overrides or a
    configuration a stage refuses. Commands call it for everything they will run before they lock or write."""
    overrides = dict(overrides or {})
    cfg = config_mod.resolve(preset, overrides)
    stages.check(cfg)
    return Study(preset, overrides, cfg)


def run_study(study: Study | str, run_id: str, overrides: dict | None = None, *, overwrite: bool = False,
              runs_root: str | Path = "runs", engine: str = "papermill", only: list[str] | None = None,
              log=print, redo=(), check_upstream_config: bool = True) -> Path:
    """Run the study (or only the listed stages, by number or name) into ``<runs_root>/<run_id>``; returns the run
    folder. `study`: a :class:`Study` (resolved once by the caller), or a preset name resolved here with `overrides`.

    Everything is validated before anything is written: a bad run id or bad overrides raise ValueError /
    ConfigError; another process on the run raises RunLocked; a changed or stale step raises StepConfigChanged /
    StepStale (unless `overwrite`), see :func:`plan_run`. `redo` and `check_upstream_config` are for
    :func:`regenerate`.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be papermill or inprocess, got {engine!r}")
    if isinstance(study, Study) and overrides:
        raise ValueError("a resolved Study carries its overrides: pass either a Study or a preset with overrides")
    run_dir = run_folder(runs_root, run_id)
    study = study if isinstance(study, Study) else resolve_study(study, overrides)
    specs = study.steps(only)
    refuse_other_kind(run_dir, "run")
    code_state()  # the code this process runs, taken before its first step: a commit made meanwhile changes nothing
    with run_lock(run_dir):
        plan = plan_run(run_dir, study.cfg, specs, overwrite=overwrite, redo=redo,
                        check_upstream_config=check_upstream_config, log=log)
        write_json_atomic(run_dir / "study.json", {"preset": study.preset, "overrides": study.overrides,
                                                   "config": study.cfg.to_dict()})
        _execute(run_dir, study, specs, plan, engine, overwrite, log)
    return run_dir


def _execute(run_dir: Path, study: Study, specs: list[StepSpec], plan: Plan, engine: str, overwrite: bool,
             log) -> None:
    """Run the planned steps stage by stage; a finished step whose upstream ran again meanwhile runs again."""
    started = time.time()
    position = {spec.name: i for i, spec in enumerate(specs, 1)}
    ran: set[str] = set()

    def prefix(spec: StepSpec, label: str) -> str:
        return f"[{position[spec.name]:2d}/{len(specs)}] {label:40s}"

    def finished(spec: StepSpec, seconds: float) -> str:
        return f"{prefix(spec, spec.name)} done in {seconds:6.1f} s"

    with contextlib.ExitStack() as stack:
        km = None
        for stage in dict.fromkeys(spec.stage for spec in specs):  # stages in order
            todo = [(spec, _prepare(run_dir, study.cfg, spec, plan, ran, overwrite, prefix, log)) for spec in specs
                    if spec.stage == stage]
            todo = [(spec, step) for spec, step in todo if step is not None]
            if not todo:
                continue
            t0 = time.time()
            if engine == "papermill":
                if km is None:  # started when the first notebook runs: a run with every step done starts none
                    km = stack.enter_context(notebook_kernel(NOTEBOOKS_DIR.parent))
                with DoneWatcher(todo if stage.variants else [], finished, log):
                    _run_papermill(stage, [spec.variant for spec, _ in todo if spec.variant], run_dir, study, km)
                unfinished = [spec.name for spec, step in todo if not step.done]
                if unfinished:
                    raise StepFailed(f"the notebook of {stage.name} ended without finishing {', '.join(unfinished)}; "
                                     f"see {run_dir / stage.name / 'notebook.ipynb'}")
                names = ", ".join(spec.variant or spec.stage.name for spec, _ in todo)
                log(f"{prefix(todo[-1][0], f'{stage.name} ({names})')} done in {time.time() - t0:6.1f} s")
            else:
                for spec, step in todo:
                    t0 = time.time()
                    _run_inprocess(spec, step.open(study.cfg))
                    step.complete()
                    log(finished(spec, time.time() - t0))
            for spec, step in todo:
                ran.add(spec.name)
                for warning in step.result().get("warnings", []):
                    log(f"{spec.name}: {warning}")
    log(f"run {run_dir} finished in {time.time() - started:.1f} s")


def _prepare(run_dir: Path, cfg, spec: StepSpec, plan: Plan, ran: set[str], overwrite: bool, prefix,
             log) -> Step | None:
    """The step to run for `spec` at its turn (its folder reset where it must start over), or None to skip it: the
    lifecycle's decision (:func:`synthflaw.runs.decide`), said in the run's log."""
    step = Step(run_dir, spec.stage, spec.variant)
    decision = decide(step, cfg, overwrite=overwrite, reset=spec.name in plan.reset, ran=ran,
                      restart_after=[s.name for s in upstream_candidates(cfg, spec)])
    if decision.action == "skip":
        log(f"{prefix(spec, spec.name)} skipped (done, same config)")
        return None
    if decision.action == "reset" and spec.name not in plan.reset:
        verb = "runs again" if step.done else "starts over"
        log(f"{prefix(spec, spec.name)} {verb}: {decision.reason}")
    return decision.enact(step)


def _run_papermill(stage: Stage, variants: list[str], run_dir: Path, study: Study, km) -> None:
    """Execute the stage's notebook once for `variants` (empty for a stage without variants) in the kernel `km`."""
    out = Path(run_dir) / stage.name / "notebook.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)  # the notebook opens the steps, after papermill writes here
    if variants and out.exists():  # an earlier execution ran other variants: keep its record
        out.rename(out.with_name(f"notebook-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(out.stat().st_mtime))}.ipynb"))
    # papermill writes the parameters as Python source and has no translator for tuples (it writes their str()):
    # list-valued settings such as unlearn.methods go in as JSON lists, which config.coerce turns back into tuples
    params = {"run_dir": str(Path(run_dir).resolve()), "preset": study.preset,
              "overrides": json.loads(json.dumps(study.overrides))}
    if variants:
        params["variants"] = list(variants)
    name = f"{stage.name}/{{{','.join(variants)}}}" if variants else stage.name
    execute_notebook(NOTEBOOKS_DIR / stage.notebook, out, params, km, f"step {name}")


def _run_inprocess(spec: StepSpec, step: Step) -> None:
    module = stages.stage_module(spec.stage)
    try:
        step.run(module.run)
    except Exception as err:  # noqa: BLE001 - re-raised with the step named
        raise StepFailed(f"step {spec.name} failed ({type(err).__name__}: {err}); its folder is {step.path}") from err


def run_seeds(run_dir: str | Path, seeds, run_seed, *, every_seed: bool = False,
              record: dict | None = None, batch=None) -> dict | None:
    """``run_seed(seed)`` for each seed in order, the folder `run_dir` held meanwhile (its ``seed-<k>/`` folders and
    the summary across them: one process at a time); then the intervals across the seeds into ``<run_dir>/seeds/``
    (:func:`summarize_seeds`), or None while some seed has not evaluated. `record`: what describes a new multi-seed
    study (preset, overrides, registered): its seeds.json is written before the first seed runs, or checked against
    `seeds` where it exists (:func:`synthflaw.runs.record_seeds`). Serves ``synthflaw run --seeds``,
    :func:`regenerate` of a multi-seed run and each point of a sweep (`every_seed`: only once every seed has
    evaluated, counted against the sweep's seeds). `batch`: run only these of `seeds` (a study longer than one job;
    recorded with the record)."""
    with run_lock(run_dir):
        if record is not None:
            record_seeds(run_dir, seeds, batch, **record)
        for seed in (seeds if batch is None else [s for s in seeds if s in batch]):
            run_seed(seed)
        return summarize_seeds(run_dir, len(seeds) if every_seed else None)


def status_text(run_dir: str | Path) -> str:
    """What a multi-seed run holds, in words: "k of K seeds have evaluated", which are missing or unfinished, and
    whether its findings across seeds exist (they are made only once every listed seed has evaluated: no interim
    verdict)."""
    from synthflaw.reporting.aggregate import evaluated_seeds

    run_dir = Path(run_dir)
    status = seeds_status(run_dir, evaluated_seeds(run_dir))
    listed = status["listed"] or status["finished"]
    done = [s for s in listed if s in status["finished"]]
    lines = [f"{run_dir}: {len(done)} of {len(listed)} seeds have evaluated ({' '.join(done) or 'none'})"]
    unfinished = [s for s in status["missing"] if (run_dir / f"seed-{s}").is_dir()]
    absent = [s for s in status["missing"] if s not in unfinished]
    if unfinished:
        lines.append(f"  started, not evaluated: {' '.join(unfinished)}")
    if absent:
        here = [s for s in absent if s in (status["here"] or [])]
        elsewhere = [s for s in absent if s not in here]
        if here:
            lines.append(f"  not started here: {' '.join(here)}")
        if elsewhere:
            lines.append(f"  other batches (run elsewhere, added with synthflaw export --add): {' '.join(elsewhere)}")
    if status["extra"]:
        lines.append(f"  not among the study's seeds: {' '.join(status['extra'])}")
    if status["missing"] or status["extra"]:
        lines.append("  no findings across seeds until every listed seed has evaluated")
    else:
        made = (run_dir / "seeds" / "findings.md").exists()
        lines.append(f"  complete: findings across seeds in {run_dir / 'seeds' / 'findings.md'}" if made else
                     f"  complete: synthflaw figures --run-id {run_dir.name} makes the findings across seeds")
    return "\n".join(lines)


def summarize_seeds(run_dir: str | Path, seeds: int | None = None) -> dict | None:
    """The tables, intervals and findings across the evaluated seeds of ``run_dir/seed-<k>/``
    (:func:`synthflaw.reporting.aggregate.summarize`: ValueError when none has evaluated, or when a seed its
    seeds.json lists is missing); None and nothing written while a listed seed (or, with `seeds`, fewer than that
    many) has not evaluated."""
    from synthflaw.reporting import aggregate

    if not Path(run_dir).is_dir():
        return None if seeds is not None else aggregate.summarize(run_dir)
    finished = aggregate.seed_runs(run_dir)
    if seeds is not None and len(finished) != seeds:
        return None
    if read_seed_record(run_dir) is not None and \
            seeds_status(run_dir, [aggregate.seed_label(p) for p in finished])["missing"]:
        return None
    return aggregate.summarize(run_dir)


def regenerate(run_id: str, runs_root: str | Path = "runs", engine: str = "papermill", log=print) -> Path:
    """Re-make stage 08 of a finished run from its files (no training): `synthflaw figures --run-id ID`.

    On a multi-seed run (``runs/ID/seed-<k>/``) it re-makes every seed's figures and the cross-seed tables, intervals
    and findings in ``runs/ID/seeds/``. The upstream steps are taken with the configuration they ran with (the
    preset's defaults may have changed since), but they must be current: a stale one is refused, naming it.
    """
    run_dir = run_folder(runs_root, run_id)
    study = run_dir / "study.json"
    seed_dirs = sorted(p for p in run_dir.glob("seed-*") if (p / "study.json").exists())
    if folder_kind(run_dir) == "seeds":  # a multi-seed run: each seed's figures, then the intervals across seeds
        from synthflaw.reporting.aggregate import evaluated_seeds

        refuse_other_kind(run_dir, "seeds")  # a single run's study.json written on top of it
        require_every_seed(run_dir, evaluated_seeds(run_dir))  # before any figure is redrawn
        run_seeds(run_dir, [p.name.removeprefix("seed-") for p in seed_dirs],
                  lambda seed: regenerate(f"seed-{seed}", runs_root=run_dir, engine=engine, log=log))
        return run_dir
    if not study.exists():
        raise ValueError(f"{run_dir} is not a run folder (no study.json); runs: "
                         f"{', '.join(sorted(p.name for p in Path(runs_root).glob('*'))) or 'none'}")
    saved = read_run_json(study, ("preset", "overrides"), STUDY_FIX)
    overrides = {**config_mod.absent_overrides(saved.get("config") or {}), **saved["overrides"]}
    return run_study(saved["preset"], run_id, overrides, runs_root=runs_root, engine=engine,
                     only=[FIGURES.name], redo=[FIGURES.name], check_upstream_config=False, log=log)
