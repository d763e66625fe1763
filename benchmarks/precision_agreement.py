"""Do fp32 and bf16 runs of the study agree? The same seeds run in both precisions (`compute.precision`), and each
primary check of the findings compared: the paired difference bf16 - fp32 of each seed against the check's
seed-to-seed spread (docs/precision-agreement.md holds the rule, written before the runs).

Two steps, because the runs want a machine where bf16 is the faster path (a GPU, or a CPU with AMX):

    # where the runs go: one process per (precision, seed), four at a time, then one fp32 rerun of the first seed
    PYTHONPATH=. python benchmarks/precision_agreement.py launch --seeds 5 6 7 --runs-root runs --deadline 400
    # anywhere, on the runs' small files
    PYTHONPATH=. python benchmarks/precision_agreement.py compare runs --out benchmarks/results/precision_agreement.json

`launch` runs the stages the findings read (01, 03, 04, 05, 06, 07: no data-flaw figures, no stage-08 figures),
through the in-process engine, `--parallel` at a time, each run in `<runs-root>/precision-<fp32|bf16>-<seed>[-rerun]/`. The rerun is the
floor: what running the same seed in the same precision again changes (nothing on a CPU; on a GPU, the
non-deterministic order of some reductions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from synthflaw.metrics.statistics import mean_ci
from synthflaw.reporting.aggregate import aggregate
from synthflaw.reporting.findings import findings
from synthflaw.reporting.preregistration import PRIMARY

STAGES = ("01", "03", "04", "05", "06", "07")
PRECISIONS = ("fp32", "bf16")
RUN_NAME = re.compile(r"^precision-(fp32|bf16)-(\d+)(-rerun)?$")
# docs/precision-agreement.md: the precisions agree on a check when the mean paired difference over the seeds is at
# most this many seed-to-seed standard deviations of the check
AGREE_WITHIN_SD = 1.0


def run_name(precision: str, seed: int, rerun: bool = False) -> str:
    return f"precision-{precision}-{seed}" + ("-rerun" if rerun else "")


def launch(seeds: list[int], runs_root: Path, deadline_s: float, preset: str, threads: int, rerun: bool,
           parallel: int) -> int:
    """Run every (precision, seed), `parallel` at a time in separate processes (a GPU shares itself between them),
    seed by seed so that whole pairs finish first, the rerun last; stop what still runs at `deadline_s` and start
    nothing after it. Returns how many runs failed, were stopped or never started. Each run logs to `<run>.log`."""
    runs_root.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s, False) for s in seeds for p in PRECISIONS] + ([("fp32", seeds[0], True)] if rerun else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started, running, failed = time.monotonic(), {}, 0

    def report(name: str, code) -> int:
        print(f"{name}: {code} after {time.monotonic() - started:.0f} s", flush=True)
        return code != "exit 0"

    while jobs or running:
        late = time.monotonic() - started > deadline_s
        while jobs and len(running) < parallel and not late:
            precision, seed, again = jobs.pop(0)
            name = run_name(precision, seed, again)
            command = [sys.executable, "-m", "synthflaw.cli", "run", "--preset", preset, "--run-id", name,
                       "--runs-root", str(runs_root), "--seeds", str(seed), "--engine", "inprocess",
                       "--stages", *STAGES, "--set", f"compute.precision={precision}"]
            log = open(runs_root / f"{name}.log", "w")  # noqa: SIM115 - closed when the run ends
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        if late:
            failed += sum(report(run_name(*job), "not started: deadline") for job in jobs)
            jobs = []
        for name, (proc, log) in list(running.items()):
            code = proc.poll()
            if code is None and late:
                proc.kill()
                code = proc.wait()
                failed += report(name, "stopped at the deadline")
            elif code is not None:
                failed += report(name, f"exit {code}")
            else:
                continue
            log.close()
            del running[name]
        time.sleep(1.0)
    return failed


def primary_checks(seed_dir: Path) -> dict[str, float]:
    """The value of each primary check of the findings on one seed's run (its paired, item-level estimate)."""
    with tempfile.TemporaryDirectory() as tmp:
        found = findings(aggregate([seed_dir], tmp))
    wanted = {check for family in PRIMARY.values() for check in family}
    return {c["check"]: c["value"] for f in found for c in f["checks"] if c["check"] in wanted and c["value"] is not None}


def _wall(seed_dir: Path) -> dict[str, float]:
    walls = {}
    for result in sorted(seed_dir.glob("*/result.json")) + sorted(seed_dir.glob("*/*/result.json")):
        stage = result.relative_to(seed_dir).parts[0]
        walls[stage] = walls.get(stage, 0.0) + json.loads(result.read_text()).get("wall_s", 0.0)
    return {k: round(v, 1) for k, v in walls.items()}


def _precision_record(seed_dir: Path) -> dict:
    """The precision the training steps recorded (the CPT step's meta.json, which every run has)."""
    for meta in sorted(seed_dir.glob("04_continued_pretraining/*/result.json")):
        recorded = json.loads(meta.read_text()).get("precision")
        if recorded:
            return recorded
    return {}


def compare(runs_root: Path) -> dict:
    """Per primary check: each seed's fp32 and bf16 values, the paired differences (bf16 - fp32) on the seeds run in
    both, their mean and interval, the seed-to-seed SD (each precision's seeds about their own mean, pooled over the
    precisions; a seed run in one precision only counts here), the rerun's difference (fp32 again - fp32), and
    whether the check agrees by docs/precision-agreement.md's rule."""
    runs = {}
    for folder in sorted(runs_root.iterdir()):
        match = RUN_NAME.match(folder.name)
        if match and folder.is_dir() and (folder / "07_evaluate").is_dir():
            runs[(match.group(1), int(match.group(2)), bool(match.group(3)))] = folder
    by_precision = {p: sorted(s for q, s, again in runs if q == p and not again) for p in PRECISIONS}
    paired = sorted(set(by_precision["fp32"]) & set(by_precision["bf16"]))
    if not paired:
        raise ValueError(f"{runs_root} holds no seed run in both precisions (precision-fp32-<k>/ and "
                         "precision-bf16-<k>/ with a 07_evaluate step); run `launch` first")
    values = {(p, s): primary_checks(runs[(p, s, False)]) for p, seeds in by_precision.items() for s in seeds}
    rerun = next((s for p, s, again in runs if again), None)
    rerun_values = primary_checks(runs[("fp32", rerun, True)]) if rerun is not None else None
    checks = [c for family in PRIMARY.values() for c in family if all(c in values[k] for k in values)]
    dof = sum(len(seeds) - 1 for seeds in by_precision.values() if seeds)
    rows = []
    for check in checks:
        differences = [values[("bf16", s)][check] - values[("fp32", s)][check] for s in paired]
        deviations = [values[(p, s)][check] - np.mean([values[(p, t)][check] for t in seeds])
                      for p, seeds in by_precision.items() for s in seeds]
        sd = float(np.sqrt(np.sum(np.square(deviations)) / dof)) if dof else float("nan")
        mean = mean_ci(differences)
        row = {"check": check, "fp32": {s: values[("fp32", s)][check] for s in by_precision["fp32"]},
               "bf16": {s: values[("bf16", s)][check] for s in by_precision["bf16"]}, "difference": differences,
               "mean_difference": mean["mean"], "ci": [mean["low"], mean["high"]], "seed_sd": sd,
               "difference_in_sd": abs(mean["mean"]) / sd if sd > 0 else None,
               "agrees": bool(abs(mean["mean"]) <= AGREE_WITHIN_SD * sd)}  # False when sd is nan (one seed)
        if rerun_values is not None and check in rerun_values:
            row["rerun_difference"] = rerun_values[check] - values[("fp32", rerun)][check]
        rows.append(row)
    return {"paired_seeds": paired, "seeds": by_precision, "seed_sd_dof": dof,
            "rule": f"|mean(bf16 - fp32)| <= {AGREE_WITHIN_SD} x seed-to-seed SD, for every primary check",
            "agree": all(r["agrees"] for r in rows), "checks": rows, "rerun_seed": rerun,
            "precision_recorded": {p: _precision_record(runs[(p, paired[0], False)]) for p in PRECISIONS},
            "wall_s": {run_name(p, s, again): _wall(folder) for (p, s, again), folder in sorted(runs.items())}}


def table(result: dict) -> str:
    lines = ["| primary check | mean bf16 - fp32 [95% CI] | seed-to-seed SD | in SDs | rerun - fp32 | agrees |",
             "|---|---|---|---|---|---|"]
    for r in result["checks"]:
        rerun = f"{r['rerun_difference']:+.4g}" if "rerun_difference" in r else ""
        in_sd = f"{r['difference_in_sd']:.2f}" if r["difference_in_sd"] is not None else ""
        lines.append(f"| {r['check']} | {r['mean_difference']:+.4g} [{r['ci'][0]:+.4g}, {r['ci'][1]:+.4g}] | "
                     f"{r['seed_sd']:.4g} | {in_sd} | {rerun} | {'yes' if r['agrees'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("launch", help="run every (precision, seed) at once")
    run.add_argument("--seeds", type=int, nargs="+", required=True)
    run.add_argument("--runs-root", type=Path, default=Path("runs"))
    run.add_argument("--deadline", type=float, default=480.0, help="seconds before unfinished runs are stopped")
    run.add_argument("--preset", default="default")
    run.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    run.add_argument("--no-rerun", action="store_true", help="skip the fp32 rerun of the first seed")
    run.add_argument("--parallel", type=int, default=4, help="runs at a time")
    cmp = sub.add_parser("compare", help="the agreement table from finished runs")
    cmp.add_argument("runs_root", type=Path)
    cmp.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args()
    if args.command == "launch":
        sys.exit(1 if launch(args.seeds, args.runs_root, args.deadline, args.preset, args.threads,
                             not args.no_rerun, args.parallel) else 0)
    result = compare(args.runs_root)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"paired seeds {result['paired_seeds']}, seed-to-seed SD on {result['seed_sd_dof']} df from "
          f"{result['seeds']}: {'agree' if result['agree'] else 'do not agree'} ({result['rule']})")


if __name__ == "__main__":
    main()
