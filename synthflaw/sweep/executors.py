"""Running a sweep: its status, the local executor, SLURM jobs through submitit (one per point or per seed), and
everything at once with the figures."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from synthflaw.registry import EVALUATE
from synthflaw.registry import stage as find_stage
from synthflaw.registry import selected_steps
from synthflaw.runner import ENGINES, NOTEBOOKS_DIR, execute_notebook, notebook_kernel
from synthflaw.runs import Step, StepConfigChanged, run_folder, run_lock
from synthflaw.sweep.definition import (
    Point,
    Sweep,
    SweepFailed,
    SweepRefused,
    define_sweep,
    load_sweep,
    open_sweep,
    read_manifest,
    update_manifest,
)
from synthflaw.sweep.points import run_point, run_seed, summarize_point

SLURM = "slurm"


# --------------------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------------------

def point_seed_state(sweep: Sweep, point: Point, seed: int, only=None) -> tuple[int, int]:
    """(finished steps, steps) of one point and seed, among the stages `only` (all without)."""
    cfg = sweep.config(point, seed)
    specs = selected_steps(cfg, only)
    run_dir = sweep.run_dir(point, seed)
    # through Step: a step folder that is a link is refused here too, naming it
    done = sum(1 for s in specs if Step(run_dir, s.stage, s.variant).marker() is not None)
    return done, len(specs)


def finished(sweep: Sweep, point: Point, seeds=None, only=None) -> bool:
    return all(d == n for d, n in (point_seed_state(sweep, point, s, only) for s in (seeds or sweep.seeds)))


def sweep_status(sweep: Sweep, only=None) -> list[dict]:
    """One row per point and seed: steps finished of all, the state, and the last job that ran its unit (its id,
    state, error and log) where jobs were submitted."""
    jobs = read_manifest(sweep.root).get("jobs", {})
    rows = []
    for point in sweep.points:
        for seed in sweep.seeds:
            done, total = point_seed_state(sweep, point, seed, only)
            job = (jobs.get(_unit_label({"point": point.name})) or jobs.get(_unit_label({"seed": seed})) or {})
            last = job.get("last") or {}
            state = "done" if done == total else "not started" if done == 0 else "partial"
            if state != "done" and last.get("state") == "failed":
                state = "failed"
            rows.append({"point": point.name, "seed": seed, "steps_done": done, "steps": total, "state": state,
                         "job": last.get("job_id") or (job.get("submitted") or [None])[-1],
                         "error": last.get("error") if state == "failed" else None,
                         "log": last.get("stdout"), "continue": sweep.command(only)})
    return rows


def status_report(sweep_id: str, runs_root: str | Path = "runs", only=None) -> str:
    """The status of every point and seed of a sweep, as text (``synthflaw sweep --run-id ID --status``)."""
    return status_text(sweep_status(load_sweep(sweep_id, runs_root), only))


def status_text(rows: list[dict]) -> str:
    lines = [f"{r['point']:40s} seed {r['seed']:>3}  {r['steps_done']:2d}/{r['steps']:2d}  {r['state']}"
             + (f"  job {r['job']}" if r["job"] else "") + (f"\n    error: {r['error']}" if r["error"] else "")
             + (f"\n    log: {r['log']}" if r["error"] and r["log"] else "") for r in rows]
    failed = sorted({r["point"] for r in rows if r["state"] == "failed"})
    if failed:
        # not "the same command": this one (--status) runs nothing
        lines.append(f"failed: {', '.join(failed)}; fix the cause, then submit what is not finished again: "
                     f"{rows[0]['continue']} --executor slurm (with the --slurm-* options of the first submission), "
                     "or leave out --executor slurm to run it here, one point after another")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------------------------

def run_local(sweep: Sweep, *, engine: str = "papermill", only=None, log=print) -> None:
    """Every point in grid order, each with its seeds in order, in this process. Resumable: each run skips what it
    finished, so the same call after a kill continues where it stopped. Stops at the first failure, naming it."""
    for k, point in enumerate(sweep.points, 1):
        log(f"[sweep] point {k}/{len(sweep.points)}: {point.name}")
        try:
            run_point(sweep, point, engine=engine, only=only, log=log)
        except (ValueError, StepConfigChanged) as error:
            # a refusal (a changed, stale or broken step, a step folder that is a link, a configuration): it carries
            # its own fix, and the same command would be refused again. A step's own errors are StepFailed.
            raise SweepRefused(f"point {point.name}: {error}") from error
        except Exception as error:  # noqa: BLE001 - re-raised with the point named
            raise SweepFailed(f"point {point.name} failed: {error}\nFix the cause, then continue the sweep "
                              f"({sweep.command(only, engine)}): finished points and steps are skipped") from error


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks of SLURM. `unit`: one job per point (its seeds in order), or per seed (every point of
    that seed, the shared steps first). `cluster`: slurm, or submitit's local / debug executors to try the same
    jobs on this machine."""

    partition: str | None = None
    time_min: int = 240
    gpus: int | None = None
    cpus: int | None = None
    array_parallelism: int | None = None
    unit: str = "point"
    cluster: str = "slurm"

    def __post_init__(self):
        if self.unit not in ("point", "seed"):
            raise ValueError(f"slurm unit must be point or seed, got {self.unit!r}")
        if self.cluster not in ("slurm", "local", "debug"):
            raise ValueError(f"cluster must be slurm, local or debug, got {self.cluster!r}")
        for name in ("time_min", "gpus", "cpus", "array_parallelism"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "gpus" else 1)):
                raise ValueError(f"slurm {name} must be a positive integer, got {value!r}")

    def auto_parameters(self, name: str) -> dict:
        """submitit.AutoExecutor parameters. GPUs go to SLURM as --gres=gpu:N (every SLURM version reads it) and to
        the local executor as gpus_per_node (its CUDA_VISIBLE_DEVICES)."""
        params = {"name": name, "timeout_min": self.time_min, "cpus_per_task": self.cpus,
                  "slurm_partition": self.partition, "slurm_array_parallelism": self.array_parallelism,
                  "slurm_gres": f"gpu:{self.gpus}" if self.gpus else None}
        if self.cluster != "slurm" and self.gpus:
            params["gpus_per_node"] = self.gpus
        return {k: v for k, v in params.items() if v is not None}

    def sbatch_parameters(self, name: str) -> dict:
        """The same parameters under the names submitit's SlurmExecutor gives them (what the sbatch file shows)."""
        params = {"job_name": name, "time": self.time_min, "cpus_per_task": self.cpus, "partition": self.partition,
                  "array_parallelism": self.array_parallelism, "gres": f"gpu:{self.gpus}" if self.gpus else None}
        return {k: v for k, v in params.items() if v is not None}


def _unit_label(unit: dict) -> str:
    return f"point:{unit['point']}" if "point" in unit else f"seed:{unit['seed']}"


def pending_units(sweep: Sweep, unit: str, only=None) -> list[dict]:
    """The jobs a submission needs: the points (or seeds) not finished."""
    if unit == "point":
        return [{"point": p.name} for p in sweep.points if not finished(sweep, p, only=only)]
    return [{"seed": s} for s in sweep.seeds if not all(finished(sweep, p, [s], only) for p in sweep.points)]


def run_unit(sweep_root: str, unit: dict, engine: str = "papermill", only=None) -> dict:
    """A job's function: one point (all its seeds) or one seed (all points), by the same functions as `local`;
    records its end (finished, or failed with the error and its log) in the manifest, then re-raises a failure so
    the scheduler sees it."""
    root = Path(sweep_root)
    sweep = load_sweep(root.name, root.parent)
    record = {"job_id": None, "stdout": None, "started": time.time()}
    try:
        import submitit

        env = submitit.JobEnvironment()
        record.update(job_id=env.job_id, stdout=str(env.paths.stdout))
    except (RuntimeError, KeyError):  # called outside a job (a shell, submitit's debug executor): nothing to name
        pass
    try:
        if "point" in unit:
            run_point(sweep, unit["point"], engine=engine, only=only)
        else:
            run_seed(sweep, unit["seed"], engine=engine, only=only)
    except BaseException as error:
        record.update(state="failed", error=f"{type(error).__name__}: {error}"[:2000], ended=time.time())
        update_manifest(root, lambda m: m.setdefault("jobs", {}).setdefault(_unit_label(unit), {})
                        .update(last=record))
        raise
    record.update(state="finished", ended=time.time())
    update_manifest(root, lambda m: m.setdefault("jobs", {}).setdefault(_unit_label(unit), {}).update(last=record))
    return record


def slurm_folder(sweep: Sweep) -> Path:
    """submitit's folder: one sub-folder per job (``%j``: the job id, ``<array id>_<task>`` in an array), which holds
    its pickles and its stdout/stderr logs."""
    return (sweep.root / SLURM / "%j").resolve()


def submit(sweep: Sweep, options: SlurmOptions, *, engine: str = "papermill", only=None, wait: bool = False,
           log=print) -> list:
    """Submit one job per pending unit (a job array on SLURM) through submitit, and record their ids in the
    manifest. With `wait` (always for the local and debug clusters) wait for them and raise SweepFailed naming the
    failed units and their logs."""
    import submitit

    units = pending_units(sweep, options.unit, only)
    if not units:
        log(f"[sweep] {sweep.root}: every {options.unit} is finished; nothing to submit")
        return []
    executor = submitit.AutoExecutor(folder=slurm_folder(sweep), cluster=options.cluster)
    executor.update_parameters(**options.auto_parameters(f"synthflaw-{sweep.root.name}"))
    with executor.batch():
        jobs = [executor.submit(run_unit, str(sweep.root.resolve()), unit, engine, only) for unit in units]

    def change(manifest):
        for unit, job in zip(units, jobs):
            entry = manifest.setdefault("jobs", {}).setdefault(_unit_label(unit), {})
            entry.setdefault("submitted", []).append(str(job.job_id))
    update_manifest(sweep.root, change)
    for unit, job in zip(units, jobs):
        log(f"[sweep] submitted {_unit_label(unit)} as job {job.job_id} (logs: {job.paths.stdout})")
    if wait or options.cluster != "slurm":
        failed = []
        for unit, job in zip(units, jobs):
            error = job.exception()  # waits for the job; returns its error instead of raising it
            if error is not None:
                text = str(error).strip()
                failed.append(f"{_unit_label(unit)} (job {job.job_id}, log {job.paths.stderr}): "
                              f"{text.splitlines()[-1] if text else type(error).__name__}")
        if failed:
            raise SweepFailed("failed: " + "; ".join(failed) + f"\nFix the cause, then submit again "
                              f"({sweep.command(only, engine)} --executor slurm, with the --slurm-* options of this "
                              f"submission): only the unfinished {options.unit}s are submitted")
    return jobs


def sbatch_script(sweep: Sweep, options: SlurmOptions, jobs: int) -> str:
    """The sbatch file a submission of `jobs` jobs would write, without a cluster (a dry run, and its test).

    submitit has no public call for this: SlurmExecutor refuses to start without `srun`, and the text comes from
    submitit.slurm.slurm._make_sbatch_string (what SlurmExecutor._make_submission_file_text calls). This is the one
    place that private function is used; the parameters are those `submit` gives AutoExecutor, under SlurmExecutor's
    names (`SlurmOptions.sbatch_parameters`; tests/test_sweep.py checks the two agree).
    """
    from submitit.slurm import slurm as submitit_slurm

    folder = slurm_folder(sweep)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = options.sbatch_parameters(f"synthflaw-{sweep.root.name}")
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, map_count=jobs if jobs > 1 else None,
                                              **params)


# --------------------------------------------------------------------------------------------------------------
# Everything at once, and the figures
# --------------------------------------------------------------------------------------------------------------

def run_sweep(preset: str, sweep_id: str, grid: dict | list[str], seeds=None, overrides: dict | None = None, *,
              runs_root: str | Path = "runs", executor: str = "local", engine: str = "papermill", only=None,
              slurm: SlurmOptions | None = None, treated: str = "synthetic", control: str = "natural",
              reuse_from=None, log=print) -> Sweep:
    """Define the sweep (everything checked before anything is written), write or check its manifest, run it with
    `executor` (local | slurm), and with the local executor draw its figures when evaluations exist. `reuse_from`:
    other sweeps whose finished steps the points take where the fingerprint and the upstreams are the same."""
    if executor not in ("local", "slurm"):
        raise ValueError(f"executor must be local or slurm, got {executor!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be papermill or inprocess, got {engine!r}")
    sweep = open_sweep(define_sweep(preset, sweep_id, grid, seeds, overrides, runs_root=runs_root,
                                    treated=treated, control=control, reuse_from=reuse_from), log=log)
    return execute(sweep, executor=executor, engine=engine, only=only, slurm=slurm, log=log)


def execute(sweep: Sweep, *, executor: str = "local", engine: str = "papermill", only=None,
            slurm: SlurmOptions | None = None, log=print) -> Sweep:
    """Run an opened sweep with `executor`; the local one then draws the figures (when evaluations exist)."""
    if executor == "slurm":
        submit(sweep, slurm or SlurmOptions(), engine=engine, only=only, log=log)
        return sweep
    run_local(sweep, engine=engine, only=only, log=log)
    if only is None or EVALUATE in {find_stage(s) for s in only}:
        made = draw(sweep.root.name, sweep.root.parent, engine)
        log(f"[sweep] figures: {sweep.root / 'figures'} ({len(made['figures'])} figures)")
    return sweep


def figures(sweep_id: str, runs_root: str | Path = "runs", dpi: int = 120) -> dict:
    """The sweep's figures and trend tests into ``runs/<sweep_id>/figures/``, from its files only
    (:func:`synthflaw.reporting.sweep_figures.render`)."""
    from synthflaw.reporting.sweep_figures import render

    root = run_folder(runs_root, sweep_id)
    return render(root, read_manifest(root), dpi=dpi)


def draw(sweep_id: str, runs_root: str | Path = "runs", engine: str = "papermill") -> dict:
    """The sweep's figures: with papermill by executing ``notebooks/09_sweep.ipynb`` into
    ``runs/<sweep_id>/figures/notebook.ipynb`` (the record, as stage notebooks are), else by :func:`figures`."""
    if engine != "papermill":
        return figures(sweep_id, runs_root)
    out = run_folder(runs_root, sweep_id) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    with notebook_kernel(NOTEBOOKS_DIR.parent) as km:  # the runner's kernel: local sockets, no TCP port
        execute_notebook(NOTEBOOKS_DIR / "09_sweep.ipynb", out / "notebook.ipynb",
                         {"sweep_id": sweep_id, "runs_root": str(Path(runs_root).resolve())}, km,
                         "the sweep's figures", failure=SweepFailed)
    return {"folder": str(out), "notebook": str(out / "notebook.ipynb"),
            "figures": sorted(p.name for p in out.glob("*.png"))}


def summarize_points(sweep_id: str, runs_root: str | Path = "runs", log=print) -> list[str]:
    """Each point's cross-seed tables (those whose seeds have all evaluated); the points summarised."""
    sweep = load_sweep(sweep_id, runs_root)
    done = []
    for point in sweep.points:
        with run_lock(sweep.point_dir(point)):
            if summarize_point(sweep, point, log=log):
                done.append(point.name)
    return done
