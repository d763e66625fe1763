"""Running a sweep's points: one point with one seed (its shared steps placed or computed under their claims,
then the rest of its study), every seed of a point and its cross-seed tables, every point of a seed."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from synthflaw.registry import STAGES, selected_steps
from synthflaw.registry import stage as find_stage
from synthflaw.runner import run_seeds, run_study, summarize_seeds
from synthflaw.runs import BrokenStepFile, Step, StepConfigChanged, run_lock
from synthflaw.sweep.definition import Point, Sweep, step_fingerprint
from synthflaw.sweep.sharing import STAGING, claims, place_from_other_sweeps, place_shared, record_shared


def _stages_through(stage, only) -> list[str]:
    wanted = None if only is None else {find_stage(s) for s in only}
    return [s.number for s in STAGES if s.number <= stage.number and (wanted is None or s in wanted)]


def _stages_to_redo(folders: list[Path], run_dir: Path, only) -> list[str] | None:
    """The stages a command must run to redo the step `folders` of `run_dir` once deleted: `only`, or where one of
    them lies outside it, every stage from the earliest of them to the last of `only` (the stages in between read
    what it redoes); every stage (None) for a folder that is not a step's."""
    if not only:
        return only
    try:
        numbers = {find_stage(folder.relative_to(run_dir).parts[0]).number for folder in folders}
    except (ValueError, IndexError):
        return None
    asked = {find_stage(s).number for s in only}
    if numbers <= asked:
        return only
    first, last = min(numbers), max(numbers | asked)
    return [s.number for s in STAGES if first <= s.number <= last]


@contextlib.contextmanager
def sweep_fix(sweep: Sweep, run_dir: Path, only=None, engine: str = "papermill"):
    """A refusal of a point's steps (changed, stale, unreadable) with the fix a sweep has: the runner's says
    --overwrite, which `synthflaw sweep` does not take (a point's steps keep the sweep's definition), and running
    the same command again would be refused again. The same error, its fix the step folders to delete and the
    command that runs them again (:func:`_stages_to_redo`)."""
    try:
        yield
    except (StepConfigChanged, BrokenStepFile) as error:
        folders = " ".join(error.folders) or "<the step folders named>"
        command = sweep.command(_stages_to_redo([Path(f) for f in error.folders], run_dir, only), engine)
        raise type(error)(f"{error.what}\nFix: delete those steps' folders (rm -r {folders}), then continue the "
                          f"sweep ({command}): they run again from scratch, and the steps that read them too",
                          what=error.what, folders=error.folders) from None


def run_point_seed(sweep: Sweep, point: Point, seed: int, *, engine: str = "papermill", only=None, log=print,
                   shared_only: bool = False) -> Path:
    """One point with one seed: its shared steps placed from another point or computed under their claims, stage by
    stage, then (unless `shared_only`) the rest of the study by the runner, which skips what is done. A step the
    runner refuses is refused with the sweep's fix (:func:`sweep_fix`)."""
    study = sweep.study(point, seed)
    cfg = study.cfg
    run_dir = sweep.run_dir(point, seed)
    sharing = sweep.sharing(seed, only)
    mine = [(spec, fp) for spec in selected_steps(cfg, only)
            if (spec.name, fp := step_fingerprint(cfg, spec)) in sharing]
    with run_lock(run_dir), sweep_fix(sweep, run_dir, only, engine):
        if (run_dir / STAGING).exists():
            shutil.rmtree(run_dir / STAGING)  # left by a kill while placing: nothing in it was in place yet
        place_from_other_sweeps(sweep, point, seed, cfg, only, log)
        for stage in dict.fromkeys(spec.stage for spec, _ in mine):
            group = [(spec, fp) for spec, fp in mine if spec.stage == stage]
            with claims(sweep.root, seed, [(spec.name, fp) for spec, fp in group]):
                pending = place_shared(sweep, point, seed, cfg, group, sharing, log)
                if not pending:
                    continue
                log(f"[sweep] {point.name} seed-{seed}: computing shared {', '.join(s.name for s, _ in pending)}")
                run_study(study, run_dir.name, runs_root=run_dir.parent, engine=engine,
                          only=_stages_through(stage, only), log=log)
                for spec, fp in pending:
                    if Step(run_dir, spec.stage, spec.variant).done:
                        record_shared(sweep.root, point.name, seed, spec.name,
                                      {"fingerprint": fp, "from": None, "how": "computed"})
        if not shared_only:
            run_study(study, run_dir.name, runs_root=run_dir.parent, engine=engine, only=only, log=log)
    return run_dir


def run_point(sweep: Sweep, point: Point | str, *, engine: str = "papermill", only=None, log=print) -> Path:
    """Every seed of one point, in order (the unit of the local executor and of a per-point job); then the
    point's cross-seed tables when every seed has evaluated."""
    point = sweep.point(point) if isinstance(point, str) else point
    point_dir = sweep.point_dir(point)

    def run_seed(seed: int) -> None:
        log(f"[sweep] point {point.name}, seed {seed} ({sweep.seeds.index(seed) + 1}/{len(sweep.seeds)})")
        run_point_seed(sweep, point, seed, engine=engine, only=only, log=log)

    # the point's folder held: one process per point (a job resubmitted while the first still runs fails fast)
    if run_seeds(point_dir, sweep.seeds, run_seed, every_seed=True) is not None:
        log(f"[sweep] point {point.name}: across seeds in {point_dir / 'seeds'}")
    return point_dir


def summarize_point(sweep: Sweep, point: Point, log=print) -> bool:
    """The point's cross-seed tables and findings into ``points/<point>/seeds/`` when every seed has evaluated
    every model (:func:`synthflaw.reporting.aggregate.summarize`); False when they have not yet."""
    point_dir = sweep.point_dir(point)
    if summarize_seeds(point_dir, len(sweep.seeds)) is None:
        return False
    log(f"[sweep] point {point.name}: across seeds in {point_dir / 'seeds'}")
    return True


def run_seed(sweep: Sweep, seed: int, *, engine: str = "papermill", only=None, log=print) -> None:
    """Every point of one seed (the unit of a per-seed job): the shared steps of every point first (computed once,
    placed in the others), then each point's own steps."""
    for point in sweep.points:
        run_point_seed(sweep, point, seed, engine=engine, only=only, log=log, shared_only=True)
    for point in sweep.points:
        log(f"[sweep] point {point.name}, seed {seed}")
        run_point_seed(sweep, point, seed, engine=engine, only=only, log=log)
