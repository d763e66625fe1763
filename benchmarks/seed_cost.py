"""The cost of one seed: one seed of a preset run through papermill (as `make study` runs it), from a fresh run folder,
timed per stage; with several checkouts, one after the other on the same machine, so their costs compare.

    PYTHONPATH=. python benchmarks/seed_cost.py [--checkout PATH ...] [--seed 5] [--set KEY=VALUE ...]
    PYTHONPATH=. python benchmarks/seed_cost.py --variant compute.precision=fp32 --variant compute.precision=auto

Each `--checkout` (default: this one) is a folder holding a checkout of the repository (e.g. `git worktree add
/tmp/before <commit>`); its own code and notebooks run, in a subprocess. Per stage: the sum of its steps' wall
seconds (meta.json); `other` is the rest of the whole command's time (kernel starts, imports, the run's checks).
For stage 07 also the seconds of each endpoint (metrics.json's timings, summed over the models), and the precision
the training steps ran in. The seed defaults to 5, one the registered reference (seeds 300-306) does not use. Each
`--variant` (comma-separated KEY=VALUE settings on top of `--set`) is one more column per checkout, run one after
the other the same way: the cost of a setting, e.g. fp32 against the precision `auto` chooses on this machine.
Measure on an idle machine: other processes on the same cores make every number larger, and unevenly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def run_seed(checkout: Path, seed: int, overrides: list[str], preset: str, name: str) -> dict:
    runs_root = Path(tempfile.mkdtemp(prefix="seed-cost-"))
    command = [sys.executable, "-m", "synthflaw.cli", "run", "--preset", preset, "--seeds", str(seed), "--run-id",
               "cost", "--runs-root", str(runs_root), "--engine", "papermill"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - started
    run = runs_root / "cost"
    stages: dict[str, float] = defaultdict(float)
    trained_in = set()  # the precision the training steps ran in (compute.precision=auto's choice, or as set)
    for meta in sorted(run.rglob("meta.json")):
        record = json.loads(meta.read_text())
        stages[record["step"].split("/")[0]] += record.get("wall_s") or 0.0
        if "precision" in record:
            trained_in.add(record["precision"]["precision"])
    endpoints: dict[str, float] = defaultdict(float)
    for metrics in run.glob("07_evaluate/*/metrics.json"):
        for endpoint, seconds in json.loads(metrics.read_text()).get("timings", {}).items():
            endpoints[endpoint] += seconds
    return {"checkout": name, "total_s": round(total, 1),
            "stages_s": {k: round(v, 1) for k, v in sorted(stages.items())},
            "other_s": round(total - sum(stages.values()), 1),
            "evaluation_endpoints_s": {k: round(v, 1) for k, v in endpoints.items()},
            "trained_in": sorted(trained_in), "run": str(run)}


def table(results: list[dict]) -> str:
    stages = sorted({s for r in results for s in r["stages_s"]})
    rows = ["| stage | " + " | ".join(r["checkout"] for r in results) + " |",
            "|---|" + "---:|" * len(results)]
    rows += [f"| {s} | " + " | ".join(str(r["stages_s"].get(s, "")) for r in results) + " |" for s in stages]
    rows.append("| other (kernels, imports, checks) | " + " | ".join(str(r["other_s"]) for r in results) + " |")
    rows.append("| trained in | " + " | ".join(", ".join(r["trained_in"]) for r in results) + " |")
    rows.append("| **one seed** | " + " | ".join(f"**{r['total_s']}**" for r in results) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, action="append", help="a checkout to time (repeatable)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one more column per checkout with these settings (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in (args.checkout or [Path(__file__).resolve().parent.parent])]
    for checkout in checkouts:
        if not (checkout / "synthflaw" / "cli.py").is_file():
            raise SystemExit(f"{checkout} is not a checkout of this repository (no synthflaw/cli.py)")
    variants = [v.split(",") for v in args.variant] or [[]]
    results = []
    # one after the other: never two seeds on the same cores at once
    for checkout, variant in itertools.product(checkouts, variants):
        name = " ".join([str(checkout)] + variant)
        results.append(run_seed(checkout, args.seed, args.overrides + variant, args.preset, name))
        print(json.dumps(results[-1], indent=1), flush=True)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
