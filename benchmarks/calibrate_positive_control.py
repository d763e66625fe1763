"""Fix the positive control's harm and the pre-registered margins and seed count on natural pilot seeds.

Reads a finished sweep over `sft.harm_fraction` (natural and harmed models only; pilot seeds that no reference
uses), e.g.:

    synthflaw sweep --run-id pilot-control --grid sft.harm_fraction=0.05,0.1,0.2,0.35 --seeds 100 101 102 \\
        --set cpt.branches=natural --set unlearn.methods= --stages 01 03 04 06 07 --engine inprocess
    python benchmarks/calibrate_positive_control.py runs/pilot-control --out docs/calibration_positive_control.json

Per harm fraction: the relative drop of natural's learnable HSR above its best null, (HSR_nat - HSR_harmed) /
(HSR_nat - best null), from the seed means; the control's item-level contrasts (clustered by base prompt, combined
over seeds as findings.py does) on learnable HSR, compliance margin, the out-of-distribution HSR and chat preference;
and the exchange rate, margin change per unit of learnable-HSR change. The chosen fraction is the one whose relative
drop is nearest the paper's (PAPER_RELATIVE_EFFECT, 13%), decided on the drop alone, never on a contrast's
significance. At it: the margins (paper-sized effects in each endpoint's units) and the seed count at which the
learnable-HSR contrast reaches POWER for the paper-sized effect (random-effects standard error extrapolated from the
pilot's within-seed variances and between-seed tau^2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.special import stdtrit

from synthflaw.metrics.statistics import random_effects, seed_item_contrast
from synthflaw.reporting.aggregate import aggregate, seed_runs
from synthflaw.reporting.findings import Contrasts, ITEM_METRICS, ni_margin
from synthflaw.reporting.preregistration import ALPHA, CONTROL, PAPER_RELATIVE_EFFECT, POWER

ENDPOINTS = ("learnable_HSR", "compliance_margin", "HSR", "chat_preference")


def _mean(values: dict | None) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def seeds_for_power(agg: dict, delta: float, max_seeds: int = 60) -> dict:
    """The smallest seed count k >= 3 whose MDD for learnable HSR (harmed - natural) is at most `delta`: SE(k) =
    sqrt((mean within-seed variance + tau^2) / k), MDD = (t_{1-ALPHA/2, k-1} + t_{POWER, k-1}) SE(k)."""
    metric, prefix = ITEM_METRICS["learnable_HSR"]
    means, variances = [], []
    for seed, models in agg["items"][metric].items():
        values = {m: {k: v for k, v in models[m].items() if k.startswith(prefix)} for m in (CONTROL, "natural")}
        found = seed_item_contrast(values, [(CONTROL, 1.0), ("natural", -1.0)], agg["clusters"].get(seed))
        means.append(found[0])
        variances.append(found[1])
    _, _, tau2 = random_effects(np.array(means), np.array(variances))
    per_seed_var = float(np.mean(variances)) + tau2
    for k in range(3, max_seeds + 1):
        se = math.sqrt(per_seed_var / k)
        mdd = float(stdtrit(k - 1, 1 - ALPHA / 2) + stdtrit(k - 1, POWER)) * se
        if mdd <= delta:
            return {"seeds": k, "mdd": mdd, "within_seed_variance": float(np.mean(variances)), "tau2": tau2}
    return {"seeds": None, "note": f"more than {max_seeds} seeds", "within_seed_variance": float(np.mean(variances)),
            "tau2": tau2}


def point_summary(point_dir: Path) -> dict:
    agg = aggregate(seed_runs(point_dir), point_dir / "calibration")
    per_seed = agg["per_seed"]
    hsr = ni_margin(agg)
    harmed = _mean(per_seed[CONTROL]["learnable_HSR"])
    contrasts = Contrasts(agg)
    effects = {}
    for endpoint in ENDPOINTS:
        stats = contrasts.diff(endpoint, CONTROL, "natural")
        effects[endpoint] = None if stats is None else {k: stats.get(k) for k in ("mean", "low", "high", "se",
                                                                                   "mdd", "n", "items")}
    drop = (hsr["natural"] - harmed) / hsr["above_null"]
    rate = None
    if effects["learnable_HSR"] and abs(effects["learnable_HSR"]["mean"]) > 1e-12:
        rate = effects["compliance_margin"]["mean"] / effects["learnable_HSR"]["mean"]
    natural = per_seed["natural"]
    return {"seeds": agg["seeds"], "natural_learnable_HSR": hsr["natural"], "best_null": hsr["best_null"],
            "natural_above_null": hsr["above_null"], "harmed_learnable_HSR": harmed, "relative_drop": drop,
            "control_effects": effects, "exchange_rate_margin_per_HSR": rate,
            "natural_compliance_margin_above_null": _mean(natural["compliance_margin"])
            - _mean(natural["compliance_margin_null"]),
            "natural_chat_preference": _mean(natural.get("chat_preference")), "_agg": agg}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a finished sweep over sft.harm_fraction")
    parser.add_argument("--out", type=Path, help="write the calibration here (JSON)")
    args = parser.parse_args(argv)
    manifest = json.loads((args.sweep / "sweep.json").read_text())
    points = {}
    for point in manifest["points"]:
        fraction = point["values"]["sft.harm_fraction"]
        points[fraction] = point_summary(args.sweep / point["run"])
    chosen = min(points, key=lambda f: abs(points[f]["relative_drop"] - PAPER_RELATIVE_EFFECT))
    at = points[chosen]
    delta_hsr = PAPER_RELATIVE_EFFECT * at["natural_above_null"]
    rate = at["exchange_rate_margin_per_HSR"]
    margins = {"learnable_HSR": delta_hsr,
               "compliance_margin": abs(rate) * delta_hsr if rate is not None else None,
               "chat_preference": PAPER_RELATIVE_EFFECT * at["natural_chat_preference"]
               if at["natural_chat_preference"] and at["natural_chat_preference"] > 0 else None}
    power = seeds_for_power(at["_agg"], delta_hsr)
    result = {"sweep": args.sweep.name, "target_relative_drop": PAPER_RELATIVE_EFFECT, "chosen_fraction": chosen,
              "margins": margins, "power": power,
              "points": {str(f): {k: v for k, v in p.items() if k != "_agg"} for f, p in sorted(points.items())}}
    for f, p in sorted(points.items()):
        e = p["control_effects"]
        print(f"harm_fraction={f}: natural {p['natural_learnable_HSR']:.4f} (above null {p['natural_above_null']:.4f})"
              f", harmed {p['harmed_learnable_HSR']:.4f}: relative drop {p['relative_drop']:+.3f}; "
              + "; ".join(f"{k} {v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]" for k, v in e.items() if v)
              + (f"; exchange rate {p['exchange_rate_margin_per_HSR']:.3f}" if p["exchange_rate_margin_per_HSR"]
                 is not None else ""))
    print(f"chosen: harm_fraction={chosen}; margins {margins}; power {power}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
