"""Decide the paper's-regime SFT budget on a finished pilot sweep over `sft.epochs`, by the rule of
docs/regime-pilot.md (written before the pilot ran):

    synthflaw sweep --run-id pilot-regime --grid sft.epochs=0.05,0.1,0.14 --seeds 200 201 202 ... (see that file)
    PYTHONPATH=. python benchmarks/regime_pilot.py runs/pilot-regime --out docs/regime_pilot.json

Per point: every stage's tokens, tokens per parameter and passes over its data, the two ratios the regime needs
(base >= 3x CPT, CPT >= 10x SFT), natural's learnable HSR above its best null over the seeds (mean and Student t
interval), and, reported and never deciding, natural's compliance margin above its null, the positive control's
contrasts (harmed - natural) and the seconds of each stage. The chosen budget is the smallest `sft.epochs` whose
natural learnable HSR above null has a mean >= REQUIRED_ABOVE_NULL and an interval above 0; none may be chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from synthflaw.metrics.statistics import mean_ci, seed_key
from synthflaw.reporting.preregistration import PAPER_RELATIVE_EFFECT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_positive_control import point_summary, seeds_for_power  # noqa: E402  (a sibling script)

# docs/regime-pilot.md: a paper-sized loss (13%) of this is the 10-seed MDD of the control's learnable-HSR contrast
REQUIRED_ABOVE_NULL = 0.17
MIN_BASE_OVER_CPT, MIN_CPT_OVER_SFT = 3.0, 10.0


def _result(seed_dir: Path, step: str) -> dict:
    return json.loads((seed_dir / step / "result.json").read_text())


def budget(seed_dir: Path) -> dict:
    """Tokens, tokens per parameter and passes over the data of each training stage of one seed (natural)."""
    base, cpt, sft = (_result(seed_dir, s) for s in ("03_base_model", "04_continued_pretraining/natural",
                                                      "06_sft/natural"))
    parameters = base["parameters"]
    out = {"parameters": parameters}
    for name, r in (("base", base), ("cpt", cpt), ("sft", sft)):
        out[name] = {"tokens": r["tokens"], "tokens_per_parameter": r["tokens"] / parameters,
                     "epochs": r["epochs"], "steps": r["steps"], "wall_s": r.get("wall_s")}
    out["sft"]["examples"] = round(sft["examples"] * sft["epochs"])
    out["base_over_cpt"] = base["tokens"] / cpt["tokens"]
    out["cpt_over_sft"] = cpt["tokens"] / sft["tokens"]
    return out


def seed_dirs(point_dir: Path) -> list[Path]:
    """A point's seed folders in seed order (numeric: seed-2 before seed-10)."""
    return sorted(point_dir.glob("seed-*"), key=lambda p: seed_key(p.name.removeprefix("seed-")))


def natural_above_null(point_dir: Path) -> dict:
    values = {}
    for seed_dir in seed_dirs(point_dir):
        metrics = json.loads((seed_dir / "07_evaluate" / "natural" / "metrics.json").read_text())
        values[seed_dir.name] = {"hsr_above_null": metrics["learnable_hsr_above_null"],
                                 "margin_above_null": metrics["compliance_margin"] - metrics["compliance_margin_null"],
                                 "eval_s": sum(metrics["timings"].values())}
    return {"per_seed": values,
            "hsr_above_null": mean_ci([v["hsr_above_null"] for v in values.values()]),
            "margin_above_null": mean_ci([v["margin_above_null"] for v in values.values()]),
            "eval_s_per_model": float(np.mean([v["eval_s"] for v in values.values()]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a finished pilot sweep over sft.epochs")
    parser.add_argument("--out", type=Path, help="write the decision here (JSON)")
    args = parser.parse_args(argv)
    manifest = json.loads((args.sweep / "sweep.json").read_text())
    points = {}
    for point in manifest["points"]:
        point_dir = args.sweep / point["run"]
        found = natural_above_null(point_dir)
        control = point_summary(point_dir)
        found["budget"] = budget(seed_dirs(point_dir)[0])
        found["control_effects"] = control["control_effects"]
        found["relative_drop"] = control["relative_drop"]
        above = found["hsr_above_null"]["mean"]
        found["power_at_paper_sized_delta"] = (seeds_for_power(control["_agg"], PAPER_RELATIVE_EFFECT * above)
                                               if above > 0 else None)
        points[point["values"]["sft.epochs"]] = found
    meets = [e for e, p in sorted(points.items())
             if p["hsr_above_null"]["mean"] >= REQUIRED_ABOVE_NULL and p["hsr_above_null"]["low"] > 0]
    chosen = meets[0] if meets else None
    for e, p in sorted(points.items()):
        b, h, m = p["budget"], p["hsr_above_null"], p["margin_above_null"]
        c = p["control_effects"]["learnable_HSR"]
        print(f"sft.epochs={e}: SFT {b['sft']['examples']} examples, {b['sft']['tokens']} tokens "
              f"({b['sft']['tokens_per_parameter']:.4f}/param, {b['sft']['steps']} steps); CPT/SFT "
              f"{b['cpt_over_sft']:.1f}x, base/CPT {b['base_over_cpt']:.1f}x | natural HSR above null "
              f"{h['mean']:+.3f} [{h['low']:+.3f}, {h['high']:+.3f}]; margin above null {m['mean']:+.3f} "
              f"[{m['low']:+.3f}, {m['high']:+.3f}] | control HSR {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
              f" | eval {p['eval_s_per_model']:.0f} s/model")
    b = points[min(points)]["budget"]
    print(f"base {b['base']['tokens']} tokens ({b['base']['tokens_per_parameter']:.3f}/param, {b['base']['epochs']}"
          f" passes), CPT {b['cpt']['tokens']} ({b['cpt']['tokens_per_parameter']:.3f}/param, {b['cpt']['epochs']} "
          f"passes), {b['parameters']} parameters")
    print(f"rule: mean >= {REQUIRED_ABOVE_NULL} and interval above 0 -> chosen sft.epochs: {chosen}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"sweep": args.sweep.name, "rule": {"required_above_null": REQUIRED_ABOVE_NULL,
                                                      "interval_above_zero": True},
                  "ratios_required": {"base_over_cpt": MIN_BASE_OVER_CPT, "cpt_over_sft": MIN_CPT_OVER_SFT},
                  "chosen_sft_epochs": chosen, "points": {str(e): p for e, p in sorted(points.items())}}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
