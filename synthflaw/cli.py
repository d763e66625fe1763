"""Command line: ``synthflaw run``, ``synthflaw sweep``, ``synthflaw figures``, ``synthflaw config``."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from synthflaw import config
from synthflaw import sweep as sweeps
from synthflaw.registry import stage as find_stage
from synthflaw.reporting import preregistration
from synthflaw.runner import StepFailed, resolve_study, run_seeds, run_study, status_text
from synthflaw.runs import (
    RunLocked,
    StepConfigChanged,
    UpstreamMissing,
    folder_kind,
    refuse_other_kind,
    run_folder,
)
from synthflaw.runs.provenance import DirtyCheckout, require_clean


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthflaw", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the study (every step, in order) into runs/<run_id>/")
    run.add_argument("--preset", default="default", choices=sorted(config.PRESETS))
    run.add_argument("--run-id", default=None, help="folder name under runs/: a plain name (no '/', not starting "
                                                    "with '.' or '~', at most 100 bytes; default: <preset>-<UTC time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, e.g. --set cpt.synthetic_fraction=0.3 (see `synthflaw config`)")
    run.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="run the study once per seed, into runs/<run_id>/seed-<k>/, then the intervals across "
                          "seeds into runs/<run_id>/seeds/ (default: the registered reference's seeds, "
                          f"{' '.join(map(str, preregistration.REFERENCE_SEEDS))}, for the default preset, else the "
                          "config's seed); one seed runs into runs/<run_id>/")
    run.add_argument("--batch", type=int, nargs="+", default=None, metavar="SEED",
                     help="run only these of the study's seeds (a study longer than one job: docs/sweeps.md); the "
                          "findings across seeds are made once every seed of the study has evaluated, here or in "
                          "batches added with `synthflaw export --add`")
    run.add_argument("--registered", action="store_true",
                     help="the registered study of docs/preregistration.md: the default preset, its seeds, no "
                          "--set; refused from a checkout that is not one clean git commit (make study runs it)")
    run.add_argument("--stages", nargs="+", default=None, help="only these stages, e.g. 01 02 08")
    run.add_argument("--overwrite", action="store_true",
                     help="re-run steps whose configuration changed or that are stale, and every step downstream")
    run.add_argument("--engine", default="papermill", choices=("papermill", "inprocess"),
                     help="papermill executes each notebook into its step folder; inprocess calls the same "
                          "library functions without notebooks (faster, no executed notebooks)")
    run.add_argument("--runs-root", default="runs")

    _add_sweep_parser(sub)

    fig = sub.add_parser("figures", help="regenerate every figure and table of a finished run (no training)")
    fig.add_argument("--run-id", required=True)
    fig.add_argument("--runs-root", default="runs")
    fig.add_argument("--engine", default="papermill", choices=("papermill", "inprocess"))

    exp = sub.add_parser("export", help="copy a finished run's small outputs (no weights, no data) and its notebooks "
                                        "as HTML into a folder to commit, e.g. runs/reference; a sweep's id exports "
                                        "every point, the manifest and the sweep's figures")
    exp.add_argument("--run-id", required=True)
    exp.add_argument("--to", required=True, help="output folder inside --runs-root, e.g. runs/reference; must not "
                                                 "exist")
    exp.add_argument("--runs-root", default="runs")
    exp.add_argument("--allow-unfinished", action="store_true",
                     help="export a run with unfinished or stale steps (refused otherwise); the export lists them "
                          "in unfinished.json and they stay stale there")
    exp.add_argument("--batch", type=int, nargs="+", default=None, metavar="SEED",
                     help="of a multi-seed run, export only these seeds, as a batch of its study (finished seeds "
                          "only; no findings across seeds until every seed is added with --add)")
    exp.add_argument("--add", action="store_true",
                     help="add this batch's seeds to an existing export of the same multi-seed study (--to), "
                          "e.g. a later batch of a study longer than one job (docs/sweeps.md)")

    st = sub.add_parser("status", help="what a multi-seed run holds: k of K seeds evaluated, which are missing, "
                                       "whether its findings across seeds exist")
    st.add_argument("--run-id", required=True)
    st.add_argument("--runs-root", default="runs")

    cfg = sub.add_parser("config", help="print every parameter with its default and help, or a preset resolved")
    cfg.add_argument("--preset", default=None, choices=sorted(config.PRESETS))
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="run the study over a grid of values, each point a run of its own, steps "
                                      "shared by content (docs/sweeps.md)")
    sw.add_argument("--run-id", required=True, help="the sweep's folder under runs/ (a plain name)")
    sw.add_argument("--preset", default=None, choices=sorted(config.PRESETS),
                    help="the preset every point starts from (default: default); with --grid only")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a swept key and its values, e.g. --grid cpt.synthetic_fraction=0.1,0.3 (repeat for a "
                         "cartesian grid; ';' separates the values of list keys); leave out to continue an "
                         "existing sweep as its sweep.json defines it")
    sw.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="every point runs every seed (default: the preset's seeds, else the config's seed)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter every point shares")
    sw.add_argument("--stages", nargs="+", default=None, help="only these stages (e.g. 01 02 03)")
    sw.add_argument("--executor", default="local", choices=("local", "slurm"),
                    help="local: every point in order in this process (resumable); slurm: one submitit job per "
                         "point or per seed")
    sw.add_argument("--engine", default="papermill", choices=("papermill", "inprocess"))
    sw.add_argument("--runs-root", default="runs")
    sw.add_argument("--reuse-from", action="append", default=[], metavar="SWEEP_ID",
                    help="another sweep under --runs-root whose finished steps the points take where their "
                         "fingerprint and upstreams are the same (e.g. a templates sweep's default point from a "
                         "fraction sweep); repeatable")
    sw.add_argument("--trend-treated", default="synthetic", help="the trend test's treated model")
    sw.add_argument("--trend-control", default="natural", help="the trend test's control model")
    sw.add_argument("--status", action="store_true", help="report each point and seed (and the last job of each), "
                                                          "run nothing")
    sw.add_argument("--figures-only", action="store_true",
                    help="only the per-point cross-seed tables and the sweep's figures, from its files")
    slurm = sw.add_argument_group("slurm (with --executor slurm)")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", type=int, default=240, help="minutes per job (default 240)")
    slurm.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per job (--gres=gpu:N)")
    slurm.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per job")
    slurm.add_argument("--slurm-array-parallelism", type=int, default=None,
                       help="at most this many jobs of the array at once")
    slurm.add_argument("--slurm-unit", default="point", choices=("point", "seed"),
                       help="one job per point (its seeds in order), or per seed (every point, shared steps first)")
    slurm.add_argument("--slurm-cluster", default="slurm", choices=("slurm", "local", "debug"),
                       help="local / debug: the same jobs through submitit's executors on this machine")
    slurm.add_argument("--slurm-wait", action="store_true", help="wait for the jobs and report the failed ones")
    slurm.add_argument("--slurm-dry-run", action="store_true",
                       help="print the sbatch file the submission would use; submit and write nothing")


def _sweep(args) -> int:
    """`synthflaw sweep`: define (or continue) a sweep, then run, submit, report or draw it."""
    only = args.stages
    for stage in only or []:
        find_stage(stage)  # ValueError naming the stages, before the manifest or a point is written
    if not args.grid:  # an existing sweep, as its manifest defines it
        if args.preset or args.seeds or args.overrides:
            raise config.ConfigError("without --grid a sweep continues as its sweep.json defines it: leave out "
                                     "--preset/--seeds/--set, or give the whole definition with --grid")
        sweep = sweeps.load_sweep(args.run_id, args.runs_root)
        if args.reuse_from:
            sweep.reuse_from = sweeps.check_reuse_from(args.runs_root, args.run_id, args.reuse_from)
    else:
        sweep = sweeps.define_sweep(args.preset or "default", args.run_id, args.grid, args.seeds,
                                    config.parse_overrides(args.overrides), runs_root=args.runs_root,
                                    treated=args.trend_treated, control=args.trend_control,
                                    reuse_from=args.reuse_from)
    if args.status:
        print(sweeps.status_text(sweeps.sweep_status(sweep, only)))
        return 0
    if args.figures_only:
        sweeps.summarize_points(args.run_id, args.runs_root)
        made = sweeps.draw(args.run_id, args.runs_root, args.engine)
        print(f"{len(made['figures'])} figures and the trend tests in {made['folder']}")
        return 0
    options = sweeps.SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time, gpus=args.slurm_gpus,
                                  cpus=args.slurm_cpus, array_parallelism=args.slurm_array_parallelism,
                                  unit=args.slurm_unit, cluster=args.slurm_cluster)
    if args.slurm_dry_run:
        jobs = len(sweeps.pending_units(sweep, options.unit, only))
        print(sweeps.sbatch_script(sweep, options, jobs) if jobs else "nothing to submit: every unit is finished")
        return 0
    sweeps.open_sweep(sweep)
    if args.executor == "slurm":
        sweeps.submit(sweep, options, engine=args.engine, only=only, wait=args.slurm_wait)
        print(f"status: synthflaw sweep --run-id {args.run_id} --runs-root {args.runs_root} --status")
        return 0
    sweeps.execute(sweep, executor="local", engine=args.engine, only=only)
    return 0


def _registered(args, overrides: dict) -> list[int]:
    """The seeds of the registered study, after checking that `synthflaw run --registered` asks for nothing else
    and runs from one clean commit (DirtyCheckout otherwise); nothing is written before."""
    listed = list(preregistration.REFERENCE_SEEDS)
    if args.preset != preregistration.REGISTERED_PRESET or overrides or (args.seeds and args.seeds != listed):
        raise config.ConfigError(
            f"--registered runs the study docs/preregistration.md registers: --preset "
            f"{preregistration.REGISTERED_PRESET}, seeds {' '.join(map(str, listed))}, no --set; leave out "
            "--preset/--seeds/--set, or leave out --registered for another study")
    require_clean(what="the registered study (synthflaw run --registered)")
    return listed


def _run(args) -> int:
    """`synthflaw run`: one seed into runs/<run_id>/, or several into its seed-<k>/ folders and the summary across
    them; every seed's configuration resolved and checked before any folder or lock is made."""
    overrides = config.parse_overrides(args.overrides)
    run_id = args.run_id if args.run_id is not None else f"{args.preset}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run_dir = run_folder(args.runs_root, run_id)
    seeds = _registered(args, overrides) if args.registered else args.seeds
    if seeds is None and "seed" not in overrides and args.preset == preregistration.REGISTERED_PRESET:
        seeds = list(preregistration.REFERENCE_SEEDS)
    if args.batch and not (seeds and (len(seeds) > 1 or args.registered)):
        raise config.ConfigError("--batch runs some seeds of a multi-seed study: give the study's seeds with "
                                 "--seeds (or --registered, or the default preset's seeds) and the batch with --batch")
    if not seeds or (len(seeds) == 1 and not args.registered):
        if seeds:
            overrides["seed"] = seeds[0]
        run_study(resolve_study(args.preset, overrides), run_id, overwrite=args.overwrite, runs_root=args.runs_root,
                  engine=args.engine, only=args.stages)
        return 0
    if len(set(seeds)) != len(seeds):
        raise config.ConfigError(f"--seeds {' '.join(map(str, seeds))} repeats a seed: give each once")
    studies = {}
    for seed in seeds:
        try:
            studies[seed] = resolve_study(args.preset, {**overrides, "seed": seed})
        except config.ConfigError as error:
            raise config.ConfigError(f"seed {seed}: {error}") from None
        studies[seed].steps(args.stages)
    refuse_other_kind(run_dir, "seeds")
    record = {"preset": args.preset, "overrides": overrides, "registered": args.registered}
    summary = run_seeds(run_dir, seeds, lambda seed: run_study(
        studies[seed], f"seed-{seed}", overwrite=args.overwrite, runs_root=run_dir, engine=args.engine,
        only=args.stages), record=record, batch=args.batch)
    if summary is None:
        print(status_text(run_dir))
    else:
        print(f"across seeds {summary['seeds']}: {run_dir / 'seeds'}")
    return 0


# What a write refuses for the file system's sake, not the program's: a message with the fix, never a traceback
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
USERS = FULL | {errno.EACCES, errno.EPERM, errno.EROFS}


def _in_runs_folder(err: OSError, args) -> bool:
    """Whether the file an OSError names lies in the runs folder (or the export's target, or is that folder); a
    full disk or a file-size limit hit by a write names no file (write(2) knows none), and is the user's too."""
    roots = [Path(getattr(args, "runs_root", None) or "runs")] + ([Path(args.to)] if getattr(args, "to", None) else [])
    names = [Path(os.fsdecode(n)) for n in (err.filename, err.filename2) if n is not None]
    if not names:
        return err.errno in FULL
    return any(name.absolute() == root.absolute() or name.absolute().is_relative_to(root.absolute())
               for name in names for root in roots)


def _os_cause(err: BaseException) -> OSError | None:
    """The file system's refusal (`USERS`) a failed step or point was raised from, if any: a full disk inside a
    step is the user's to fix, as it is outside one."""
    while err is not None and not (isinstance(err, OSError) and err.errno in USERS):
        err = err.__cause__ or err.__context__
    return err


def _os_message(err: OSError) -> str:
    """What went wrong with which file, and the fix."""
    where = (os.fsdecode(err.filename) if err.filename is not None else "a file being written") + (
        f" -> {os.fsdecode(err.filename2)}" if err.filename2 else "")
    fixes = {errno.EACCES: "make the runs folder writable by you, or pick another --runs-root",
             errno.EPERM: "make the runs folder writable by you, or pick another --runs-root",
             errno.EROFS: "the file system is read-only: pick a --runs-root on a writable one",
             errno.ENOSPC: "free some space and run the same command again: finished steps are kept",
             errno.EDQUOT: "free some space and run the same command again: finished steps are kept",
             errno.EFBIG: "a file passed this shell's file-size limit: raise it (ulimit -f unlimited) and run the "
                          "same command again: finished steps are kept",
             errno.ENAMETOOLONG: "use a shorter --run-id or --runs-root"}
    fix = fixes.get(err.errno, "fix that and run the same command again: finished steps are kept")
    return f"{err.strerror or type(err).__name__}: {where}; {fix}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            if args.preset is None and not args.overrides:
                print(config.describe())
            else:
                import json

                # the stages' own checks too (an unknown unlearning method, ...), as `run` makes them
                resolved = resolve_study(args.preset or "default", config.parse_overrides(args.overrides))
                print(json.dumps(resolved.cfg.to_dict(), indent=2))
            return 0
        # Every command checks its run id (and where it writes) before it writes or deletes anything.
        if args.command == "export":
            from synthflaw.export import export_run, export_sweep, is_sweep
            run_dir = run_folder(args.runs_root, args.run_id)
            if args.add:
                from synthflaw.export import add_batch
                written = add_batch(run_dir, args.to, runs_root=args.runs_root, batch=args.batch)
                print(f"added {len(written)} files to {args.to}")
                print(status_text(args.to))
                return 0
            if args.batch is not None:
                written = export_run(run_dir, args.to, runs_root=args.runs_root,
                                     allow_unfinished=args.allow_unfinished, batch=args.batch)
                print(f"wrote {len(written)} files to {args.to}")
                print(status_text(args.to))
                return 0
            written = (export_sweep if is_sweep(run_dir) else export_run)(
                run_dir, args.to, runs_root=args.runs_root, allow_unfinished=args.allow_unfinished)
            print(f"wrote {len(written)} files to {args.to}")
            return 0
        if args.command == "status":
            run_dir = run_folder(args.runs_root, args.run_id)
            refuse_other_kind(run_dir, "seeds")
            if folder_kind(run_dir) is None:
                raise ValueError(f"{run_dir} is not a multi-seed run (no seeds.json, no seed-<k>/)")
            print(status_text(run_dir))
            return 0
        if args.command == "figures":
            from synthflaw.runner import regenerate
            regenerate(args.run_id, runs_root=args.runs_root, engine=args.engine)
            return 0
        if args.command == "sweep":
            return _sweep(args)
        return _run(args)
    except (config.ConfigError, StepConfigChanged, RunLocked, UpstreamMissing, ValueError, FileExistsError,
            DirtyCheckout) as err:
        print(f"synthflaw: error: {err}", file=sys.stderr)
        return 2
    except (StepFailed, sweeps.SweepFailed) as err:
        cause = _os_cause(err)
        if cause is not None:  # the step's folder (in the message) and the file system's refusal, with its fix
            print(f"synthflaw: error: {err}\n{_os_message(cause)}", file=sys.stderr)
            return 2
        print(f"synthflaw: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # The one place an operating system's refusal becomes a message: a file of the runs folder (or the export's
        # target) that cannot be read or written is the user's to fix, and the traceback says nothing more. Any
        # other OSError is a fault of the program: its traceback is shown.
        if not _in_runs_folder(err, args):
            raise
        print(f"synthflaw: error: {_os_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
