"""The paper's findings, each tested with its rule written down before the data.

Primary endpoints (`PRIMARY`): instruction following on the learnable tier, read two ways, by greedy generation
(`learnable_HSR`) and by likelihood (`compliance_margin`); the output shift read by likelihood where greedy leakage
reads 0 (`template_pull`, after and before SFT); the knowledge benchmark before SFT (`benchmark`); chat quality
(`chat_score`). The out-of-distribution suite's HSR and the rest are secondary and reported.

How a contrast is estimated. An endpoint measured per item (`ITEM_METRICS`) is contrasted item by item within each
seed (paired: both models answered the same items), and the seeds' estimates are combined by a random-effects
meta-analysis with a Student t interval on k - 1 degrees of freedom (:func:`synthflaw.metrics.statistics.
combine_seeds`); other metrics (perplexity spread, KL) by the Student t interval of the per-seed differences. Every
check also states its minimum detectable difference at this many seeds (two-sided 5%, power 80%).

Verdicts. A directional check reproduces (True) when its interval excludes 0 on the claimed side, is False when it
excludes 0 on the other side, None (inconclusive) otherwise or with one seed. "Not worse than natural" is a
non-inferiority check with a margin fixed in advance, never "not significantly below": its lower bound must lie
above -delta, delta = 13% (the paper's relative HSR loss, 27.58 -> 24.00) of natural's learnable HSR above the best
null, computed from the natural branch and the nulls only; it is False when the whole interval lies below -delta.
A finding's verdict is the three-valued AND of its checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthflaw.metrics.statistics import (
    contrast,
    item_contrast,
    minimum_detectable_difference,
)
from synthflaw.records import write_json, write_text_atomic
from synthflaw.reporting.tables import NULL_PREFIX

# Bounds closer to 0 than this count as 0: equal metrics read from two files can differ by float rounding only.
ZERO = 1e-12
# The paper's instruction-following loss, relative: FollowBench HSR 27.58 (natural) -> 24.00 (2% SynthQA).
PAPER_RELATIVE_EFFECT = (27.58 - 24.00) / 27.58

PRIMARY = ("learnable_HSR", "compliance_margin", "template_pull", "pre_sft_template_pull", "benchmark", "chat_score")
# Headline metric -> (items.csv metric, item key prefix): endpoints contrasted item by item within seeds.
ITEM_METRICS = {
    "benchmark": ("pre_sft_correct", "benchmark/"),
    "benchmark_synthqa_only": ("pre_sft_correct", "benchmark/synthqa_only/"),
    "benchmark_stated": ("pre_sft_correct", "benchmark/stated/"),
    "learnable_HSR": ("followed", "learnable_suite/"),
    "compliance_margin": ("compliance_margin", "learnable_suite/"),
    "template_pull": ("template_pull", "learnable_suite/"),
    "pre_sft_template_pull": ("pre_sft_template_pull", "learnable_suite/"),
    "chat_score": ("chat_score", "chat/"),
    "chat_preference": ("chat_preference", "chat/"),
    "pre_sft_leakage": ("pre_sft_leak", "probes/"),
}


def _directional(stats: dict | None, sign: int) -> bool | None:
    """True when the CI excludes 0 on the claimed side (sign +1: above, -1: below, 0: either side), False when it
    excludes 0 on the other side, None when it contains 0, is missing, or comes from a single seed."""
    if stats is None or stats["single_seed"]:
        return None
    if sign == 0:
        return True if (stats["low"] > ZERO or stats["high"] < -ZERO) else None
    low, high = (stats["low"], stats["high"]) if sign > 0 else (-stats["high"], -stats["low"])
    return True if low > ZERO else False if high < -ZERO else None


def _non_inferior(stats: dict | None, delta: float | None) -> bool | None:
    """Non-inferiority with margin delta: True when the CI's lower bound lies above -delta, False when the whole
    CI lies below -delta, None otherwise (or without a margin or with one seed)."""
    if stats is None or stats["single_seed"] or delta is None:
        return None
    return True if stats["low"] > -delta else False if stats["high"] < -delta else None


def _all(verdicts) -> bool | None:
    """Three-valued AND: any False -> False, all True -> True, otherwise None (inconclusive)."""
    verdicts = list(verdicts)
    return False if False in verdicts else True if verdicts and all(v is True for v in verdicts) else None


def _check(name: str, rule: str, stats: dict | None, verdict: bool | None, **extra) -> dict:
    return {"check": name, "value": None if stats is None else stats["mean"],
            "ci": None if stats is None else [stats["low"], stats["high"]], "n": None if stats is None else stats["n"],
            "items": None if stats is None else stats.get("items"), "mdd": None if stats is None else stats.get("mdd"),
            "method": None if stats is None else ("items" if "items" in stats else "seeds"),
            "reproduces": verdict, "rule": rule, **extra}


def _finding(fid: str, claim: str, checks: list[dict], note: str | None = None) -> dict:
    primary = checks[0]
    return {"id": fid, "claim": claim, "metric": primary["check"], "value": primary["value"], "ci": primary["ci"],
            "n": primary["n"], "reproduces": _all(c["reproduces"] for c in checks),
            "rule": "; AND ".join(c["rule"] for c in checks), "checks": checks, "note": note}


class Contrasts:
    """d(metric; terms) of an aggregate: item by item within seeds for `ITEM_METRICS`, else over per-seed values."""

    def __init__(self, aggregated: dict):
        self.per_seed, self.confidence = aggregated["per_seed"], aggregated["confidence"]
        self.items = aggregated.get("items") or {}
        self.clusters = aggregated.get("clusters") or {}

    def __call__(self, metric: str, terms: list[tuple[str, float]]) -> dict | None:
        if metric in ITEM_METRICS and ITEM_METRICS[metric][0] in self.items:
            item_metric, prefix = ITEM_METRICS[metric]
            by_seed = {seed: {model: {k: v for k, v in values.items() if k.startswith(prefix)}
                              for model, values in models.items()}
                       for seed, models in self.items[item_metric].items()}
            return item_contrast(by_seed, terms, self.confidence, self.clusters)
        found = contrast(self.per_seed, [(model, metric, w) for model, w in terms], self.confidence)
        if found is not None and not found["single_seed"]:
            found["mdd"] = minimum_detectable_difference(found["std"] / np.sqrt(found["n"]), found["n"] - 1,
                                                         self.confidence)
        return found

    def diff(self, metric: str, a: str, b: str) -> dict | None:
        return self(metric, [(a, 1.0), (b, -1.0)])


def ni_margin(aggregated: dict) -> dict | None:
    """delta, the non-inferiority margin of instruction following: `PAPER_RELATIVE_EFFECT` of natural's learnable
    HSR above the best null, means over seeds (natural and nulls only: never a contrast under test)."""
    per_seed = aggregated["per_seed"]
    natural = per_seed.get("natural", {}).get("learnable_HSR")
    nulls = [v["learnable_HSR"] for m, v in per_seed.items() if m.startswith(NULL_PREFIX) and "learnable_HSR" in v]
    if not natural or not nulls:
        return None
    natural_mean = float(np.mean(list(natural.values())))
    best_null = max(float(np.mean(list(v.values()))) for v in nulls)
    above = natural_mean - best_null
    return {"natural": natural_mean, "best_null": best_null, "above_null": above,
            "delta": PAPER_RELATIVE_EFFECT * above if above > 0 else None}


def findings(aggregated: dict, unlearning_method: str = "lower_bounded") -> list[dict]:
    """The five findings of PAPER.md and the rewritten branch (rules in the module docstring and each check's rule
    string; d(X; a - b) is the paired contrast of metric X between models a and b)."""
    d = Contrasts(aggregated)
    per_seed = aggregated["per_seed"]
    margin = ni_margin(aggregated)
    delta = margin["delta"] if margin else None

    def missing(*models):
        absent = [m for m in models if m not in per_seed]
        return f"not run: {', '.join(absent)}" if absent else None

    def directional(metric: str, a: str, b: str, sign: int) -> dict:
        stats = d.diff(metric, a, b)
        rule = f"d({metric}; {a} - {b}) {'> 0' if sign > 0 else '< 0' if sign < 0 else '!= 0 (two-sided)'}"
        return _check(f"{metric}: {a} - {b}", rule, stats, _directional(stats, sign))

    def non_inferior(metric: str, a: str, b: str) -> dict:
        stats = d.diff(metric, a, b)
        rule = (f"d({metric}; {a} - {b}) > -delta (non-inferior; delta = "
                f"{'none' if delta is None else f'{delta:.4f}'})")
        return _check(f"{metric}: {a} - {b}", rule, stats, _non_inferior(stats, delta))

    out = []
    gain = d.diff("benchmark", "synthetic", "natural")
    did = contrast(per_seed, [("synthetic", "benchmark_synthqa_only", 1), ("natural", "benchmark_synthqa_only", -1),
                              ("synthetic", "benchmark_stated", -1), ("natural", "benchmark_stated", 1)],
                   aggregated["confidence"])
    out.append(_finding("1", "SynthQA raises the knowledge benchmark over natural; the gain sits on the facts only "
                             "SynthQA carries", [
        directional("benchmark", "synthetic", "natural", 1),
        directional("benchmark_synthqa_only", "synthetic", "natural", 1),
        _check("gain on synthqa_only - gain on stated", "d(synthqa_only; syn - nat) - d(stated; syn - nat) > 0",
               did, _directional(did, 1))], missing("natural", "synthetic")))
    out[-1]["reported"] = {"sft_benchmark: synthetic - natural": d.diff("sft_benchmark", "synthetic", "natural")}

    out.append(_finding("2", "after identical SFT, synthetic follows instructions worse (learnable tier, by greedy "
                             "generation and by likelihood) and chats worse than natural", [
        directional("learnable_HSR", "synthetic", "natural", -1),
        directional("compliance_margin", "synthetic", "natural", -1),
        directional("chat_score", "synthetic", "natural", -1)], missing("natural", "synthetic")))
    out[-1]["reported"] = {
        "HSR (out-of-distribution suite): synthetic - natural": d.diff("HSR", "synthetic", "natural"),
        "chat_preference: synthetic - natural": d.diff("chat_preference", "synthetic", "natural"),
        "learnable_HSR: synthetic - rewritten (format beyond displacement)":
            d.diff("learnable_HSR", "synthetic", "rewritten")}

    kl_ref = "rewritten" if "rewritten" in per_seed else "natural"
    out.append(_finding("3", "after SFT, the output distribution shifts toward the SynthQA template (template pull, "
                             "next-token KL)", [
        directional("template_pull", "synthetic", "natural", 1),
        directional("kl_from_natural", "synthetic", kl_ref, 1)], missing("natural", "synthetic")))
    out[-1]["reported"] = {f"{m}: synthetic - natural": d.diff(m, "synthetic", "natural")
                           for m in ("leakage", "ppl_mean", "ppl_std")}
    out.append(_finding("3b", "before SFT, the CPT model's output shifts (template leakage and pull, perplexity "
                              "distribution narrower)", [
        directional("pre_sft_leakage", "synthetic", "natural", 1),
        directional("pre_sft_template_pull", "synthetic", "natural", 1),
        directional("pre_sft_ppl_mean", "synthetic", "natural", 0),
        directional("pre_sft_ppl_std", "synthetic", "natural", -1)], missing("natural", "synthetic")))

    u = f"unlearn-{unlearning_method}"
    kept = d("benchmark", [(u, 1.0), ("synthetic", -0.5), ("natural", -0.5)])
    retention = None
    if kept is not None and gain is not None and abs(gain["mean"]) > 1e-12:
        retention = (kept["mean"] + gain["mean"] / 2) / gain["mean"]  # (acc_u - acc_nat) / (acc_syn - acc_nat)
    cost = aggregated.get("unlearning_cost", {}).get(unlearning_method)
    out.append(_finding("4", f"{u} brings instruction following back to natural's, chat above synthetic's, and keeps "
                             "most of the benchmark gain, at a small fraction of the CPT cost", [
        non_inferior("learnable_HSR", u, "natural"),
        directional("learnable_HSR", u, "synthetic", 1),
        directional("compliance_margin", u, "synthetic", 1),
        directional("chat_score", u, "synthetic", 1),
        _check(f"benchmark: {u} - (synthetic + natural)/2",
               f"retention >= 0.5, i.e. d(benchmark; {u} - (synthetic + natural)/2) > 0, given a significant gain",
               kept, _directional(kept, 1) if _directional(gain, 1) else None, retention=retention)],
        missing("natural", "synthetic", u)))
    out[-1]["unlearning_tokens_fraction_of_cpt"] = None if cost is None else cost["mean"]

    out.append(_finding("5", "more natural data recovers only part of the loss: learnable HSR of more_natural "
                             "between synthetic's and natural's", [
        directional("learnable_HSR", "more_natural", "synthetic", 1),
        directional("learnable_HSR", "natural", "more_natural", 1)], missing("natural", "synthetic", "more_natural")))

    out.append(_finding("6", "rewritten (SynthQA's facts in diverse formats) gives the benchmark gain without the "
                             "instruction-following loss", [
        directional("benchmark", "rewritten", "natural", 1),
        non_inferior("learnable_HSR", "rewritten", "natural")], missing("natural", "rewritten")))
    out[1]["power"] = power(aggregated, out[1])
    for f in out:
        f["ni_margin"] = margin
    return out


def power(aggregated: dict, finding: dict) -> list[dict]:
    """Could these seeds see the paper's effect? For finding 2's likelihood and generation endpoints: natural's
    value above its null (learnable HSR: the best null reply; compliance margin: the margin with the instruction
    sentence removed), the paper's relative effect of it (the size to detect), and the check's minimum detectable
    difference; `detectable` when the MDD is at most that size. Natural and nulls only, as the margin."""
    per_seed = aggregated["per_seed"]
    natural = per_seed.get("natural", {})

    def mean(values: dict | None) -> float | None:
        return float(np.mean(list(values.values()))) if values else None

    above = {}
    hsr, nulls = mean(natural.get("learnable_HSR")), [mean(v.get("learnable_HSR")) for m, v in per_seed.items()
                                                       if m.startswith(NULL_PREFIX)]
    if hsr is not None and any(n is not None for n in nulls):
        above["learnable_HSR"] = hsr - max(n for n in nulls if n is not None)
    margin, margin_null = mean(natural.get("compliance_margin")), mean(natural.get("compliance_margin_null"))
    if margin is not None and margin_null is not None:
        above["compliance_margin"] = margin - margin_null
    rows = []
    for check in finding["checks"]:
        metric = check["check"].split(":")[0]
        if metric in above:
            size = PAPER_RELATIVE_EFFECT * above[metric] if above[metric] > 0 else None
            rows.append({"endpoint": metric, "natural_above_null": above[metric], "paper_effect_here": size,
                         "mdd": check["mdd"],
                         "detectable": None if size is None or check["mdd"] is None else check["mdd"] <= size})
    return rows


def _verdict(v: bool | None) -> str:
    return {True: "reproduces", False: "does not reproduce (reversed)", None: "inconclusive"}[v]


def _interval(value, ci) -> str:
    return "" if value is None else f"{value:+.4g} [{ci[0]:+.4g}, {ci[1]:+.4g}]"


def _size(stats_or_check: dict) -> str:
    n, items = stats_or_check.get("n"), stats_or_check.get("items")
    return "" if n is None else f"{n}" + (f" ({items} items)" if items else "")


def _mdd(value) -> str:
    return "" if value is None else f"{value:.4g}"


def write_findings(found: list[dict], out_dir, confidence: float = 0.95, seeds=()) -> None:
    """findings.json (as returned by `findings`) and findings.md: the primary endpoints and the margin, one row per
    finding, then one row per check with its minimum detectable difference, then what is reported untested."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "findings.json", found)
    margin = found[0].get("ni_margin") if found else None
    lines = [f"# Findings across seeds ({', '.join(map(str, seeds)) or '?'}; {confidence:.0%} intervals)", "",
             f"Primary endpoints: {', '.join(PRIMARY)}. Per-item endpoints ({', '.join(ITEM_METRICS)}) are "
             "contrasted item by item within seeds and combined over seeds (random effects, Student t on k - 1 "
             "degrees of freedom); the others by the Student t interval of per-seed differences. MDD: the minimum "
             "detectable difference at these seeds (two-sided 5%, power 80%)."]
    if margin:
        paper = margin["delta"]
        lines += ["", f"Non-inferiority margin delta = {PAPER_RELATIVE_EFFECT:.1%} (the paper's relative HSR loss) "
                      f"x natural's learnable HSR above the best null ({margin['natural']:.3f} - "
                      f"{margin['best_null']:.3f} = {margin['above_null']:.3f}) = "
                      f"{'none' if paper is None else f'{paper:.4f}'}; the paper's effect at this scale is -delta."]
    lines += ["", "| # | claim | primary check | mean [CI] | seeds | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['id']} | {f['claim']} | {f['metric']} | {_interval(f['value'], f['ci'])} | {f['n'] or ''} | "
              f"{_verdict(f['reproduces'])}{' (' + f['note'] + ')' if f['note'] else ''} |" for f in found]
    lines += ["", "## Checks", "", "| # | check | mean [CI] | seeds | MDD | verdict | rule |",
              "|---|---|---|---|---|---|---|"]
    for f in found:
        for ch in f["checks"]:
            extra = f" (retention {ch['retention']:.2f})" if ch.get("retention") is not None else ""
            lines.append(f"| {f['id']} | {ch['check']} | {_interval(ch['value'], ch['ci'])}{extra} | {_size(ch)} | "
                         f"{_mdd(ch['mdd'])} | {_verdict(ch['reproduces'])} | {ch['rule']} |")
    rows = next((f.get("power") for f in found if f["id"] == "2"), None)
    if rows:
        lines += ["", "## Power: could these seeds see the paper's effect? (finding 2)", "",
                  "| endpoint | natural above its null | paper's effect here (13% of that) | MDD | detectable |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['endpoint']} | {r['natural_above_null']:.4g} | {_mdd(r['paper_effect_here'])} | "
                  f"{_mdd(r['mdd'])} | {'' if r['detectable'] is None else 'yes' if r['detectable'] else 'no'} |"
                  for r in rows]
    lines += ["", "## Reported, not tested", "", "| # | contrast | mean [CI] | seeds | MDD |", "|---|---|---|---|---|"]
    for f in found:
        for name, stats in (f.get("reported") or {}).items():
            if stats is not None:
                lines.append(f"| {f['id']} | {name} | {_interval(stats['mean'], (stats['low'], stats['high']))} | "
                             f"{_size(stats)} | {_mdd(stats.get('mdd'))} |")
    cost = next((f.get("unlearning_tokens_fraction_of_cpt") for f in found if f["id"] == "4"), None)
    if cost:
        lines += ["", f"Unlearning cost (finding 4): forget + replay tokens = {cost:.4f} of the CPT tokens "
                      f"(about 1/{1 / cost:.0f}), mean over seeds."]
    lines += ["", "A finding reproduces when every check does; `inconclusive` means an interval contains 0 (or one "
                  "seed only): more seeds, not a different rule, would settle it, and the MDD says how large a "
                  "difference these seeds could have shown."]
    write_text_atomic(out / "findings.md", "\n".join(lines) + "\n")
