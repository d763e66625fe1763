"""Command line: ``synthflaw run``, ``synthflaw figures``, ``synthflaw config``."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from synthflaw import config
from synthflaw.runner import StepFailed, run_study
from synthflaw.runs import (
    RunLocked,
    StepConfigChanged,
    UpstreamMissing,
    run_folder,
    run_lock,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthflaw", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the study (every step, in order) into runs/<run_id>/")
    run.add_argument("--preset", default="default", choices=sorted(config.PRESETS))
    run.add_argument("--run-id", default=None, help="folder name under runs/: a plain name (no '/', not starting "
                                                    "with '.', at most 100 characters; default: <preset>-<UTC time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, e.g. --set cpt.synthetic_fraction=0.3 (see `synthflaw config`)")
    run.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="run the study once per seed, into runs/<run_id>/seed-<k>/, then the intervals across "
                          "seeds into runs/<run_id>/seeds/ (default: 0 1 2 for the default preset, else the config's "
                          "seed); one seed runs into runs/<run_id>/")
    run.add_argument("--stages", nargs="+", default=None, help="only these stages, e.g. 01 02 08")
    run.add_argument("--overwrite", action="store_true",
                     help="re-run steps whose configuration changed or that are stale, and every step downstream")
    run.add_argument("--engine", default="papermill", choices=("papermill", "inprocess"),
                     help="papermill executes each notebook into its step folder; inprocess calls the same "
                          "library functions without notebooks (faster, no executed notebooks)")
    run.add_argument("--runs-root", default="runs")

    fig = sub.add_parser("figures", help="regenerate every figure and table of a finished run (no training)")
    fig.add_argument("--run-id", required=True)
    fig.add_argument("--runs-root", default="runs")
    fig.add_argument("--engine", default="papermill", choices=("papermill", "inprocess"))

    exp = sub.add_parser("export", help="copy a finished run's small outputs (no weights, no data) and its notebooks "
                                        "as HTML into a folder to commit, e.g. runs/reference")
    exp.add_argument("--run-id", required=True)
    exp.add_argument("--to", required=True, help="output folder inside --runs-root, e.g. runs/reference; must not "
                                                 "exist")
    exp.add_argument("--runs-root", default="runs")
    exp.add_argument("--allow-unfinished", action="store_true",
                     help="export a run with unfinished or stale steps (refused otherwise)")

    cfg = sub.add_parser("config", help="print every parameter with its default and help, or a preset resolved")
    cfg.add_argument("--preset", default=None, choices=sorted(config.PRESETS))
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            if args.preset is None and not args.overrides:
                print(config.describe())
            else:
                import json

                from synthflaw.stages import check
                resolved = config.resolve(args.preset or "default", config.parse_overrides(args.overrides))
                check(resolved)  # the stages' own checks (an unknown unlearning method, ...), as `run` makes them
                print(json.dumps(resolved.to_dict(), indent=2))
            return 0
        # Every command checks its run id (and where it writes) before it writes or deletes anything.
        if args.command == "export":
            from synthflaw.export import export_run
            run_dir = run_folder(args.runs_root, args.run_id)
            written = export_run(run_dir, args.to, runs_root=args.runs_root, allow_unfinished=args.allow_unfinished)
            print(f"wrote {len(written)} files to {args.to}")
            return 0
        if args.command == "figures":
            from synthflaw.runner import regenerate
            regenerate(args.run_id, runs_root=args.runs_root, engine=args.engine)
            return 0
        overrides = config.parse_overrides(args.overrides)
        run_id = args.run_id if args.run_id is not None else \
            f"{args.preset}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        run_dir = run_folder(args.runs_root, run_id)
        if args.seeds is None and "seed" not in overrides:
            args.seeds = list(config.PRESET_SEEDS.get(args.preset, ())) or None
        if args.seeds and len(args.seeds) > 1:
            config.resolve(args.preset, overrides)  # fail before any seed's folder is written
            with run_lock(run_dir):  # the seeds' folders and the summary across them: one process at a time
                for seed in args.seeds:
                    run_study(args.preset, f"seed-{seed}", {**overrides, "seed": seed}, overwrite=args.overwrite,
                              runs_root=run_dir, engine=args.engine, only=args.stages)
                from synthflaw.reporting.aggregate import summarize
                summary = summarize(run_dir)
            print(f"across seeds {summary['seeds']}: {run_dir / 'seeds'}")
        else:
            if args.seeds:
                overrides["seed"] = args.seeds[0]
            run_study(args.preset, run_id, overrides, overwrite=args.overwrite, runs_root=args.runs_root,
                      engine=args.engine, only=args.stages)
        return 0
    except (config.ConfigError, StepConfigChanged, RunLocked, UpstreamMissing, ValueError, FileExistsError) as err:
        print(f"synthflaw: error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"synthflaw: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
