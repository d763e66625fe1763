"""The paper's findings, each tested with its rule written down before the data (docs/preregistration.md; the
constants in :mod:`synthflaw.reporting.preregistration`, the labels in :mod:`synthflaw.reporting.verdicts`).

Each finding has a primary family of at most two checks (`preregistration.PRIMARY`), Holm-adjusted within it; every
other check is exploratory. The positive control (finding C, `harmed - natural`) comes first: a "paper-sized effect
excluded" verdict on an endpoint needs the control detected on it.

How a contrast is estimated. An endpoint measured per item (`ITEM_METRICS`) is contrasted item by item within each
seed (paired: both models answered the same items), and the seeds' estimates are combined by a random-effects
meta-analysis with a Student t interval on k - 1 degrees of freedom (:func:`synthflaw.metrics.statistics.
combine_seeds`); other metrics (perplexity spread, KL) by the Student t interval of the per-seed differences. Every
check also states its minimum detectable difference at this many seeds (two-sided 5%, power 80%).

Verdicts. Each check keeps `reproduces` (True when its unadjusted interval excludes 0 on the claimed side, False on
the other side, None otherwise or with one seed) and gets `verdict`, the pre-registered label after Holm.
"Not worse than natural" is a non-inferiority check with a margin fixed in advance, never "not significantly
below": its lower bound must lie above -delta. The margins (the paper-sized effect in each endpoint's units) are the
pre-registered ones (`preregistration.MARGINS`) for the preset they were registered on; for any other preset
they are derived from the run's natural model and nulls only (13% of natural above its null) and say so. A
finding's `reproduces` is the three-valued AND of its primary checks, its `verdict` their combined label.
"""

from __future__ import annotations

import numpy as np

from synthflaw.metrics.statistics import (
    contrast,
    item_contrast,
    minimum_detectable_difference,
)
from synthflaw.reporting import verdicts
from synthflaw.reporting.preregistration import (
    ALPHA,
    CONTROL,
    PAPER_RELATIVE_EFFECT,
    PRIMARY,
    STUDY_FINDINGS,
)
from synthflaw.reporting.tables import NULL_PREFIX

# Bounds closer to 0 than this count as 0: equal metrics read from two files can differ by float rounding only.
ZERO = 1e-12
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


def _check(name: str, rule: str, stats: dict | None, verdict: bool | None, *, kind: str = "directional",
           sign: int = 1, delta: float | None = None, **extra) -> dict:
    if kind == "non_inferior":  # H0: d <= -delta; no reverse direction to test
        p_claim, p_reverse = (None if delta is None else verdicts.one_sided_p(stats, 1, -delta)), None
    else:
        p_claim = verdicts.one_sided_p(stats, sign)
        p_reverse = None if sign == 0 else verdicts.one_sided_p(stats, -sign)
    return {"check": name, "value": None if stats is None else stats["mean"],
            "ci": None if stats is None else [stats["low"], stats["high"]], "n": None if stats is None else stats["n"],
            "items": None if stats is None else stats.get("items"), "mdd": None if stats is None else stats.get("mdd"),
            "method": None if stats is None else ("items" if "items" in stats else "seeds"),
            "reproduces": verdict, "rule": rule, "kind": kind, "sign": sign, "delta": delta, "p": p_claim,
            "p_reverse": p_reverse, "_stats": stats, **extra}


def _finding(fid: str, claim: str, checks: list[dict], note: str | None = None,
             detected: dict[str, bool | None] | None = None) -> dict:
    """A finding from its checks: the primary family (`PRIMARY[fid]`) Holm-adjusted and labelled, the others
    labelled exploratory on their unadjusted p; `detected`: endpoint -> whether the positive control was."""
    family = PRIMARY.get(fid, ())
    primary = [c for c in checks if c["check"] in family]
    for key in ("p", "p_reverse"):
        for c, adjusted in zip(primary, verdicts.holm([c[key] for c in primary])):
            c[f"{key}_holm"] = adjusted
    for c in checks:
        c["primary"] = adjusted = c["check"] in family
        endpoint = c["check"].split(":")[0]
        c["verdict"] = verdicts.label(c["kind"], c.pop("_stats"), c["sign"], c["delta"],
                                      c["p_holm"] if adjusted else c["p"],
                                      c["p_reverse_holm"] if adjusted else c["p_reverse"],
                                      (detected or {}).get(endpoint))
    checks = primary + [c for c in checks if not c["primary"]]
    head = checks[0]
    return {"id": fid, "claim": claim, "metric": head["check"], "value": head["value"], "ci": head["ci"],
            "n": head["n"], "reproduces": _all(c["reproduces"] for c in primary),
            "verdict": verdicts.combine([c["verdict"] for c in primary]) if primary else verdicts.INCONCLUSIVE,
            "rule": "; AND ".join(c["rule"] for c in primary), "checks": checks, "note": note}


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
    """Natural's learnable HSR above the best null (means over seeds; natural and nulls only, never a contrast under
    test) and `PAPER_RELATIVE_EFFECT` of it: the margin a run derives for itself when none is pre-registered."""
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


def run_margins(aggregated: dict) -> dict[str, float]:
    """Paper-sized effects derived from the run itself (natural and nulls only): learnable HSR and compliance margin
    13% of natural's value above its null, chat preference 13% of natural's (already measured against the better of
    two trivial replies)."""
    natural = aggregated["per_seed"].get("natural", {})

    def mean(metric):
        values = natural.get(metric)
        return float(np.mean(list(values.values()))) if values else None

    out = {}
    hsr = ni_margin(aggregated)
    if hsr and hsr["delta"]:
        out["learnable_HSR"] = hsr["delta"]
    margin, null = mean("compliance_margin"), mean("compliance_margin_null")
    if margin is not None and null is not None and margin > null:
        out["compliance_margin"] = PAPER_RELATIVE_EFFECT * (margin - null)
    preference = mean("chat_preference")
    if preference is not None and preference > 0:
        out["chat_preference"] = PAPER_RELATIVE_EFFECT * preference
    return out


class _Rules:
    """The checks of one aggregate under its margins: d(metric; a - b) tested directionally or for non-inferiority,
    and which models a finding needs that did not run."""

    def __init__(self, aggregated: dict, margins: dict[str, float]):
        self.d, self.per_seed, self.margins = Contrasts(aggregated), aggregated["per_seed"], margins
        self.confidence = aggregated["confidence"]

    def missing(self, *models) -> str | None:
        absent = [m for m in models if m not in self.per_seed]
        return f"not run: {', '.join(absent)}" if absent else None

    def directional(self, metric: str, a: str, b: str, sign: int) -> dict:
        stats = self.d.diff(metric, a, b)
        rule = f"d({metric}; {a} - {b}) {'> 0' if sign > 0 else '< 0' if sign < 0 else '!= 0 (two-sided)'}"
        return _check(f"{metric}: {a} - {b}", rule, stats, _directional(stats, sign), sign=sign,
                      delta=self.margins.get(metric))

    def non_inferior(self, metric: str, a: str, b: str) -> dict:
        delta = self.margins.get(metric)
        stats = self.d.diff(metric, a, b)
        rule = (f"d({metric}; {a} - {b}) > -delta (non-inferior; delta = "
                f"{'none' if delta is None else f'{delta:.4f}'})")
        return _check(f"{metric}: {a} - {b}", rule, stats, _non_inferior(stats, delta), kind="non_inferior",
                      delta=delta)


def findings(aggregated: dict, unlearning_method: str = "lower_bounded",
             margins: dict[str, float] | None = None) -> list[dict]:
    """The positive control and the paper's findings (rules in the module docstring, docs/preregistration.md and
    each check's rule string; d(X; a - b) is the paired contrast of metric X between models a and b). `margins`:
    the pre-registered paper-sized effects per endpoint, used where the positive control ran (the registration's rules
    need it); otherwise, or with None, they are derived from the run (`run_margins`) and said to be."""
    registered = margins is not None and CONTROL in aggregated["per_seed"]
    rules = _Rules(aggregated, dict(margins) if registered else run_margins(aggregated))
    control = _positive_control(rules)
    detected = control["detected"]
    out = [control, *_after_sft(rules, detected), *_output_shift(rules),
           _unlearning(rules, aggregated, unlearning_method, detected), *_more_data(rules, detected)]
    two = next(f for f in out if f["id"] == "2")
    two["power"] = power(aggregated, two, rules.margins if registered else None)
    study_wide(out)
    margin = ni_margin(aggregated)
    for f in out:
        f["ni_margin"] = margin
        f["margins"] = {"values": rules.margins, "registered": registered}
    return out


def study_wide(found: list[dict]) -> None:
    """Holm across the findings of `STUDY_FINDINGS` (docs/preregistration.md, amendment 1): each finding's p is its
    primary family's as an intersection-union test, the largest Holm-adjusted one-sided p of its primary checks, or
    1 where its verdict is not "reproduces" (a gated or missing check, a reversed one); `study_p` is that p adjusted
    across the findings, `study_wide` whether it is below ALPHA / 2. The positive control gets neither."""
    family = [f for f in found if f["id"] in STUDY_FINDINGS]
    for f in family:
        ps = [c.get("p_holm") for c in f["checks"] if c["primary"]]
        f["finding_p"] = (max(ps) if f["verdict"] == verdicts.REPRODUCES and ps and None not in ps else 1.0)
    for f, adjusted in zip(family, verdicts.holm([f["finding_p"] for f in family])):
        f["study_p"] = adjusted
        f["study_wide"] = adjusted < ALPHA / 2


def _positive_control(rules: _Rules) -> dict:
    """Finding C, harmed - natural, with the endpoints it detected and its exchange rate (margin per unit HSR)."""
    control = _finding("C", "positive control: SFT with a share of its replies ignoring one instruction "
                            "(harmed) follows instructions worse than natural; the instrument can see a harm",
                       [rules.directional(m, CONTROL, "natural", -1) for m in ("learnable_HSR", "compliance_margin",
                                                                                "HSR", "chat_preference")],
                       rules.missing("natural", CONTROL))
    # detected: the control's check reproduces under the rules (Holm within its primary family)
    detected = ({c["check"].split(":")[0]: c["verdict"] == verdicts.REPRODUCES for c in control["checks"]}
                if CONTROL in rules.per_seed else {})
    hsr_effect, margin_effect = (rules.d.diff(m, CONTROL, "natural") for m in ("learnable_HSR", "compliance_margin"))
    if hsr_effect is not None and margin_effect is not None and abs(hsr_effect["mean"]) > ZERO:
        control["exchange_rate"] = margin_effect["mean"] / hsr_effect["mean"]  # margin (nats/token) per unit HSR
    control["detected"] = detected
    return control


def _after_sft(rules: _Rules, detected: dict) -> list[dict]:
    """Findings 1 (the benchmark gain and where it sits), 2 (instruction following) and 2c (chat)."""
    directional, missing = rules.directional, rules.missing("natural", "synthetic")
    did = contrast(rules.per_seed, [("synthetic", "benchmark_synthqa_only", 1),
                                    ("natural", "benchmark_synthqa_only", -1),
                                    ("synthetic", "benchmark_stated", -1), ("natural", "benchmark_stated", 1)],
                   rules.confidence)
    one = _finding("1", "SynthQA raises the knowledge benchmark over natural; the gain sits on the facts only "
                        "SynthQA carries", [
        directional("benchmark", "synthetic", "natural", 1),
        directional("benchmark_synthqa_only", "synthetic", "natural", 1),
        _check("gain on synthqa_only - gain on stated", "d(synthqa_only; syn - nat) - d(stated; syn - nat) > 0",
               did, _directional(did, 1))], missing, detected)
    one["reported"] = {"sft_benchmark: synthetic - natural": rules.d.diff("sft_benchmark", "synthetic", "natural")}
    two = _finding("2", "after identical SFT, synthetic follows instructions worse than natural (learnable tier, "
                        "by greedy generation and by likelihood)", [
        directional("learnable_HSR", "synthetic", "natural", -1),
        directional("compliance_margin", "synthetic", "natural", -1)], missing, detected)
    two["reported"] = {
        "HSR (out-of-distribution suite): synthetic - natural": rules.d.diff("HSR", "synthetic", "natural"),
        "learnable_HSR: synthetic - rewritten (format beyond displacement)":
            rules.d.diff("learnable_HSR", "synthetic", "rewritten")}
    chat = _finding("2c", "after identical SFT, synthetic chats worse than natural", [
        directional("chat_preference", "synthetic", "natural", -1),
        directional("chat_score", "synthetic", "natural", -1)], missing, detected)
    return [one, two, chat]


def _output_shift(rules: _Rules) -> list[dict]:
    """Findings 3 (after SFT) and 3b (before SFT): the output shifts toward the SynthQA template."""
    directional = rules.directional
    # The KL is measured from natural's SFT model: natural's own is 0 by construction, so the check needs another
    # model as its reference (rewritten) and is left out where none ran.
    shift = [directional("template_pull", "synthetic", "natural", 1)]
    if "rewritten" in rules.per_seed:
        shift.append(directional("kl_from_natural", "synthetic", "rewritten", 1))
    three = _finding("3", "after SFT, the output distribution shifts toward the SynthQA template (template pull, "
                          "next-token KL)", shift,
                     rules.missing("natural", "synthetic") or (None if "rewritten" in rules.per_seed else
                                                               "KL check not run: needs the rewritten branch"))
    three["reported"] = {f"{m}: synthetic - natural": rules.d.diff(m, "synthetic", "natural")
                         for m in ("leakage", "ppl_mean", "ppl_std", "kl_from_natural")}
    before = _finding("3b", "before SFT, the CPT model's output shifts (template leakage and pull, perplexity "
                            "distribution narrower)", [
        directional("pre_sft_template_pull", "synthetic", "natural", 1),
        directional("pre_sft_ppl_std", "synthetic", "natural", -1),
        directional("pre_sft_leakage", "synthetic", "natural", 1),
        directional("pre_sft_ppl_mean", "synthetic", "natural", 0)], rules.missing("natural", "synthetic"))
    return [three, before]


def _unlearning(rules: _Rules, aggregated: dict, method: str, detected: dict) -> dict:
    """Finding 4: the unlearned model against natural (non-inferior) and synthetic, and the benchmark gain kept."""
    u = f"unlearn-{method}"
    gain = rules.d.diff("benchmark", "synthetic", "natural")
    kept = rules.d("benchmark", [(u, 1.0), ("synthetic", -0.5), ("natural", -0.5)])
    retention = None
    if kept is not None and gain is not None and abs(gain["mean"]) > 1e-12:
        retention = (kept["mean"] + gain["mean"] / 2) / gain["mean"]  # (acc_u - acc_nat) / (acc_syn - acc_nat)
    cost = aggregated.get("unlearning_cost", {}).get(method)
    four = _finding("4", f"{u} brings instruction following back to natural's, chat above synthetic's, and keeps "
                         "most of the benchmark gain, at a small fraction of the CPT cost", [
        rules.non_inferior("learnable_HSR", u, "natural"),
        _check(f"benchmark: {u} - (synthetic + natural)/2",
               f"retention >= 0.5, i.e. d(benchmark; {u} - (synthetic + natural)/2) > 0, given a significant gain",
               kept, _directional(kept, 1) if _directional(gain, 1) else None, retention=retention),
        rules.directional("learnable_HSR", u, "synthetic", 1),
        rules.directional("compliance_margin", u, "synthetic", 1),
        rules.directional("chat_preference", u, "synthetic", 1)],
        rules.missing("natural", "synthetic", u), detected)
    four["unlearning_tokens_fraction_of_cpt"] = None if cost is None else cost["mean"]
    if _directional(gain, 1) is not True:  # retention has no meaning without a gain to retain
        for c in four["checks"]:
            if c["check"].startswith("benchmark:"):
                c["verdict"] = verdicts.INCONCLUSIVE
        four["verdict"] = verdicts.combine([c["verdict"] for c in four["checks"] if c["primary"]])
    return four


def _more_data(rules: _Rules, detected: dict) -> list[dict]:
    """Findings 5 (more natural data recovers part of the loss) and 6 (rewritten keeps the gain without the loss)."""
    five = _finding("5", "more natural data recovers only part of the loss: learnable HSR of more_natural "
                         "between synthetic's and natural's", [
        rules.directional("learnable_HSR", "more_natural", "synthetic", 1),
        rules.directional("learnable_HSR", "natural", "more_natural", 1)],
        rules.missing("natural", "synthetic", "more_natural"), detected)
    six = _finding("6", "rewritten (SynthQA's facts in diverse formats) gives the benchmark gain without the "
                        "instruction-following loss", [
        rules.directional("benchmark", "rewritten", "natural", 1),
        rules.non_inferior("learnable_HSR", "rewritten", "natural")], rules.missing("natural", "rewritten"), detected)
    return [five, six]


def power(aggregated: dict, finding: dict, registered: dict[str, float] | None = None) -> list[dict]:
    """Could these seeds see the paper's effect? For finding 2's likelihood and generation endpoints: natural's
    value above its null (learnable HSR: the best null reply; compliance margin: the margin with the instruction
    sentence removed), the size to detect, and the check's minimum detectable difference; `detectable` when the MDD
    is at most that size. The size is the registered paper-sized effect where the run is judged by registered
    margins (`registered`: the same values its verdicts use), else the paper's relative effect of natural above its
    null (natural and nulls only, as the margin)."""
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
            if registered is not None:
                size = registered.get(metric)
            else:
                size = PAPER_RELATIVE_EFFECT * above[metric] if above[metric] > 0 else None
            rows.append({"endpoint": metric, "natural_above_null": above[metric], "paper_effect_here": size,
                         "registered": registered is not None,
                         "mdd": check["mdd"],
                         "detectable": None if size is None or check["mdd"] is None else check["mdd"] <= size})
    return rows
