"""What a run may trust, decided before anything is written (:func:`plan_run`): which steps run, which run from
scratch, and the refusal listing every problem with its fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from synthflaw.registry import STAGES, StepSpec, study_steps
from synthflaw.registry import stage as find
from synthflaw.runs import (
    BrokenStepFile,
    Freshness,
    Step,
    StepConfigChanged,
    StepStale,
    config_difference,
    step_named,
)


def upstream_candidates(cfg, spec: StepSpec) -> list[StepSpec]:
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
        except BrokenStepFile as error:  # what is wrong; the refusal gives the fix
            state, problem = "changed", Problem(spec.name, "broken", error.what)
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
            names += [s.name for s in upstream_candidates(cfg, spec)]
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
            problems.append(problem("broken", error.what))
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
    # `what` and `folders` let a command without --overwrite (a sweep's point) give its own fix
    return (StepStale if stale else StepConfigChanged)("\n".join(lines + ["Fix: " + "; ".join(fixes) + "."]),
                                                       what="\n".join(lines),
                                                       folders=[run_dir / name for name in
                                                                dict.fromkeys(p.step for p in problems)])
