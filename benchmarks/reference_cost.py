"""The cost of each seed of a finished multi-seed run, read from its steps' meta.json (no rerun): per seed and per
stage the sum of its steps' wall seconds, the seed's total, and the machine and code the steps recorded.

    PYTHONPATH=. python benchmarks/reference_cost.py runs/reference [--out benchmarks/results/reference_cost.json]

A step's wall time runs from its opening to its completion marker; what a papermill run spends between steps
(kernel start, imports) is not in it, so the total is a lower bound of the command's time. The times are those of
the machine as it was while the run went on: another process on the same cores makes them larger.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def seed_costs(run_dir: Path) -> dict:
    seeds, machines, commits = {}, set(), set()
    for seed_dir in sorted(run_dir.glob("seed-*"), key=lambda p: int(p.name.removeprefix("seed-"))):
        stages = defaultdict(float)
        for meta_path in sorted(seed_dir.glob("*/meta.json")) + sorted(seed_dir.glob("*/*/meta.json")):
            meta = json.loads(meta_path.read_text())
            stage = meta_path.relative_to(seed_dir).parts[0]
            stages[stage] += meta.get("wall_s") or 0.0
            machines.add((meta.get("platform"), meta.get("device"), meta.get("cpu_count"), meta.get("torch_threads"),
                          (meta.get("precision") or {}).get("precision") if isinstance(meta.get("precision"), dict)
                          else meta.get("precision")))
            commits.add((meta.get("git_commit"), meta.get("git_dirty")))
        seeds[seed_dir.name] = {"stages": {k: round(v, 1) for k, v in sorted(stages.items())},
                                "total_s": round(sum(stages.values()), 1)}
    totals = [s["total_s"] for s in seeds.values()]
    stage_names = sorted({k for s in seeds.values() for k in s["stages"]})
    return {"run": str(run_dir), "seeds": seeds,
            "per_seed_s": {"mean": round(statistics.mean(totals), 1), "min": min(totals), "max": max(totals)},
            "per_stage_mean_s": {k: round(statistics.mean(s["stages"].get(k, 0.0) for s in seeds.values()), 1)
                                 for k in stage_names},
            "all_seeds_s": round(sum(totals), 1),
            "machines": sorted((list(m) for m in machines if m != (None,) * 5), key=str),
            "commits": sorted((list(c) for c in commits), key=str)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    costs = seed_costs(args.run_dir)
    text = json.dumps(costs, indent=1, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
