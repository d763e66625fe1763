"""The pre-registered rules (synthflaw.reporting.preregistration, .verdicts) and the clustered standard errors they
rest on (synthflaw.metrics.statistics): known injected effects, hand-computed Holm, labels, one source of constants."""

import inspect
import math

import numpy as np
import pytest

from synthflaw.metrics import statistics
from synthflaw.reporting import findings, preregistration, verdicts


def test_clustered_variance_is_the_usual_one_for_singletons_and_wider_for_shared_subjects():
    d = np.array([0.1, 0.4, -0.2, 0.3, 0.0, 0.2])
    assert statistics.clustered_variance_of_mean(d, list("abcdef")) == pytest.approx(d.var(ddof=1) / 6)
    # three subjects, each answered twice alike: three observations, not six
    clustered = statistics.clustered_variance_of_mean(np.array([0.1, 0.1, 0.5, 0.5, -0.3, -0.3]), list("aabbcc"))
    means = np.array([0.1, 0.5, -0.3])
    assert clustered == pytest.approx(means.var(ddof=1) / 3)  # G / (G - 1) * sum((2 r_g)^2) / 6^2 = var(means) / 3
    assert clustered > np.array([0.1, 0.1, 0.5, 0.5, -0.3, -0.3]).var(ddof=1) / 6
    assert math.isnan(statistics.clustered_variance_of_mean(np.array([0.1, 0.2]), ["a", "a"]))


def _simulated_seeds(rng, effect, n_seeds=5, bases=60, per_base=3, base_sd=0.3, item_sd=0.1):
    """Per-item paired differences whose items share a base prompt (a base effect all its items carry)."""
    values, clusters = {}, {}
    for s in range(n_seeds):
        seed_effect = rng.normal(0, 0.02)
        treated, control = {}, {}
        for b in range(bases):
            shared = rng.normal(0, base_sd)
            for k in range(per_base):
                key = f"learnable_suite/i{b}-{k}"
                control[key] = 0.0
                treated[key] = effect + seed_effect + shared + rng.normal(0, item_sd)
                clusters.setdefault(str(s), {})[key] = f"learnable_suite/b{b}"
        values[str(s)] = {"treated": treated, "control": control}
    return values, clusters


def test_intervals_cover_a_known_injected_effect_when_clustered_and_undercover_when_not():
    rng = np.random.default_rng(0)
    terms = [("treated", 1.0), ("control", -1.0)]
    covered = {"clustered": 0, "naive": 0}
    runs = 100
    for _ in range(runs):
        by_seed, clusters = _simulated_seeds(rng, effect=0.05)
        for name, c in (("clustered", clusters), ("naive", None)):
            found = statistics.item_contrast(by_seed, terms, clusters=c)
            covered[name] += found["low"] <= 0.05 <= found["high"]
    assert covered["clustered"] / runs >= 0.9  # nominal 95%
    assert covered["naive"] < covered["clustered"]  # items of one base are not independent


def test_holm_adjusts_and_orders_as_specified():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04): the step-down stays monotone
    assert verdicts.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert verdicts.holm([0.02, None, 0.6]) == [pytest.approx(0.04), None, pytest.approx(0.6)]
    assert verdicts.holm([0.9, 0.8]) == [1.0, 1.0]  # 2 * 0.8 capped at 1, and 0.9 may not fall below it
    assert verdicts.holm([]) == []


def _stats(mean, se, n=5):
    t = 2.7764451051977987  # t(0.975, 4)
    return {"mean": mean, "se": se, "n": n, "low": mean - t * se, "high": mean + t * se, "single_seed": False,
            "mdd": (t + 0.9409) * se}


def test_a_true_zero_is_labelled_excluded_only_when_the_mdd_allows_it_and_the_control_was_seen():
    delta = 0.03
    tight, loose = _stats(0.0, 0.005), _stats(0.0, 0.02)
    assert tight["mdd"] < delta < loose["mdd"]

    def label(stats, detected=True):
        return verdicts.label("directional", stats, -1, delta, verdicts.one_sided_p(stats, -1),
                              verdicts.one_sided_p(stats, 1), detected)

    assert label(tight) == verdicts.EXCLUDED
    assert label(loose) == verdicts.INCONCLUSIVE
    assert label(tight, detected=False) == verdicts.INCONCLUSIVE  # an instrument never shown to see a harm
    assert label(_stats(-0.05, 0.01)) == verdicts.REPRODUCES
    assert label(_stats(0.05, 0.01)) == verdicts.REVERSED
    # non-inferiority: the lower bound above -delta reproduces, the whole interval below -delta is reversed
    ni = _stats(-0.005, 0.005)
    assert verdicts.label("non_inferior", ni, 1, delta, verdicts.one_sided_p(ni, 1, -delta), None) == \
        verdicts.REPRODUCES
    worse = _stats(-0.08, 0.005)
    assert verdicts.label("non_inferior", worse, 1, delta, verdicts.one_sided_p(worse, 1, -delta), None) == \
        verdicts.REVERSED
    assert verdicts.combine([verdicts.EXCLUDED, verdicts.EXCLUDED]) == verdicts.EXCLUDED
    assert verdicts.combine([verdicts.EXCLUDED, verdicts.REPRODUCES]) == verdicts.INCONCLUSIVE
    assert verdicts.combine([verdicts.REPRODUCES, verdicts.REVERSED]) == verdicts.REVERSED


def test_one_sided_p_matches_the_student_t_interval():
    stats = _stats(0.01, 0.01)  # the 95% interval's lower bound sits exactly at 0 when t = 2.776
    at_bound = _stats(2.7764451051977987 * 0.01, 0.01)
    assert verdicts.one_sided_p(at_bound, 1) == pytest.approx(0.025)
    assert verdicts.one_sided_p(stats, 1) + verdicts.one_sided_p(stats, -1) == pytest.approx(1.0)
    assert verdicts.one_sided_p({**stats, "single_seed": True}, 1) is None


def test_findings_read_the_registered_constants_and_keep_no_copy():
    assert findings.PAPER_RELATIVE_EFFECT is preregistration.PAPER_RELATIVE_EFFECT
    assert findings.PRIMARY is preregistration.PRIMARY
    source = inspect.getsource(findings) + inspect.getsource(verdicts)
    for literal in ("27.58", "24.00", "0.05 ", "PRIMARY = ", "ALPHA = "):
        assert literal not in source, literal
    assert all(1 <= len(family) <= 2 for family in preregistration.PRIMARY.values())


def test_the_registered_values_are_the_ones_the_document_states():
    from pathlib import Path

    from synthflaw import config

    doc = (Path(__file__).resolve().parent.parent / "docs" / "preregistration.md").read_text()
    for endpoint, value in preregistration.MARGINS.items():
        assert f"| {endpoint} | {value} |" in doc, endpoint
    assert f"**{preregistration.SEEDS} seeds**" in doc
    assert f"`sft.harm_fraction` = **{config.resolve('default').sft.harm_fraction}**" in doc
    for fid, family in preregistration.PRIMARY.items():
        assert f"| {fid} |" in doc and len(family) <= 2


def test_the_standard_error_comes_from_se_else_from_the_seeds_spread():
    assert verdicts.standard_error({"se": 0.1, "std": 1.0, "n": 4, "single_seed": False}) == (0.1, 3)
    assert verdicts.standard_error({"se": None, "std": 0.4, "n": 4, "single_seed": False}) == (pytest.approx(0.2), 3)
    assert verdicts.standard_error({"se": 0.0, "n": 4, "single_seed": False}) is None  # no spread: no test


def test_a_two_sided_p_is_the_smaller_one_sided_one():
    up, down = _stats(0.01, 0.01), _stats(-0.01, 0.01)
    assert verdicts.one_sided_p(up, 0) == pytest.approx(verdicts.one_sided_p(up, 1)) and verdicts.one_sided_p(up, 1) < 0.5
    assert verdicts.one_sided_p(down, 0) == pytest.approx(verdicts.one_sided_p(down, -1))
    assert verdicts.one_sided_p(down, -1) < 0.5


def test_labels_at_their_boundaries():
    stats, delta = _stats(-0.01, 0.01), 0.03

    def directional(p_claim, p_reverse, sign=-1, s=stats, detected=None):
        return verdicts.label("directional", s, sign, None if detected is None else delta, p_claim, p_reverse,
                              detected)

    # one-sided at ALPHA / 2 = 0.025, strictly
    assert directional(0.02, 0.98) == verdicts.REPRODUCES
    assert directional(0.025, 0.975) == directional(0.03, 0.97) == verdicts.INCONCLUSIVE
    assert directional(0.98, 0.02) == verdicts.REVERSED and directional(0.975, 0.025) == verdicts.INCONCLUSIVE
    assert directional(0.001, 0.999, s={**stats, "single_seed": True}) == verdicts.INCONCLUSIVE  # one seed
    # excluded: strictly inside the paper-sized effect, on the claim's side of 0 for either sign
    assert directional(0.5, 0.5, sign=1, s={**stats, "low": -0.2, "high": 0.02}, detected=True) == verdicts.EXCLUDED
    assert directional(0.5, 0.5, sign=1, s={**stats, "low": -0.01, "high": 0.05}, detected=True) == \
        verdicts.INCONCLUSIVE  # its upper bound reaches past +delta
    assert directional(0.5, 0.5, sign=1, s={**stats, "low": -0.2, "high": delta}, detected=True) == \
        verdicts.INCONCLUSIVE
    assert directional(0.5, 0.5, sign=-1, s={**stats, "low": -delta, "high": 0.2}, detected=True) == \
        verdicts.INCONCLUSIVE
    # a harm claim is judged on the lower bound only: an upper bound past +delta does not matter
    assert directional(0.5, 0.5, sign=-1, s={**stats, "low": -0.01, "high": 0.05}, detected=True) == verdicts.EXCLUDED
    # non-inferiority: reversed only when the whole interval lies strictly below -delta
    for high in (0.01, -delta):
        assert verdicts.label("non_inferior", {**stats, "high": high}, 1, delta, 0.5, None) == verdicts.INCONCLUSIVE
