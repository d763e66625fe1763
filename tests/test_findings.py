"""synthflaw.reporting.findings' verdict rules on hand-built intervals and aggregates: the directional and
non-inferiority checks, the three-valued AND, the non-inferiority margin, and the gate of finding 4's retention
check on finding 1's gain.

tests/test_aggregate.py runs the findings on whole fake multi-seed studies; here each rule gets the few numbers
that decide it, so a flipped comparison fails a test of its own.
"""

import json

import numpy as np
import pytest

from synthflaw.reporting import findings, findings_report
from synthflaw.reporting.tables import NULL_PREFIX

U = "unlearn-lower_bounded"


def ci(low, high, single_seed=False):
    return {"low": low, "high": high, "mean": (low + high) / 2, "n": 3, "single_seed": single_seed}


ABOVE, BELOW, AROUND = ci(0.1, 0.3), ci(-0.3, -0.1), ci(-0.1, 0.2)


@pytest.mark.parametrize("stats, sign, expected", [
    (ABOVE, 1, True), (ABOVE, -1, False), (ABOVE, 0, True),
    (BELOW, 1, False), (BELOW, -1, True), (BELOW, 0, True),
    (AROUND, 1, None), (AROUND, -1, None), (AROUND, 0, None),
    (ci(0.0, 0.2), 1, None), (ci(-0.2, 0.0), -1, None), (ci(-0.2, 0.0), 1, None),  # a bound at 0 excludes nothing
    (ci(1e-13, 0.2), 1, None), (ci(-0.2, -1e-13), 0, None),  # closer to 0 than ZERO counts as 0 (float rounding)
    (ci(1e-12, 0.2), 1, None), (ci(-0.2, -1e-12), 1, None),  # exactly ZERO away: still 0
    (ci(1e-12, 0.2), 0, None), (ci(-0.2, -1e-12), 0, None),
    (ci(2e-12, 0.2), 1, True), (ci(-0.2, -2e-12), 0, True), (ci(-0.2, -2e-12), 1, False),
    (ci(0.1, 0.3, single_seed=True), 1, None), (None, 1, None), (None, 0, None),
])
def test_directional_above_below_and_around_zero(stats, sign, expected):
    assert findings._directional(stats, sign) is expected


@pytest.mark.parametrize("low, high, delta, expected", [
    (-0.05, 0.1, 0.1, True),  # lower bound above -delta
    (-0.15, 0.1, 0.1, None),  # straddles -delta: "not significantly below" is not enough
    (-0.3, -0.15, 0.1, False),  # the whole interval below -delta
    (-0.1, 0.1, 0.1, None), (-0.3, -0.1, 0.1, None),  # a bound exactly at -delta settles nothing
    (-0.05, 0.1, None, None),  # no margin
])
def test_non_inferior_against_the_margin(low, high, delta, expected):
    assert findings._non_inferior(ci(low, high), delta) is expected
    assert findings._non_inferior(ci(low, high, single_seed=True), delta) is None
    assert findings._non_inferior(None, delta) is None


@pytest.mark.parametrize("verdicts, expected", [
    ([True, True], True), ([True, None], None), ([True, False], False), ([None, False], False), ([None], None),
    ([], None), (iter([True, True]), True),
])
def test_three_valued_and(verdicts, expected):
    assert findings._all(verdicts) is expected


def seeds(*values):
    return {str(s): v for s, v in enumerate(values)}


def aggregate(benchmark: dict, **extra) -> dict:
    """An aggregate with per-seed benchmark values only (no item records: contrasts over per-seed values)."""
    per_seed = {model: {"benchmark": seeds(*values)} for model, values in benchmark.items()}
    for model, metrics in extra.items():
        per_seed.setdefault(model, {}).update({m: seeds(*v) for m, v in metrics.items()})
    return {"per_seed": per_seed, "confidence": 0.95}


def finding(found, fid):
    return next(f for f in found if f["id"] == fid)


def retention_check(found):
    return next(c for c in finding(found, "4")["checks"] if c["check"].startswith("benchmark:"))


def test_retention_is_tested_only_when_finding_1s_gain_is_significant():
    kept_well = (0.80, 0.80, 0.80)  # far above (synthetic + natural) / 2 in every seed
    natural = (0.40, 0.42, 0.41)
    # the gain synthetic - natural per seed (0.20, -0.10, 0.05): its interval contains 0
    noisy = findings.findings(aggregate({"natural": natural, "synthetic": (0.60, 0.32, 0.46), U: kept_well}))
    assert finding(noisy, "1")["checks"][0]["reproduces"] is None
    check = retention_check(noisy)
    assert check["ci"][0] > 0  # kept - (syn + nat) / 2 = (0.30, 0.43, 0.365): significant on its own
    assert check["reproduces"] is None  # but untested, as the gain is not significant
    assert check["verdict"] == "inconclusive"  # the label too, not only the three-valued flag
    assert "given a significant gain" in check["rule"]
    # a significantly negative gain does not open the gate either
    lost = findings.findings(aggregate({"natural": natural, "synthetic": (0.30, 0.31, 0.32), U: kept_well}))
    assert finding(lost, "1")["checks"][0]["reproduces"] is False and retention_check(lost)["reproduces"] is None
    assert retention_check(lost)["verdict"] == "inconclusive"
    # the same kept benchmark with a significant gain (0.10, 0.11, 0.12): tested, and it reproduces
    clear = findings.findings(aggregate({"natural": natural, "synthetic": (0.50, 0.53, 0.53), U: kept_well}))
    assert finding(clear, "1")["checks"][0]["reproduces"] is True
    assert retention_check(clear)["reproduces"] is True
    # retention = (acc_u - acc_nat) / (acc_syn - acc_nat) on the means: (0.80 - 0.41) / (0.52 - 0.41)
    assert retention_check(clear)["retention"] == pytest.approx(0.39 / 0.11)


def test_retention_below_half_is_a_reversed_check_given_a_significant_gain():
    # u keeps none of the gain: u - (syn + nat) / 2 = (-0.05, -0.055, -0.06) < 0
    found = findings.findings(aggregate({"natural": (0.40, 0.42, 0.41), "synthetic": (0.50, 0.53, 0.53),
                                         U: (0.40, 0.42, 0.41)}))
    check = retention_check(found)
    assert check["reproduces"] is False and check["retention"] == pytest.approx(0.0, abs=1e-9)
    assert finding(found, "4")["reproduces"] is False  # one reversed check reverses the finding


def test_finding_4_without_a_gain_has_no_retention():
    same = findings.findings(aggregate({"natural": (0.4, 0.4, 0.4), "synthetic": (0.4, 0.4, 0.4),
                                        U: (0.5, 0.5, 0.5)}))
    assert retention_check(same)["retention"] is None and retention_check(same)["reproduces"] is None
    # a gain of 1e-12 (exactly, in floats) still counts as none: no retention to divide by it
    tiny = findings.findings(aggregate({"natural": (0.0, 0.0, 0.0), "synthetic": (1e-12, 1e-12, 1e-12),
                                        U: (0.5, 0.5, 0.5)}))
    assert finding(tiny, "1")["value"] == 1e-12 and retention_check(tiny)["retention"] is None


def test_ni_margin_is_the_papers_share_of_natural_above_its_best_null():
    agg = aggregate({}, natural={"learnable_HSR": (0.50, 0.60, 0.55)}, **{
        "null:constant": {"learnable_HSR": (0.05, 0.05, 0.05)}, "null:plain": {"learnable_HSR": (0.10, 0.20, 0.15)},
        "synthetic": {"learnable_HSR": (0.9, 0.9, 0.9)}})  # a model under test never sets the margin
    margin = findings.ni_margin(agg)
    assert margin["natural"] == pytest.approx(0.55) and margin["best_null"] == pytest.approx(0.15)
    assert margin["above_null"] == pytest.approx(0.40)
    assert margin["delta"] == pytest.approx(findings.PAPER_RELATIVE_EFFECT * 0.40)
    assert findings.PAPER_RELATIVE_EFFECT == pytest.approx((27.58 - 24.00) / 27.58)
    assert NULL_PREFIX == "null:"  # the nulls' names above
    below = findings.ni_margin(aggregate({}, natural={"learnable_HSR": (0.1, 0.1, 0.1)},
                                         **{"null:constant": {"learnable_HSR": (0.2, 0.2, 0.2)}}))
    assert below["above_null"] == pytest.approx(-0.1) and below["delta"] is None  # natural not above its null
    assert findings.ni_margin(aggregate({}, natural={"learnable_HSR": (0.5,)})) is None  # no null
    assert findings.ni_margin(aggregate({}, **{"null:constant": {"learnable_HSR": (0.1,)}})) is None  # no natural


# --- findings.md: the layout, pinned line by line on hand-built findings -------------------------------------------

LABELS = {True: "reproduces", False: "reversed", None: "inconclusive"}


def check_row(name, value, low, high, verdict, rule, n=3, items=None, mdd=None, method="seeds", primary=True,
              delta=None, p=None, **extra):
    return {"check": name, "value": value, "ci": [low, high], "n": n, "items": items, "mdd": mdd, "method": method,
            "reproduces": verdict, "rule": rule, "primary": primary, "verdict": LABELS[verdict], "delta": delta,
            "p": p, "p_holm": p, **extra}


MARGIN_ROW = {"natural": 0.55, "best_null": 0.15, "above_null": 0.4, "delta": 0.052}
FOUND = [
    {"id": "1", "claim": "gain", "metric": "benchmark: s - n", "value": 0.123456, "ci": [0.0123456, 0.2345678],
     "n": 3, "reproduces": True, "verdict": "reproduces", "rule": "d > 0", "note": None, "ni_margin": MARGIN_ROW,
     "study_p": 0.0123, "study_wide": True,
     "margins": {"values": {"learnable_HSR": 0.052}, "registered": False},
     "checks": [check_row("benchmark: s - n", 0.123456, 0.0123456, 0.2345678, True, "d(benchmark; s - n) > 0",
                          items=60, mdd=0.0412345, method="items", p=0.0061234),
                check_row("leakage: s - n", 0.1, -0.05, 0.25, None, "d(leakage; s - n) > 0", mdd=0.3, primary=False,
                          p=0.09)],
     "reported": {"sft: s - n": {"mean": -0.02, "low": -0.1, "high": 0.06, "n": 3, "mdd": 0.12}, "absent": None}},
    {"id": "2", "claim": "worse", "metric": "learnable_HSR: s - n", "value": -0.03, "ci": [-0.2, 0.14], "n": 3,
     "reproduces": None, "verdict": "inconclusive", "rule": "d < 0", "note": "not run: rewritten",
     "study_p": 1.0, "study_wide": False,
     "ni_margin": MARGIN_ROW,
     "checks": [check_row("learnable_HSR: s - n", -0.03, -0.2, 0.14, None, "d(learnable_HSR; s - n) < 0", mdd=0.25,
                          delta=0.052, p=0.4)],
     "power": [{"endpoint": "learnable_HSR", "natural_above_null": 0.4, "paper_effect_here": 0.052, "mdd": 0.25,
                "detectable": False},
               {"endpoint": "compliance_margin", "natural_above_null": -0.1, "paper_effect_here": 0.01, "mdd": 0.005,
                "detectable": True},
               {"endpoint": "other", "natural_above_null": 0.2, "paper_effect_here": None, "mdd": None,
                "detectable": None}]},
    {"id": "4", "claim": "kept", "metric": "learnable_HSR: u - n", "value": None, "ci": None, "n": None,
     "reproduces": False, "verdict": "reversed", "rule": "r", "note": None, "ni_margin": MARGIN_ROW,
     "unlearning_tokens_fraction_of_cpt": 0.02,
     "checks": [check_row("benchmark: u - (s + n)/2", -0.01, -0.03, -0.005, False, "retention >= 0.5",
                          retention=0.4)]},
]

FINDINGS_MD = [
    '# Findings across seeds (0, 1, 2; 95% intervals)',
    '',
    'Rules (docs/preregistration.md): each finding has a primary family of at most two checks, Holm-adjusted within it (one-sided at 2.5% for a directional claim); every other check is exploratory. Verdicts: reproduces | reversed | paper-sized effect excluded (the interval lies on the near side of the paper-sized effect, and the positive control was detected on that endpoint) | inconclusive (with its MDD beside the paper-sized effect). Study-wide: Holm across findings 1, 2, 2c, 3, 3b, 4, 5, 6 on each finding\'s p (the largest Holm p of its primary checks, 1 unless it reproduces); a count of findings that reproduce counts this column.',
    '',
    'Primary endpoints: learnable_HSR, compliance_margin, template_pull, pre_sft_template_pull, benchmark, chat_preference. Per-item endpoints (benchmark, benchmark_synthqa_only, benchmark_stated, learnable_HSR, compliance_margin, template_pull, pre_sft_template_pull, chat_score, chat_preference, pre_sft_leakage) are contrasted item by item within seeds (standard errors clustered by base prompt where items share one) and combined over seeds (random effects, Student t on k - 1 degrees of freedom); the others by the Student t interval of per-seed differences. MDD: the minimum detectable difference at these seeds (two-sided 5%, power 80%).',
    '',
    "Paper-sized effects (the margins of 'no worse than' claims), derived from this run's natural model and nulls (13.0% of natural above its null), not pre-registered: learnable_HSR 0.052.",
    '',
    "Natural's learnable HSR above the best null: 0.550 - 0.150 = 0.400.",
    '',
    '| # | claim | primary check | mean [CI] | seeds | verdict | study-wide (Holm p) |',
    '|---|---|---|---|---|---|---|',
    '| 1 | gain | benchmark: s - n | +0.1235 [+0.01235, +0.2346] | 3 | reproduces | reproduces (0.0123) |',
    '| 2 | worse | learnable_HSR: s - n | -0.03 [-0.2, +0.14] | 3 | inconclusive (MDD 0.25 vs paper-sized 0.052) (not run: rewritten) | no (1) |',
    '| 4 | kept | learnable_HSR: u - n |  |  | reversed |  |',
    '',
    '## Checks',
    '',
    '| # | check | family | mean [CI] | seeds | MDD | p (Holm) | verdict | rule |',
    '|---|---|---|---|---|---|---|---|---|',
    '| 1 | benchmark: s - n | primary | +0.1235 [+0.01235, +0.2346] | 3 (60 items) | 0.04123 | 0.00612 | reproduces | d(benchmark; s - n) > 0 |',
    '| 1 | leakage: s - n | exploratory | +0.1 [-0.05, +0.25] | 3 | 0.3 | 0.09 | inconclusive (MDD 0.3) | d(leakage; s - n) > 0 |',
    '| 2 | learnable_HSR: s - n | primary | -0.03 [-0.2, +0.14] | 3 | 0.25 | 0.4 | inconclusive (MDD 0.25 vs paper-sized 0.052) | d(learnable_HSR; s - n) < 0 |',
    '| 4 | benchmark: u - (s + n)/2 | primary | -0.01 [-0.03, -0.005] (retention 0.40) | 3 |  |  | reversed | retention >= 0.5 |',
    '',
    "## Power: could these seeds see the paper's effect? (finding 2)",
    '',
    "| endpoint | natural above its null | paper's effect here (13% of that) | MDD | detectable |",
    '|---|---|---|---|---|',
    '| learnable_HSR | 0.4 | 0.052 | 0.25 | no |',
    '| compliance_margin | -0.1 | 0.01 | 0.005 | yes |',
    '| other | 0.2 |  |  |  |',
    '',
    '## Reported, not tested',
    '',
    '| # | contrast | mean [CI] | seeds | MDD |',
    '|---|---|---|---|---|',
    '| 1 | sft: s - n | -0.02 [-0.1, +0.06] | 3 | 0.12 |',
    '',
    'Unlearning cost (finding 4): forget + replay tokens = 0.0200 of the CPT tokens (about 1/50), mean over seeds.',
    '',
    '`inconclusive` means no rule was met: more seeds, not a different rule, would settle it, and the MDD says how large a difference these seeds could have shown.',
]


def test_write_findings_lays_out_the_margin_findings_checks_power_reported_and_cost(tmp_path):
    out = tmp_path / "new" / "seeds"  # folders made as needed
    findings_report.write_findings(FOUND, out, seeds=(0, 1, 2))
    assert (out / "findings.md").read_text().splitlines() == FINDINGS_MD
    assert json.loads((out / "findings.json").read_text()) == FOUND


def test_write_findings_without_findings_or_margin(tmp_path):
    findings_report.write_findings([], tmp_path / "none")
    text = (tmp_path / "none" / "findings.md").read_text()
    assert text.startswith("# Findings across seeds (?; 95% intervals)\n") and "Paper-sized effects" not in text
    assert "## Power" not in text and "Unlearning cost" not in text
    no_delta = [{**FOUND[0], "ni_margin": {**MARGIN_ROW, "above_null": -0.1, "delta": None}}]
    findings_report.write_findings(no_delta, tmp_path / "no_delta", confidence=0.9, seeds=(3,))
    text = (tmp_path / "no_delta" / "findings.md").read_text()
    assert text.startswith("# Findings across seeds (3; 90% intervals)\n")
    assert "Natural's learnable HSR above the best null: 0.550 - 0.150 = -0.100." in text


def test_the_cells_of_findings_md():
    assert [findings_report._verdict(v) for v in ("reproduces", "reversed", "inconclusive")] == [
        "reproduces", "reversed", "inconclusive"]
    assert findings_report._verdict("inconclusive", 0.0412345, 0.03) == "inconclusive (MDD 0.0412 vs paper-sized 0.03)"
    assert findings_report._verdict("inconclusive", 0.0412345) == "inconclusive (MDD 0.0412)"
    assert findings_report._verdict("reproduces", 0.0412345, 0.03) == "reproduces"
    assert findings_report._interval(0.5, [-0.25, 1.5]) == "+0.5 [-0.25, +1.5]" and findings_report._interval(None, None) == ""
    assert findings_report._interval(0.123456, (0.0123456, 2345.678)) == "+0.1235 [+0.01235, +2346]"
    assert findings_report._size({"n": 3, "items": 60}) == "3 (60 items)" and findings_report._size({"n": 3}) == "3"
    assert findings_report._size({"n": 3, "items": 0}) == "3" and findings_report._size({"n": None, "items": 5}) == ""
    assert findings_report._mdd(0.0412345) == "0.04123" and findings_report._mdd(None) == ""


# --- findings(): every finding's checks on a hand-built aggregate ---------------------------------------------------

BASE = {"benchmark": 0.4, "benchmark_synthqa_only": 0.5, "benchmark_stated": 0.3, "learnable_HSR": 0.5,
        "compliance_margin": 0.3, "compliance_margin_null": 0.0, "chat_score": 3.0, "HSR": 0.3,
        "chat_preference": 0.1, "template_pull": -5.0, "kl_from_natural": 0.0, "leakage": 0.0, "ppl_mean": 300.0,
        "ppl_std": 20.0, "pre_sft_leakage": 0.0, "pre_sft_template_pull": -3.0, "pre_sft_ppl_mean": 30.0,
        "pre_sft_ppl_std": 2.0, "sft_benchmark": 0.4}
# effects relative to natural, shaped like the paper's
EFFECTS = {
    "natural": {},
    "synthetic": {"benchmark": 0.10, "benchmark_synthqa_only": 0.20, "benchmark_stated": 0.02, "learnable_HSR": -0.10,
                  "compliance_margin": -0.10, "chat_score": -0.5, "template_pull": 2.0, "kl_from_natural": 0.3,
                  "pre_sft_leakage": 0.3, "pre_sft_template_pull": 2.0, "pre_sft_ppl_mean": 3.0,
                  "pre_sft_ppl_std": -1.0, "sft_benchmark": 0.03, "HSR": -0.04, "chat_preference": -0.06,
                  "leakage": 0.07, "ppl_mean": 8.0, "ppl_std": -9.0},
    "rewritten": {"benchmark": 0.08, "kl_from_natural": 0.05, "learnable_HSR": -0.02},
    "more_natural": {"learnable_HSR": -0.05},
    U: {"benchmark": 0.09, "learnable_HSR": 0.01, "chat_score": 0.1},
}
NOISE = {"natural": 1.0, "synthetic": -1.0, "rewritten": 0.5, "more_natural": -0.5, U: 1.5}
IDS = ["C", "1", "2", "2c", "3", "3b", "4", "5", "6"]


def study(effects=EFFECTS, sign=1.0):
    """per_seed[model][metric][seed] = base + 0.05 seed + sign * effect + 0.002 c_model * pattern: the pattern
    (-1, 0, 1), rotated per metric, sums to 0 over the 3 seeds, so a paired difference's mean is the effect's."""
    per_seed = {}
    for model, effect in effects.items():
        per_seed[model] = {
            metric: {str(s): base + 0.05 * s + sign * effect.get(metric, 0.0)
                     + 0.002 * NOISE[model] * (-1.0, 0.0, 1.0)[(s + k) % 3] for s in range(3)}
            for k, (metric, base) in enumerate(BASE.items())}
    per_seed["null:constant"] = {"learnable_HSR": {str(s): 0.05 for s in range(3)}}
    return {"per_seed": per_seed, "confidence": 0.95, "unlearning_cost": {"lower_bounded": {"mean": 0.02}}}


CHECKS = {
    "C": [(f"{m}: harmed - natural", f"d({m}; harmed - natural) < 0")
          for m in ("learnable_HSR", "compliance_margin", "HSR", "chat_preference")],
    "1": [("benchmark: synthetic - natural", "d(benchmark; synthetic - natural) > 0"),
          ("benchmark_synthqa_only: synthetic - natural", "d(benchmark_synthqa_only; synthetic - natural) > 0"),
          ("gain on synthqa_only - gain on stated", "d(synthqa_only; syn - nat) - d(stated; syn - nat) > 0")],
    "2": [("learnable_HSR: synthetic - natural", "d(learnable_HSR; synthetic - natural) < 0"),
          ("compliance_margin: synthetic - natural", "d(compliance_margin; synthetic - natural) < 0")],
    "2c": [("chat_preference: synthetic - natural", "d(chat_preference; synthetic - natural) < 0"),
           ("chat_score: synthetic - natural", "d(chat_score; synthetic - natural) < 0")],
    "3": [("template_pull: synthetic - natural", "d(template_pull; synthetic - natural) > 0"),
          ("kl_from_natural: synthetic - rewritten", "d(kl_from_natural; synthetic - rewritten) > 0")],
    "3b": [("pre_sft_template_pull: synthetic - natural", "d(pre_sft_template_pull; synthetic - natural) > 0"),
           ("pre_sft_ppl_std: synthetic - natural", "d(pre_sft_ppl_std; synthetic - natural) < 0"),
           ("pre_sft_leakage: synthetic - natural", "d(pre_sft_leakage; synthetic - natural) > 0"),
           ("pre_sft_ppl_mean: synthetic - natural", "d(pre_sft_ppl_mean; synthetic - natural) != 0 (two-sided)")],
    "4": [(f"learnable_HSR: {U} - natural", f"d(learnable_HSR; {U} - natural) > -delta (non-inferior; delta = "
                                            f"{findings.PAPER_RELATIVE_EFFECT * 0.5:.4f})"),
          (f"benchmark: {U} - (synthetic + natural)/2", f"retention >= 0.5, i.e. d(benchmark; {U} - (synthetic + "
                                                         "natural)/2) > 0, given a significant gain"),
          (f"learnable_HSR: {U} - synthetic", f"d(learnable_HSR; {U} - synthetic) > 0"),
          (f"compliance_margin: {U} - synthetic", f"d(compliance_margin; {U} - synthetic) > 0"),
          (f"chat_preference: {U} - synthetic", f"d(chat_preference; {U} - synthetic) > 0")],
    "5": [("learnable_HSR: more_natural - synthetic", "d(learnable_HSR; more_natural - synthetic) > 0"),
          ("learnable_HSR: natural - more_natural", "d(learnable_HSR; natural - more_natural) > 0")],
    "6": [("benchmark: rewritten - natural", "d(benchmark; rewritten - natural) > 0"),
          ("learnable_HSR: rewritten - natural", "d(learnable_HSR; rewritten - natural) > -delta (non-inferior; "
                                                 f"delta = {findings.PAPER_RELATIVE_EFFECT * 0.5:.4f})")],
}
CLAIMS = {  # the claims findings.md states, word for word
    "C": "positive control: SFT with a share of its replies ignoring one instruction (harmed) follows instructions "
         "worse than natural; the instrument can see a harm",
    "1": "SynthQA raises the knowledge benchmark over natural; the gain sits on the facts only SynthQA carries",
    "2": "after identical SFT, synthetic follows instructions worse than natural (learnable tier, by greedy generation "
         "and by likelihood)",
    "2c": "after identical SFT, synthetic chats worse than natural",
    "3": "after SFT, the output distribution shifts toward the SynthQA template (template pull, next-token KL)",
    "3b": "before SFT, the CPT model's output shifts (template leakage and pull, perplexity distribution narrower)",
    "4": f"{U} brings instruction following back to natural's, chat above synthetic's, and keeps most of the "
         "benchmark gain, at a small fraction of the CPT cost",
    "5": "more natural data recovers only part of the loss: learnable HSR of more_natural between synthetic's and "
         "natural's",
    "6": "rewritten (SynthQA's facts in diverse formats) gives the benchmark gain without the instruction-following "
         "loss"}


def test_every_finding_checks_what_its_rule_says_on_clear_effects():
    found = findings.findings(study())
    assert [f["id"] for f in found] == IDS
    assert {f["id"]: [(c["check"], c["rule"]) for c in f["checks"]] for f in found} == CHECKS
    assert {f["id"]: f["claim"] for f in found} == CLAIMS
    assert {f["id"]: [c["reproduces"] for c in f["checks"]] for f in found} == {
        fid: [fid != "C"] * len(checks) if fid != "C" else [None] * 4 for fid, checks in CHECKS.items()}
    assert {f["id"]: f["reproduces"] for f in found} == {**dict.fromkeys(IDS, True), "C": None}  # no harmed model
    by = {f["id"]: f for f in found}
    one = by["1"]
    assert one["metric"] == "benchmark: synthetic - natural" and one["value"] == pytest.approx(0.10)
    assert one["ci"] == one["checks"][0]["ci"] and one["n"] == 3 and one["note"] is None
    assert one["rule"] == "; AND ".join(rule for _, rule in CHECKS["1"][:2])  # the primary family's rules
    # the difference in differences: (0.20 - 0.02) per seed, exactly
    assert one["checks"][2]["value"] == pytest.approx(0.18) and one["checks"][2]["method"] == "seeds"
    def reported(finding):
        return {name: pytest.approx(stats["mean"]) for name, stats in finding["reported"].items()}

    assert reported(one) == {"sft_benchmark: synthetic - natural": 0.03}
    assert reported(by["2"]) == {
        "HSR (out-of-distribution suite): synthetic - natural": -0.04,
        "learnable_HSR: synthetic - rewritten (format beyond displacement)": -0.10 + 0.02}
    assert by["2c"]["checks"][0]["value"] == pytest.approx(-0.06)
    assert reported(by["3"]) == {"leakage: synthetic - natural": 0.07, "ppl_mean: synthetic - natural": 8.0,
                                 "ppl_std: synthetic - natural": -9.0, "kl_from_natural: synthetic - natural": 0.3}
    assert by["4"]["checks"][0]["value"] == pytest.approx(0.01)  # non-inferiority checks carry their contrast
    assert by["6"]["checks"][1]["value"] == pytest.approx(-0.02)
    four = by["4"]
    assert four["unlearning_tokens_fraction_of_cpt"] == 0.02
    assert four["checks"][1]["retention"] == pytest.approx(0.9)  # (0.09 - 0) / (0.10 - 0)
    assert [r["endpoint"] for r in by["2"]["power"]] == ["learnable_HSR", "compliance_margin"]
    assert all(f["ni_margin"] == findings.ni_margin(study()) for f in found)
    # a check's MDD over seeds: (t(0.975, 2) + t(0.8, 2)) * std / sqrt(3) of the per-seed differences
    check = by["2"]["checks"][0]
    diffs = [study()["per_seed"]["synthetic"]["learnable_HSR"][s] - study()["per_seed"]["natural"]["learnable_HSR"][s]
             for s in "012"]
    std = float(np.std(diffs, ddof=1))
    assert check["mdd"] == pytest.approx((4.302652729749462 + 1.0606601717798214) * std / np.sqrt(3))
    assert check["n"] == 3 and check["items"] is None


def test_reversed_effects_reverse_every_finding():
    found = findings.findings(study(sign=-1.0))
    # finding 4's primary family: non-inferiority to natural (-0.01 holds within the margin either way) and
    # retention (no gain to retain when the gain is reversed): not reversed; the control did not run
    assert {f["id"]: f["reproduces"] for f in found} == {**dict.fromkeys(IDS, False), "C": None, "4": None}
    assert {f["id"]: f["verdict"] for f in found}["2"] == "reversed"


def test_missing_models_are_named_and_the_kl_check_needs_another_reference():
    effects = {m: e for m, e in EFFECTS.items() if m not in ("rewritten", "more_natural")}
    found = {f["id"]: f for f in findings.findings(study(effects))}
    assert found["6"]["note"] == "not run: rewritten" and found["5"]["note"] == "not run: more_natural"
    assert found["6"]["reproduces"] is None and found["6"]["value"] is None
    assert [c["check"] for c in found["3"]["checks"]] == ["template_pull: synthetic - natural"]
    assert found["3"]["note"] == "KL check not run: needs the rewritten branch"
    assert found["1"]["note"] is None
    alone = {f["id"]: f for f in findings.findings(study({"natural": {}}))}
    assert {fid: f["note"] for fid, f in alone.items()} == {
        "C": "not run: harmed", "1": "not run: synthetic", "2": "not run: synthetic", "2c": "not run: synthetic",
        "3": "not run: synthetic", "3b": "not run: synthetic", "4": f"not run: synthetic, {U}",
        "5": "not run: synthetic, more_natural", "6": "not run: rewritten"}
    no_natural = {f["id"]: f["note"] for f in findings.findings(study({"synthetic": {}}))}
    assert no_natural == {"C": "not run: natural, harmed", "1": "not run: natural", "2": "not run: natural",
                          "2c": "not run: natural", "3": "not run: natural", "3b": "not run: natural",
                          "4": f"not run: natural, {U}", "5": "not run: natural, more_natural",
                          "6": "not run: natural, rewritten"}
    no_null = study()
    del no_null["per_seed"]["null:constant"]
    without_margin = {f["id"]: f for f in findings.findings(no_null)}
    assert without_margin["4"]["checks"][0]["rule"].endswith("(non-inferior; delta = none)")
    assert without_margin["4"]["checks"][0]["reproduces"] is None and without_margin["1"]["ni_margin"] is None
    npo = {f["id"]: f for f in findings.findings(study(), unlearning_method="npo")}
    assert npo["4"]["note"] == "not run: unlearn-npo"


def test_contrasts_go_item_by_item_where_items_are_recorded():
    agg = study()
    # seeds 0-2: synthetic answers 3 benchmark items right of 4, natural 1 (d = 1, 1, 0, 0 vs natural's 0, 0, 1...)
    items = {str(s): {"synthetic": {"benchmark/a": 1, "benchmark/b": 1, "benchmark/c": 1, "benchmark/d": 0,
                                    "chat/x": 5},
                      "natural": {"benchmark/a": 0, "benchmark/b": 1, "benchmark/c": 0, "benchmark/d": 0}}
             for s in range(3)}
    agg["items"] = {"pre_sft_correct": items}
    d = findings.Contrasts(agg)
    out = d.diff("benchmark", "synthetic", "natural")
    # per seed: d = (1, 0, 1, 0) over the 4 benchmark items (chat/x is not one): mean 0.5
    assert out["mean"] == pytest.approx(0.5) and out["items"] == 12 and out["per_seed"] == {"0": .5, "1": .5, "2": .5}
    first = findings.findings(agg)[1]["checks"][0]
    assert first["method"] == "items" and first["items"] == 12
    seeds = d.diff("learnable_HSR", "synthetic", "natural")  # no item records for it: over seeds
    assert "items" not in seeds and seeds["mean"] == pytest.approx(-0.10)
    assert d("benchmark", [("synthetic", 2.0), ("natural", -1.0)])["mean"] == pytest.approx(2 * 0.75 - 0.25)
    did = findings.findings({**study(), "confidence": 0.9})[1]["checks"][2]
    assert did["ci"][1] - did["value"] == pytest.approx(
        (findings.findings(study())[1]["checks"][2]["ci"][1] - did["value"]) * 2.919985580355516 / 4.302652729749462)
    # the aggregate's confidence reaches both kinds of contrast: t(0.95, 2) = 2.920 against t(0.975, 2) = 4.303
    d90 = findings.Contrasts({**agg, "confidence": 0.9})
    ratio = 2.919985580355516 / 4.302652729749462
    assert d90.diff("benchmark", "synthetic", "natural")["half_width"] == pytest.approx(out["half_width"] * ratio)
    over_seeds = d90.diff("learnable_HSR", "synthetic", "natural")
    assert over_seeds["half_width"] == pytest.approx(seeds["half_width"] * ratio)
    assert over_seeds["mdd"] == pytest.approx(seeds["mdd"] * (2.919985580355516 + 1.0606601717798214)
                                              / (4.302652729749462 + 1.0606601717798214))


def test_power_sets_each_endpoints_mdd_against_the_papers_effect_on_natural_above_its_null():
    agg = aggregate({}, natural={"learnable_HSR": (0.5, 0.6, 0.55), "compliance_margin": (0.3, 0.3, 0.3),
                                 "compliance_margin_null": (0.1, 0.1, 0.1)},
                    **{"null:constant": {"learnable_HSR": (0.05, 0.05, 0.05)},
                       "null:plain": {"learnable_HSR": (0.15, 0.15, 0.15)}, "null:other": {}})
    hsr_size = findings.PAPER_RELATIVE_EFFECT * (0.55 - 0.15)  # natural above the best null
    margin_size = findings.PAPER_RELATIVE_EFFECT * (np.mean([0.3] * 3) - np.mean([0.1] * 3))
    finding = {"checks": [{"check": "learnable_HSR: synthetic - natural", "mdd": hsr_size * 1.01},
                          {"check": "compliance_margin: synthetic - natural", "mdd": margin_size},  # equal: enough
                          {"check": "chat_score: synthetic - natural", "mdd": 0.01}]}  # no null: no row
    rows = findings.power(agg, finding)
    assert rows == [
        {"endpoint": "learnable_HSR", "natural_above_null": pytest.approx(0.40), "paper_effect_here":
            pytest.approx(hsr_size), "registered": False, "mdd": hsr_size * 1.01, "detectable": False},
        {"endpoint": "compliance_margin", "natural_above_null": pytest.approx(0.2),
         "paper_effect_here": margin_size, "registered": False, "mdd": margin_size, "detectable": True}]
    # judged by registered margins, the yardstick is the registered effect, the one its verdicts use
    registered = findings.power(agg, finding, {"learnable_HSR": hsr_size * 1.02, "compliance_margin": 0.001})
    assert [(r["paper_effect_here"], r["registered"], r["detectable"]) for r in registered] == [
        (hsr_size * 1.02, True, True), (0.001, True, False)]
    # natural not above its null: no size to detect; no MDD: nothing to say; no margin null: no margin row
    del agg["per_seed"]["natural"]["compliance_margin_null"]
    agg["per_seed"]["null:plain"]["learnable_HSR"] = seeds(0.55, 0.55, 0.55)
    finding["checks"][0]["mdd"] = None
    [row] = findings.power(agg, finding)
    assert row["natural_above_null"] == pytest.approx(0.0) and row["paper_effect_here"] is None
    assert row["detectable"] is None
    assert findings.power(aggregate({}), finding) == []  # no natural: no rows


def test_ni_margin_of_a_natural_level_with_its_null_is_none():
    agg = aggregate({}, natural={"learnable_HSR": (0.2, 0.2, 0.2)}, **{"null:c": {"learnable_HSR": (0.2, 0.2, 0.2)}})
    margin = findings.ni_margin(agg)
    assert margin["above_null"] == 0.0 and margin["delta"] is None


def test_study_wide_holm_runs_across_the_findings_on_each_familys_largest_p():
    found = [{"id": "C", "verdict": "reproduces", "checks": [{"primary": True, "p_holm": 0.001}]},
             {"id": "1", "verdict": "reproduces", "checks": [{"primary": True, "p_holm": 0.001},
                                                              {"primary": True, "p_holm": 0.002},
                                                              {"primary": False, "p_holm": None}]},
             {"id": "2", "verdict": "reproduces", "checks": [{"primary": True, "p_holm": 0.02}]},
             {"id": "2c", "verdict": "inconclusive", "checks": [{"primary": True, "p_holm": 0.03}]},
             {"id": "4", "verdict": "reproduces", "checks": [{"primary": True, "p_holm": 0.0001},
                                                              {"primary": True, "p_holm": None}]}]
    findings.study_wide(found)
    by = {f["id"]: f for f in found}
    assert "study_p" not in by["C"]  # the control is the instrument's check, outside the family
    # finding ps: 1 -> 0.002 (its largest), 2 -> 0.02, 2c -> 1 (not reproduced), 4 -> 1 (a primary p missing)
    assert [by[k]["finding_p"] for k in ("1", "2", "2c", "4")] == [0.002, 0.02, 1.0, 1.0]
    # Holm over four: 0.002 x 4 = 0.008; 0.02 x 3 = 0.06; the ones stay 1
    assert by["1"]["study_p"] == pytest.approx(0.008) and by["1"]["study_wide"] is True
    assert by["2"]["study_p"] == pytest.approx(0.06) and by["2"]["study_wide"] is False  # reproduces on its own
    assert by["2c"]["study_wide"] is False and by["4"]["study_wide"] is False


def test_findings_md_shows_the_study_wide_column(tmp_path):
    found = findings.findings(study())
    findings_report.write_findings(found, tmp_path, 0.95, ["0", "1", "2"])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in (tmp_path / "findings.md").read_text().splitlines()
            if line.startswith("| ") and line.count(" | ") == 6}
    assert rows["1"].endswith(f"| reproduces ({finding(found, '1')['study_p']:.3g}) |")
    assert rows["C"].endswith("|  |")  # the control: no study-wide cell
