"""Command line: ``synthflaw run``, ``synthflaw figures``, ``synthflaw config``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from datetime import datetime, timezone

from synthflaw import config
from synthflaw.runner import StepFailed, run_study
from synthflaw.runs import StepConfigChanged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthflaw", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the study (every step, in order) into runs/<run_id>/")
    run.add_argument("--preset", default="default", choices=sorted(config.PRESETS))
    run.add_argument("--run-id", default=None, help="folder name under runs/ (default: <preset>-<UTC time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, e.g. --set cpt.synthetic_fraction=0.3 (see `synthflaw config`)")
    run.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="run the study once per seed, into runs/<run_id>/seed-<k>/, then the intervals across "
                          "seeds into runs/<run_id>/seeds/ (default: 0 1 2 for the default preset, else the config's "
                          "seed); one seed runs into runs/<run_id>/")
    run.add_argument("--stages", nargs="+", default=None, help="only these stages, e.g. 01 02 08")
    run.add_argument("--overwrite", action="store_true", help="re-run steps whose configuration changed")
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
    exp.add_argument("--to", required=True, help="output folder; must not exist")
    exp.add_argument("--runs-root", default="runs")

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
                resolved = config.resolve(args.preset or "default", config.parse_overrides(args.overrides))
                print(json.dumps(resolved.to_dict(), indent=2))
            return 0
        if args.command == "export":
            from synthflaw.export import export_run
            written = export_run(Path(args.runs_root) / args.run_id, args.to)
            print(f"wrote {len(written)} files to {args.to}")
            return 0
        if args.command == "figures":
            from synthflaw.runner import regenerate
            regenerate(args.run_id, runs_root=args.runs_root, engine=args.engine)
            return 0
        overrides = config.parse_overrides(args.overrides)
        run_id = args.run_id or f"{args.preset}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        if args.seeds is None and "seed" not in overrides:
            args.seeds = list(config.PRESET_SEEDS.get(args.preset, ())) or None
        if args.seeds and len(args.seeds) > 1:
            config.resolve(args.preset, overrides)  # fail before any seed's folder is written
            for seed in args.seeds:
                run_study(args.preset, f"seed-{seed}", {**overrides, "seed": seed}, overwrite=args.overwrite,
                          runs_root=f"{args.runs_root}/{run_id}", engine=args.engine, only=args.stages)
            from synthflaw.reporting.aggregate import summarize
            summary = summarize(Path(args.runs_root) / run_id)
            print(f"across seeds {summary['seeds']}: {Path(args.runs_root) / run_id / 'seeds'}")
        else:
            if args.seeds:
                overrides["seed"] = args.seeds[0]
            run_study(args.preset, run_id, overrides, overwrite=args.overwrite, runs_root=args.runs_root,
                      engine=args.engine, only=args.stages)
        return 0
    except (config.ConfigError, StepConfigChanged, ValueError, FileExistsError) as err:
        print(f"synthflaw: error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"synthflaw: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
