"""The study's steps, in order, and the runner that executes them.

A step is a stage plus a variant (a CPT branch, an unlearning method, a model to fine-tune or evaluate); each step
has its own folder. With ``engine="papermill"`` (the batch path) the runner executes each stage's notebook once,
for all of the stage's unfinished variants, into ``<run>/<stage>/notebook.ipynb``. Starting a kernel and importing
torch and transformers costs seconds per execution, so a run starts one kernel and executes every stage's notebook
in it, resetting the notebook namespace in between (the imported modules stay loaded; what a notebook defines does
not reach the next one). ``engine="inprocess"`` calls the same library functions without notebooks. Each step is
marked done as it finishes. The order and the fan-out are :mod:`synthflaw.registry`'s.

What a run may trust (:func:`plan_run`, before anything is written, with the run folder locked): a finished step
whose products or upstreams changed (stale), or whose configuration changed, is refused unless `overwrite`, which
runs it and everything downstream of it again; an upstream outside the stages asked for must be finished and
current, since nothing will redo it. While the run goes on, a finished step whose upstream ran again in it runs
again too (the data flow), and a half-done step whose upstream ran again starts over instead of resuming.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from synthflaw import config as config_mod
from synthflaw import stages
from synthflaw.progress import TEXT_BARS_ENV
from synthflaw.registry import FIGURES, STAGES, Stage, StepSpec, study_steps
from synthflaw.registry import stage as find
from synthflaw.runs import (
    STUDY_FIX,
    BrokenStepFile,
    Freshness,
    Step,
    StepConfigChanged,
    StepStale,
    config_difference,
    die_with_parent,
    held_lock_fds,
    note_kernel,
    read_run_json,
    refuse_other_kind,
    run_folder,
    run_lock,
    decide,
    step_named,
    write_json_atomic,
)

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class StepFailed(RuntimeError):
    """A step raised; the message says which cell and where the executed notebook is."""


@contextlib.contextmanager
def notebook_kernel(cwd: Path):
    """One Python kernel for a run's notebook executions, shut down at the end.

    The kernel writes into the run, so it must not outlive the runner that holds the run's lock: it inherits the
    lock of every run folder this process holds (the lock stays held while the kernel lives, so a retry is refused
    instead of writing beside it), and on Linux it is killed the moment the runner ends, however it ends
    (``kill -9`` included; elsewhere ipykernel's own check of its parent stops it within a second).

    IPC transport: the kernel listens on local socket files, not TCP ports (nothing else on the host can connect, and
    the kernel has nothing to warn about). Its progress bars are text (`synthflaw.progress`): no one watches a widget
    in a batch, and a text bar keeps its last line in the executed notebook and its HTML.
    """
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3", transport="ipc")
    km.start_kernel(cwd=str(cwd), env={**os.environ, TEXT_BARS_ENV: "1"}, pass_fds=held_lock_fds(),
                    preexec_fn=die_with_parent())
    note_kernel(getattr(km.provisioner, "pid", None))  # the local provisioner's; another may not say
    try:
        yield km
    finally:
        km.shutdown_kernel(now=True)
        km.cleanup_resources()
        note_kernel(None)


def _reset_namespace(km) -> None:
    """Forget what the previous notebook defined (and restart the execution count); imports stay loaded."""
    client = km.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        # tqdm.auto warns, naming its file in the virtual environment, when ipywidgets is missing: the warning went
        # into every notebook that imports it, and its absolute path into the exports
        client.execute_interactive("get_ipython().reset(new_session=True); __import__('warnings').filterwarnings("
                                   "'ignore', message='IProgress not found')", timeout=120,
                                   output_hook=lambda msg: None)
    finally:
        client.stop_channels()


def _run_papermill(stage: Stage, variants: list[str], run_dir: Path, preset: str, overrides: dict, km) -> None:
    """Execute the stage's notebook once for `variants` (empty for a stage without variants) in the kernel `km`."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    notebook = NOTEBOOKS_DIR / stage.notebook
    out = Path(run_dir) / stage.name / "notebook.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)  # the notebook opens the steps, after papermill writes here
    if variants and out.exists():  # an earlier execution ran other variants: keep its record
        out.rename(out.with_name(f"notebook-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(out.stat().st_mtime))}.ipynb"))
    # papermill writes the parameters as Python source and has no translator for tuples (it writes their str()):
    # list-valued settings such as unlearn.methods go in as JSON lists, which config.coerce turns back into tuples
    params = {"run_dir": str(Path(run_dir).resolve()), "preset": preset, "overrides": json.loads(json.dumps(overrides))}
    if variants:
        params["variants"] = list(variants)
    name = f"{stage.name}/{{{','.join(variants)}}}" if variants else stage.name
    _reset_namespace(km)
    try:
        # coalesce_streams: a cell's text bars are kept as their last lines, not as every redraw
        pm.execute_notebook(str(notebook), str(out), parameters=params, progress_bar=False,
                            cwd=str(NOTEBOOKS_DIR.parent), kernel_name="python3", km=km, coalesce_streams=True)
    except PapermillExecutionError as err:
        raise StepFailed(f"step {name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                         f"the executed notebook is {out}") from err


def _run_inprocess(spec: StepSpec, step: Step) -> None:
    module = stages.stage_module(spec.stage)
    try:
        step.run(module.run)
    except Exception as err:  # noqa: BLE001 - re-raised with the step named
        raise StepFailed(f"step {spec.name} failed ({type(err).__name__}: {err}); its folder is {step.path}") from err


class DoneWatcher:
    """Logs a line as each step of one notebook execution finishes (its done.json appears).

    The notebook's own lines go into the notebook, and one execution can last many minutes (a stage's SFTs), so
    without this the console says nothing until the whole stage is done. A background thread polls the markers;
    leaving the context stops it and logs what finished since its last look.
    """

    def __init__(self, todo: list[tuple[StepSpec, Step]], line, log, interval: float = 0.5):
        self._pending, self._line, self._log, self._interval = list(todo), line, log, interval
        self._last = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="synthflaw-progress", daemon=True)

    def __enter__(self) -> "DoneWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sweep()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self._sweep()

    def _sweep(self) -> None:
        for spec, step in list(self._pending):
            if step.done:
                now = time.time()
                self._log(self._line(spec, now - self._last))
                self._last = now
                self._pending.remove((spec, step))


def _upstream_candidates(cfg, spec: StepSpec) -> list[StepSpec]:
    """Steps `spec` may read, from the configuration alone (for a step with no record of its reads yet): the
    earlier steps of the study whose configuration sections are among its own. A step depends on its upstreams'
    sections, so a step it reads is always among these (some of these it does not read: the check errs safe)."""
    steps = study_steps(cfg)
    mine = set(spec.stage.sections_for(spec.variant))
    before = steps[:[s.name for s in steps].index(spec.name)] if spec in steps else []
    return [s for s in before if set(s.stage.sections_for(s.variant)) <= mine]


def _recorded_upstreams(run_dir: Path, name: str) -> list[str]:
    """Every step `name`'s marker says it read, and what those read, transitively."""
    seen, queue = [], [name]
    while queue:
        marker = step_named(run_dir, queue.pop()).marker()
        for upstream in (marker or {}).get("upstream", {}):
            if upstream not in seen:
                seen.append(upstream)
                queue.append(upstream)
    return seen


@dataclass
class Plan:
    """What a run does with the steps it was asked for: `reset` run from scratch at their turn (changed, stale
    with overwrite, asked to be redone); `will_run` every step that runs (those and the unfinished ones)."""

    reset: set[str] = field(default_factory=set)
    will_run: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Problem:
    """Why a run is refused, for one step: `kind` "stale" (`text`: the cause), "changed" (`text`: the settings
    that differ) or "broken" (`text`: the whole message); `outside`: the step is not among the stages the run runs.
    Problems that differ only by step are shown as one line."""

    step: str
    kind: str
    text: str
    outside: bool = False
    stage: str = ""


def plan_run(run_dir: Path, cfg, specs: list[StepSpec], *, overwrite: bool = False, redo=(),
             check_upstream_config: bool = True, log=print) -> Plan:
    """Decide, before anything is written, which of `specs` run; refuse (StepStale / StepConfigChanged, listing
    every problem with its fix) what the run cannot trust.

    Refused unless `overwrite`: a step of `specs` whose configuration changed, whose config.json is unreadable, or
    that is stale (:class:`synthflaw.runs.Freshness`). Refused always: an upstream outside `specs` that is stale,
    unreadable, reads a step this run runs again, or (with `check_upstream_config`) ran with another configuration
    than `cfg` gives it, as nothing in this run would redo it. Not refused: a step stale only because an upstream
    that runs in this run changes anyway (it runs again after it). `redo`: stages whose steps run again whatever
    their state (figures: 08).
    """
    fresh, plan = Freshness(run_dir), Plan()
    redo = {find(s) for s in redo}
    problems: list[Problem] = []
    healed: dict[str, list] = {}

    def open_causes(name: str) -> list:
        """The step's causes of staleness that this run does not heal: not those of an upstream that runs again
        in it (it is redone after it), nor those inherited from an upstream whose own causes are all healed.
        Upstreams come first in study order, so what is decided about them is final when a reader asks."""
        if name not in healed:
            healed[name] = [c for c in fresh.causes(name)
                            if c.kind != "new steps" and c.upstream not in plan.will_run
                            and not (c.kind == "upstream stale" and not open_causes(c.upstream))]
        return healed[name]

    inherited = 0  # steps stale only through a stale upstream: counted, their roots are listed
    for spec in specs:
        step = Step(run_dir, spec.stage, spec.variant)
        broken_marker = step.marker_problem()
        if broken_marker:
            log(f"{broken_marker}: {spec.name} counts as not finished and runs again")
        if spec.stage in redo and step.path.exists():
            plan.reset.add(spec.name)
        try:
            state = step.status(cfg)
        except BrokenStepFile as error:
            state, problem = "changed", Problem(spec.name, "broken", str(error))
        else:
            problem = Problem(spec.name, "changed", config_difference(step, cfg))
        if spec.name in plan.reset or state == "todo":
            plan.will_run.add(spec.name)
            continue
        causes = [] if state == "changed" else open_causes(spec.name)
        if state == "done" and not causes:
            continue  # current, or stale only through upstreams that run again first: it follows them
        if overwrite:
            plan.reset.add(spec.name)
            plan.will_run.add(spec.name)
        elif state == "changed":
            problems.append(problem)
        elif all(c.kind == "upstream stale" for c in causes):
            inherited += 1
        else:
            problems += [Problem(spec.name, "stale", c.text) for c in causes if c.kind != "upstream stale"]
    problems += _outside_problems(run_dir, cfg, specs, plan, fresh, check_upstream_config)
    if problems:
        raise _refusal(run_dir, problems, inherited, specs)
    return plan


def _outside_problems(run_dir: Path, cfg, specs: list[StepSpec], plan: Plan, fresh: Freshness,
                      check_upstream_config: bool) -> list[Problem]:
    """What is wrong with the upstreams of `specs` that this run will not run. Each must be finished and current,
    and stay so, or be absent (a missing upstream fails the step that needs it, naming it)."""
    selected = {spec.name for spec in specs}
    configured = {s.name for s in study_steps(cfg)}
    names = []
    for spec in specs:
        names += _recorded_upstreams(run_dir, spec.name)
        if spec.name in plan.will_run:
            names += [s.name for s in _upstream_candidates(cfg, spec)]
    problems = []
    for name in dict.fromkeys(n for n in names if n not in selected):
        step = step_named(run_dir, name)
        if not step.path.exists():
            continue

        def problem(kind: str, text: str) -> Problem:
            return Problem(name, kind, text, outside=True, stage=step.stage.number)

        try:
            state = step.status(cfg)  # an unreadable config.json is refused even where the configuration is not
        except BrokenStepFile as error:  # compared (figures): it is what `run` refuses
            problems.append(problem("broken", str(error)))
            continue
        if check_upstream_config and name in configured and state == "changed":
            problems.append(problem("changed", config_difference(step, cfg)))
            continue
        if step.marker_problem():
            problems.append(problem("broken", step.marker_problem()))
            continue
        problems += [problem("stale", c.text) for c in fresh.causes(name) if c.kind != "upstream stale"]
        again = [u for u in _recorded_upstreams(run_dir, name) if u in plan.will_run]
        if again:
            problems.append(problem("stale", f"it read {again[0]}, which this run runs again"))
    return problems


def _problem_lines(problems: list[Problem]) -> list[str]:
    """One line per distinct problem, naming every step it concerns."""
    groups: dict[tuple, list[str]] = {}
    for p in problems:
        groups.setdefault((p.kind, p.text, p.outside), []).append(p.step)
    lines = []
    for (kind, text, outside), steps in groups.items():
        names = ", ".join(steps)
        line = (f"{names} {'is' if len(steps) == 1 else 'are'} stale: {text}" if kind == "stale" else
                f"{names} ran with a different configuration ({text})" if kind == "changed" else text)
        lines.append(line + (" [outside the stages this run runs]" if outside else ""))
    return lines


def _refusal(run_dir: Path, problems: list[Problem], inherited: int, specs: list[StepSpec]) -> StepConfigChanged:
    """The error that refuses a run: every problem, then the fixes."""
    lines = [f"{run_dir}: refused; nothing was written or deleted:", *[f"  - {p}" for p in _problem_lines(problems)]]
    if inherited:
        lines.append(f"  ({inherited} more step(s) read these and are stale through them)")
    fixes = []
    if any(not p.outside for p in problems):
        fixes.append("--overwrite runs the listed steps again, and every step downstream of them")
    outside = {p.stage for p in problems if p.outside}
    if outside:
        # from the earliest of them on: the stages in between read what it redoes, so they run again too
        first, last = min(outside), max(spec.stage.number for spec in specs)
        numbers = [s.number for s in STAGES if first <= s.number <= last]
        fixes.append("a run does not redo steps outside its stages: run `synthflaw run` with the stages from "
                     f"{first} on (--stages {' '.join(numbers)}) and --overwrite")
    fixes.append("or use another --run-id")
    stale = any(p.kind == "stale" for p in problems)
    return (StepStale if stale else StepConfigChanged)("\n".join(lines + ["Fix: " + "; ".join(fixes) + "."]))


def study_specs(preset: str, overrides: dict, only=None) -> tuple:
    """(the configuration, the steps of the stages `only` asks for), every check made and nothing written:
    ConfigError for bad overrides or a configuration a stage refuses, ValueError for an unknown stage or stages
    with no step. Commands call it for everything they will run before they lock or write anything."""
    cfg = config_mod.resolve(preset, overrides)
    stages.check(cfg)
    wanted = None if only is None else {find(s) for s in only}
    specs = [s for s in study_steps(cfg) if wanted is None or s.stage in wanted]
    if not specs:
        raise ValueError(f"no step matches stages={only}; stages: {', '.join(s.name for s in STAGES)}")
    return cfg, specs


def run_study(preset: str, run_id: str, overrides: dict | None = None, *, overwrite: bool = False,
              runs_root: str | Path = "runs", engine: str = "papermill", only: list[str] | None = None,
              log=print, redo=(), check_upstream_config: bool = True) -> Path:
    """Run the study (or only the listed stages, by number or name) into ``<runs_root>/<run_id>``; returns the run
    folder.

    Everything is validated before anything is written: a bad run id or bad overrides raise ValueError /
    ConfigError; another process on the run raises RunLocked; a changed or stale step raises StepConfigChanged /
    StepStale (unless `overwrite`), see :func:`plan_run`. `redo` and `check_upstream_config` are for
    :func:`regenerate`.
    """
    if engine not in ("papermill", "inprocess"):
        raise ValueError(f"engine must be papermill or inprocess, got {engine!r}")
    run_dir = run_folder(runs_root, run_id)
    overrides = dict(overrides or {})
    cfg, specs = study_specs(preset, overrides, only)
    refuse_other_kind(run_dir, "run")
    with run_lock(run_dir):
        plan = plan_run(run_dir, cfg, specs, overwrite=overwrite, redo=redo,
                        check_upstream_config=check_upstream_config, log=log)
        write_json_atomic(run_dir / "study.json", {"preset": preset, "overrides": overrides, "config": cfg.to_dict()})
        _execute(run_dir, cfg, specs, plan, preset, overrides, engine, overwrite, log)
    return run_dir


def _execute(run_dir: Path, cfg, specs: list[StepSpec], plan: Plan, preset: str, overrides: dict, engine: str,
             overwrite: bool, log) -> None:
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
            todo = [(spec, _prepare(run_dir, cfg, spec, plan, ran, overwrite, prefix, log)) for spec in specs
                    if spec.stage == stage]
            todo = [(spec, step) for spec, step in todo if step is not None]
            if not todo:
                continue
            t0 = time.time()
            if engine == "papermill":
                if km is None:  # started when the first notebook runs: a run with every step done starts none
                    km = stack.enter_context(notebook_kernel(NOTEBOOKS_DIR.parent))
                with DoneWatcher(todo if stage.variants else [], finished, log):
                    _run_papermill(stage, [spec.variant for spec, _ in todo if spec.variant], run_dir, preset,
                                   overrides, km)
                unfinished = [spec.name for spec, step in todo if not step.done]
                if unfinished:
                    raise StepFailed(f"the notebook of {stage.name} ended without finishing {', '.join(unfinished)}; "
                                     f"see {run_dir / stage.name / 'notebook.ipynb'}")
                names = ", ".join(spec.variant or spec.stage.name for spec, _ in todo)
                log(f"{prefix(todo[-1][0], f'{stage.name} ({names})')} done in {time.time() - t0:6.1f} s")
            else:
                for spec, step in todo:
                    t0 = time.time()
                    _run_inprocess(spec, step.open(cfg, overwrite=overwrite))
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
                      restart_after=[s.name for s in _upstream_candidates(cfg, spec)])
    if decision.action == "skip":
        log(f"{prefix(spec, spec.name)} skipped (done, same config)")
        return None
    if decision.action == "reset" and spec.name not in plan.reset:
        verb = "runs again" if step.done else "starts over"
        log(f"{prefix(spec, spec.name)} {verb}: {decision.reason}")
    return decision.enact(step)


def regenerate(run_id: str, runs_root: str | Path = "runs", engine: str = "papermill", log=print) -> Path:
    """Re-make stage 08 of a finished run from its files (no training): `synthflaw figures --run-id ID`.

    On a multi-seed run (``runs/ID/seed-<k>/``) it re-makes every seed's figures and the cross-seed tables, intervals
    and findings in ``runs/ID/seeds/``. The upstream steps are taken with the configuration they ran with (the
    preset's defaults may have changed since), but they must be current: a stale one is refused, naming it.
    """
    from synthflaw.reporting.aggregate import summarize

    run_dir = run_folder(runs_root, run_id)
    study = run_dir / "study.json"
    seed_dirs = sorted(p for p in run_dir.glob("seed-*") if (p / "study.json").exists())
    if not study.exists() and seed_dirs:  # a multi-seed run: each seed's figures, then the intervals across seeds
        with run_lock(run_dir):
            for seed_dir in seed_dirs:
                regenerate(seed_dir.name, runs_root=run_dir, engine=engine, log=log)
            summarize(run_dir)
        return run_dir
    if not study.exists():
        raise ValueError(f"{run_dir} is not a run folder (no study.json); runs: "
                         f"{', '.join(sorted(p.name for p in Path(runs_root).glob('*'))) or 'none'}")
    saved = read_run_json(study, ("preset", "overrides"), STUDY_FIX)
    overrides = {**config_mod.absent_overrides(saved.get("config") or {}), **saved["overrides"]}
    return run_study(saved["preset"], run_id, overrides, runs_root=runs_root, engine=engine,
                     only=[FIGURES.name], redo=[FIGURES.name], check_upstream_config=False, log=log)
