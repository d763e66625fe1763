"""synthflaw.reporting.findings' verdict rules on hand-built intervals and aggregates: the directional and
non-inferiority checks, the three-valued AND, the non-inferiority margin, and the gate of finding 4's retention
check on finding 1's gain.

tests/test_aggregate.py runs the findings on whole fake multi-seed studies; here each rule gets the few numbers
that decide it, so a flipped comparison fails a test of its own.
"""

import json

import pytest

from synthflaw.reporting import findings
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
    return finding(found, "4")["checks"][4]


def test_retention_is_tested_only_when_finding_1s_gain_is_significant():
    kept_well = (0.80, 0.80, 0.80)  # far above (synthetic + natural) / 2 in every seed
    natural = (0.40, 0.42, 0.41)
    # the gain synthetic - natural per seed (0.20, -0.10, 0.05): its interval contains 0
    noisy = findings.findings(aggregate({"natural": natural, "synthetic": (0.60, 0.32, 0.46), U: kept_well}))
    assert finding(noisy, "1")["checks"][0]["reproduces"] is None
    check = retention_check(noisy)
    assert check["ci"][0] > 0  # kept - (syn + nat) / 2 = (0.30, 0.43, 0.365): significant on its own
    assert check["reproduces"] is None  # but untested, as the gain is not significant
    assert "given a significant gain" in check["rule"]
    # a significantly negative gain does not open the gate either
    lost = findings.findings(aggregate({"natural": natural, "synthetic": (0.30, 0.31, 0.32), U: kept_well}))
    assert finding(lost, "1")["checks"][0]["reproduces"] is False and retention_check(lost)["reproduces"] is None
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

def check_row(name, value, low, high, verdict, rule, n=3, items=None, mdd=None, method="seeds", **extra):
    return {"check": name, "value": value, "ci": [low, high], "n": n, "items": items, "mdd": mdd, "method": method,
            "reproduces": verdict, "rule": rule, **extra}


MARGIN_ROW = {"natural": 0.55, "best_null": 0.15, "above_null": 0.4, "delta": 0.052}
FOUND = [
    {"id": "1", "claim": "gain", "metric": "benchmark: s - n", "value": 0.123456, "ci": [0.0123456, 0.2345678],
     "n": 3, "reproduces": True, "rule": "d > 0", "note": None, "ni_margin": MARGIN_ROW,
     "checks": [check_row("benchmark: s - n", 0.123456, 0.0123456, 0.2345678, True, "d(benchmark; s - n) > 0",
                          items=60, mdd=0.0412345, method="items")],
     "reported": {"sft: s - n": {"mean": -0.02, "low": -0.1, "high": 0.06, "n": 3, "mdd": 0.12}, "absent": None}},
    {"id": "2", "claim": "worse", "metric": "learnable_HSR: s - n", "value": -0.03, "ci": [-0.2, 0.14], "n": 3,
     "reproduces": None, "rule": "d < 0", "note": "not run: rewritten", "ni_margin": MARGIN_ROW,
     "checks": [check_row("learnable_HSR: s - n", -0.03, -0.2, 0.14, None, "d(learnable_HSR; s - n) < 0", mdd=0.25)],
     "power": [{"endpoint": "learnable_HSR", "natural_above_null": 0.4, "paper_effect_here": 0.052, "mdd": 0.25,
                "detectable": False},
               {"endpoint": "compliance_margin", "natural_above_null": -0.1, "paper_effect_here": 0.01, "mdd": 0.005,
                "detectable": True}]},
    {"id": "4", "claim": "kept", "metric": "learnable_HSR: u - n", "value": None, "ci": None, "n": None,
     "reproduces": False, "rule": "r", "note": None, "ni_margin": MARGIN_ROW,
     "unlearning_tokens_fraction_of_cpt": 0.02,
     "checks": [check_row("benchmark: u - (s + n)/2", -0.01, -0.03, -0.005, False, "retention >= 0.5",
                          retention=0.4)]},
]
PER_ITEM = ", ".join(findings.ITEM_METRICS)

FINDINGS_MD = [
    '# Findings across seeds (0, 1, 2; 95% intervals)',
    '',
    "Primary endpoints: learnable_HSR, compliance_margin, template_pull, pre_sft_template_pull, benchmark, "
    f"chat_score. Per-item endpoints ({PER_ITEM}) are contrasted item by item within seeds and combined over seeds "
    "(random effects, Student t on k - 1 degrees of freedom); the others by the Student t interval of per-seed "
    "differences. MDD: the minimum detectable difference at these seeds (two-sided 5%, power 80%).",
    '',
    "Non-inferiority margin delta = 13.0% (the paper's relative HSR loss) x natural's learnable HSR above the best "
    "null (0.550 - 0.150 = 0.400) = 0.0520; the paper's effect at this scale is -delta.",
    '',
    '| # | claim | primary check | mean [CI] | seeds | verdict |',
    '|---|---|---|---|---|---|',
    '| 1 | gain | benchmark: s - n | +0.1235 [+0.01235, +0.2346] | 3 | reproduces |',
    '| 2 | worse | learnable_HSR: s - n | -0.03 [-0.2, +0.14] | 3 | inconclusive (not run: rewritten) |',
    '| 4 | kept | learnable_HSR: u - n |  |  | does not reproduce (reversed) |',
    '',
    '## Checks',
    '',
    '| # | check | mean [CI] | seeds | MDD | verdict | rule |',
    '|---|---|---|---|---|---|---|',
    "| 1 | benchmark: s - n | +0.1235 [+0.01235, +0.2346] | 3 (60 items) | 0.04123 | reproduces | "
    "d(benchmark; s - n) > 0 |",
    '| 2 | learnable_HSR: s - n | -0.03 [-0.2, +0.14] | 3 | 0.25 | inconclusive | d(learnable_HSR; s - n) < 0 |',
    "| 4 | benchmark: u - (s + n)/2 | -0.01 [-0.03, -0.005] (retention 0.40) | 3 |  | does not reproduce "
    "(reversed) | retention >= 0.5 |",
    '',
    "## Power: could these seeds see the paper's effect? (finding 2)",
    '',
    "| endpoint | natural above its null | paper's effect here (13% of that) | MDD | detectable |",
    '|---|---|---|---|---|',
    '| learnable_HSR | 0.4 | 0.052 | 0.25 | no |',
    '| compliance_margin | -0.1 | 0.01 | 0.005 | yes |',
    '',
    '## Reported, not tested',
    '',
    '| # | contrast | mean [CI] | seeds | MDD |',
    '|---|---|---|---|---|',
    '| 1 | sft: s - n | -0.02 [-0.1, +0.06] | 3 | 0.12 |',
    '',
    'Unlearning cost (finding 4): forget + replay tokens = 0.0200 of the CPT tokens (about 1/50), mean over seeds.',
    '',
    "A finding reproduces when every check does; `inconclusive` means an interval contains 0 (or one seed only): "
    "more seeds, not a different rule, would settle it, and the MDD says how large a difference these seeds could "
    "have shown.",
]


def test_write_findings_lays_out_the_margin_findings_checks_power_reported_and_cost(tmp_path):
    findings.write_findings(FOUND, tmp_path, seeds=(0, 1, 2))
    assert (tmp_path / "findings.md").read_text().splitlines() == FINDINGS_MD
    assert json.loads((tmp_path / "findings.json").read_text()) == FOUND


def test_write_findings_without_findings_or_margin(tmp_path):
    findings.write_findings([], tmp_path / "none")
    text = (tmp_path / "none" / "findings.md").read_text()
    assert text.startswith("# Findings across seeds (?; 95% intervals)\n") and "Non-inferiority" not in text
    assert "## Power" not in text and "Unlearning cost" not in text
    no_delta = [{**FOUND[0], "ni_margin": {**MARGIN_ROW, "above_null": -0.1, "delta": None}}]
    findings.write_findings(no_delta, tmp_path / "no_delta", confidence=0.9, seeds=(3,))
    text = (tmp_path / "no_delta" / "findings.md").read_text()
    assert text.startswith("# Findings across seeds (3; 90% intervals)\n")
    assert "(0.550 - 0.150 = -0.100) = none; the paper's effect" in text


def test_the_cells_of_findings_md():
    assert [findings._verdict(v) for v in (True, False, None)] == [
        "reproduces", "does not reproduce (reversed)", "inconclusive"]
    assert findings._interval(0.5, [-0.25, 1.5]) == "+0.5 [-0.25, +1.5]" and findings._interval(None, None) == ""
    assert findings._interval(0.123456, (0.0123456, 2345.678)) == "+0.1235 [+0.01235, +2346]"
    assert findings._size({"n": 3, "items": 60}) == "3 (60 items)" and findings._size({"n": 3}) == "3"
    assert findings._size({"n": 3, "items": 0}) == "3" and findings._size({"n": None, "items": 5}) == ""
    assert findings._mdd(0.0412345) == "0.04123" and findings._mdd(None) == ""
