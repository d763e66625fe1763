"""synthflaw.metrics.statistics on small hand-built inputs: the item-level variance, the random-effects combination
of seeds, the Student t quantile's degrees of freedom and the minimum detectable difference, each against values
worked out by hand in the comments (the t quantiles are constants from tables, to more digits).

These are the rule tests of the findings' arithmetic; tests/test_reference.py's byte-for-byte comparison is the
last net behind them, not the first.
"""

import math
import warnings

import numpy as np
import pytest

from synthflaw.metrics import statistics

T_975_DF1 = 12.706204736174694  # Student t 0.975 quantile, 1 degree of freedom (tables: 12.706)
T_975_DF2 = 4.302652729749462  # 2 degrees of freedom (tables: 4.303); on 3 it would be 3.182
T_80_DF2 = 1.0606601717798214  # the 0.8 quantile (power 80%), 2 degrees of freedom (tables: 1.061)


def test_seed_key_orders_numeric_seeds_numerically_then_names():
    assert sorted(["10", "2", "b", "-1", "a", "0"], key=statistics.seed_key) == ["-1", "0", "2", "10", "a", "b"]


def test_seed_item_contrast_is_the_mean_and_ddof_1_variance_of_the_mean_over_shared_items():
    values = {"a": {"i1": 1.0, "i2": 0.0, "i3": 1.0, "i4": 1.0},
              "b": {"i1": 0.0, "i2": 0.0, "i3": 1.0, "i4": 0.0, "i5": 1.0}}  # i5: b only, left out
    mean, var, items = statistics.seed_item_contrast(values, [("a", 1.0), ("b", -1.0)])
    # d = a - b on i1..i4 = (1, 0, 0, 1): mean 0.5; sum of squared deviations 4 * 0.25 = 1;
    # sample variance (ddof 1) 1 / 3, variance of the mean 1 / 3 / 4 = 1 / 12 (ddof 0 would give 0.25 / 4 = 1 / 16)
    assert (mean, items) == (0.5, 4)
    assert var == pytest.approx(1 / 12)
    # weights apply per item: 2a - b on i1..i4 = (2, 0, 1, 2), mean 1.25, deviations (.75, -1.25, -.25, .75)
    mean, var, _ = statistics.seed_item_contrast(values, [("a", 2.0), ("b", -1.0)])
    assert mean == pytest.approx(1.25) and var == pytest.approx((0.5625 + 1.5625 + 0.0625 + 0.5625) / 3 / 4)
    one = statistics.seed_item_contrast({"a": {"x": 0.7}, "b": {"x": 0.2}}, [("a", 1.0), ("b", -1.0)])
    assert one[0] == pytest.approx(0.5) and math.isnan(one[1]) and one[2] == 1  # one item: no spread to estimate
    assert statistics.seed_item_contrast({"a": {"x": 1.0}, "b": {"y": 1.0}}, [("a", 1.0), ("b", -1.0)]) is None


def test_random_effects_agreeing_seeds_keep_the_usual_standard_error():
    # means (0.1, 0.3, 0.2), variances (0.01, 0.04, 0.01): weights (100, 25, 100), sum 225;
    # fixed estimate (10 + 7.5 + 20) / 225 = 1/6; Q = 100 (1/15)^2 + 25 (2/15)^2 + 100 (1/30)^2 = 1.0 < k - 1 = 2,
    # so tau^2 = 0; usual se = sqrt(1 / 225) = 1/15, HKSJ se = sqrt(Q / (2 * 225)) = 0.0471: the larger is 1/15
    estimate, se, tau2 = statistics.random_effects(np.array([0.1, 0.3, 0.2]), np.array([0.01, 0.04, 0.01]))
    assert estimate == pytest.approx(1 / 6) and tau2 == 0.0 and se == pytest.approx(1 / 15)


def test_random_effects_disagreeing_seeds_get_tau2_and_the_hksj_standard_error():
    # means (0, 0.5, 1), variances (0.01, 0.02, 0.04): weights (100, 50, 25), sum 175; fixed 50 / 175 = 2/7;
    # Q = 100 (2/7)^2 + 50 (3/14)^2 + 25 (5/7)^2 = 23.2143; C = 175 - (100^2 + 50^2 + 25^2) / 175 = 100;
    # tau^2 = (Q - 2) / C = 0.212143
    q = 100 * (2 / 7) ** 2 + 50 * (3 / 14) ** 2 + 25 * (5 / 7) ** 2
    tau2_hand = (q - 2) / 100
    w = 1 / (np.array([0.01, 0.02, 0.04]) + tau2_hand)
    means = np.array([0.0, 0.5, 1.0])
    estimate_hand = float(np.sum(w * means) / np.sum(w))
    se_usual = math.sqrt(1 / np.sum(w))  # 0.2798
    se_hksj = math.sqrt(np.sum(w * (means - estimate_hand) ** 2) / (2 * np.sum(w)))  # 0.2875: the larger
    estimate, se, tau2 = statistics.random_effects(means, np.array([0.01, 0.02, 0.04]))
    assert tau2 == pytest.approx(0.2121428571) and tau2 == pytest.approx(tau2_hand)
    assert estimate == pytest.approx(estimate_hand) and estimate == pytest.approx(0.4790376)
    assert se_hksj > se_usual and se == pytest.approx(se_hksj) and se == pytest.approx(0.2874572)


def test_combine_seeds_interval_uses_t_on_k_minus_1_degrees_of_freedom():
    per_seed = {"2": (0.2, 0.01, 30), "0": (0.1, 0.01, 10), "1": (0.3, 0.04, 20)}
    out = statistics.combine_seeds(per_seed)
    # the agreeing seeds above: estimate 1/6, se 1/15; 3 seeds -> t(0.975, 2) = 4.3027 (3.1824 on 3 df)
    half = T_975_DF2 / 15
    assert out["seeds"] == ["0", "1", "2"] and out["n"] == 3 and out["items"] == 60
    assert out["mean"] == pytest.approx(1 / 6) and out["se"] == pytest.approx(1 / 15) and out["tau2"] == 0.0
    assert out["half_width"] == pytest.approx(half) and half == pytest.approx(0.286843, abs=1e-6)
    assert (out["low"], out["high"]) == (pytest.approx(1 / 6 - half), pytest.approx(1 / 6 + half))
    assert out["mdd"] == pytest.approx((T_975_DF2 + T_80_DF2) / 15)  # also on k - 1 = 2 df
    assert out["single_seed"] is False
    assert statistics.combine_seeds(per_seed, confidence=0.99)["half_width"] > half


def test_combine_seeds_with_every_item_agreeing_falls_back_to_the_seeds_means():
    # every seed's items agree (variance 0): the seeds' means (0.1, 0.2, 0.3) give the interval: std 0.1,
    # se 0.1 / sqrt(3), half width t(0.975, 2) * se
    out = statistics.combine_seeds({"0": (0.1, 0.0, 5), "1": (0.2, 0.0, 5), "2": (0.3, 0.0, 5)})
    se = 0.1 / math.sqrt(3)
    assert out["mean"] == pytest.approx(0.2) and out["se"] == pytest.approx(se) and out["items"] == 15
    assert out["half_width"] == pytest.approx(T_975_DF2 * se) and out["tau2"] is None
    assert out["mdd"] == pytest.approx((T_975_DF2 + T_80_DF2) * se) and out["seeds"] == ["0", "1", "2"]


def test_combine_seeds_gives_an_agreeing_seed_great_but_finite_weight():
    # seed 0's items all agree (variance 0): it gets 1e-6 x the largest variance (1e-8), weight 1e8 against 100;
    # Q is about 100 * 0.02^2 = 0.04 < k - 1 = 1, so tau^2 = 0 and se = sqrt(1 / (1e8 + 100))
    out = statistics.combine_seeds({"0": (0.30, 0.0, 5), "1": (0.32, 0.01, 5)})
    assert out["mean"] == pytest.approx((0.30 * 1e8 + 0.32 * 100) / (1e8 + 100), abs=1e-12) and out["n"] == 2
    assert out["se"] == pytest.approx(math.sqrt(1 / (1e8 + 100))) and out["tau2"] == 0.0
    assert out["half_width"] == pytest.approx(T_975_DF1 * out["se"])  # two seeds: t on 1 df


def test_combine_seeds_one_seed_or_no_variance_is_a_single_seed_and_none_without_seeds():
    one = statistics.combine_seeds({"3": (0.25, 0.01, 7)})
    assert one == {"n": 1, "items": 7, "mean": 0.25, "se": None, "low": 0.25, "high": 0.25, "half_width": 0.0,
                   "mdd": None, "tau2": None, "single_seed": True, "seeds": ["3"]}
    nan = statistics.combine_seeds({"0": (0.2, float("nan"), 1), "1": (0.4, 0.01, 9)})
    assert nan["single_seed"] is True and nan["mean"] == pytest.approx(0.3) and nan["items"] == 10
    assert statistics.combine_seeds({}) is None


def test_minimum_detectable_difference_adds_the_two_t_quantiles():
    assert statistics.minimum_detectable_difference(1.0, 2) == pytest.approx(T_975_DF2 + T_80_DF2)
    assert statistics.minimum_detectable_difference(0.5, 2) == pytest.approx((T_975_DF2 + T_80_DF2) / 2)
    assert statistics.minimum_detectable_difference(1.0, 2, power=0.5) == pytest.approx(T_975_DF2)  # t(0.5) = 0


def test_item_contrast_combines_the_seeds_that_have_every_model():
    by_seed = {
        "0": {"a": {"x": 1.0, "y": 0.0}, "b": {"x": 0.0, "y": 0.0}},  # d = (1, 0): mean .5, var of mean .5 / 2
        "1": {"a": {"x": 1.0, "y": 1.0}, "b": {"x": 0.0, "y": 1.0}},  # d = (1, 0) again
        "2": {"a": {"x": 1.0}},  # no b: left out
        "3": {"a": {"x": 1.0}, "b": {"z": 0.0}},  # no shared item: left out
    }
    out = statistics.item_contrast(by_seed, [("a", 1.0), ("b", -1.0)])
    assert out["seeds"] == ["0", "1"] and out["per_seed"] == {"0": 0.5, "1": 0.5} and out["items"] == 4
    # two identical seeds, variance 0.25 each: tau^2 0, se sqrt(1 / (4 + 4)), t on 1 df
    assert out["mean"] == pytest.approx(0.5) and out["se"] == pytest.approx(math.sqrt(1 / 8))
    assert out["half_width"] == pytest.approx(T_975_DF1 * math.sqrt(1 / 8))
    assert statistics.item_contrast({"0": {"a": {"x": 1.0}}}, [("a", 1.0), ("b", -1.0)]) is None


def test_contrast_pairs_within_seeds_over_the_seeds_every_term_has():
    per_seed = {"syn": {"m": {"0": 0.5, "1": 0.7, "2": 0.9, "10": 0.6}},
                "nat": {"m": {"0": 0.4, "1": 0.5, "2": 0.6}}}
    out = statistics.paired_difference(per_seed, "syn", "nat", "m")
    # per-seed differences (0.1, 0.2, 0.3): mean 0.2, std 0.1, half width t(0.975, 2) * 0.1 / sqrt(3)
    assert out["seeds"] == ["0", "1", "2"] and out["mean"] == pytest.approx(0.2)
    assert out["half_width"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    two = statistics.contrast(per_seed, [("syn", "m", 2.0), ("nat", "m", -1.0)])
    assert two["mean"] == pytest.approx((0.6 + 0.9 + 1.2) / 3)
    assert statistics.contrast(per_seed, [("syn", "m", 1.0), ("absent", "m", -1.0)]) is None


# Each test below pins a behaviour a mutant of `make mutation` changed without failing the tests above.

@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.5])
def test_mean_ci_refuses_a_confidence_outside_0_1(confidence):
    with pytest.raises(ValueError, match=r"^confidence must be in \(0, 1\), e\.g\. 0\.95; got "):
        statistics.mean_ci([0.1, 0.2], confidence=confidence)


def test_mean_ci_names_what_is_missing():
    with pytest.raises(ValueError, match=r"^mean_ci needs at least one value \(one seed\)$"):
        statistics.mean_ci([])
    with pytest.raises(ValueError, match=r"^mean_ci got non-finite values \[0\.1, inf\]; drop failed seeds"):
        statistics.mean_ci([0.1, float("inf")])


T_95_DF2 = 2.919985580355516  # Student t 0.95 quantile (a 90% interval), 2 degrees of freedom (tables: 2.920)


def test_the_confidence_reaches_every_interval():
    per_seed = {"syn": {"m": {"0": 0.5, "1": 0.7, "2": 0.9}}, "nat": {"m": {"0": 0.4, "1": 0.5, "2": 0.6}}}
    # per-seed differences (0.1, 0.2, 0.3): std 0.1
    assert statistics.contrast(per_seed, [("syn", "m", 1.0), ("nat", "m", -1.0)], 0.9)["half_width"] == \
        pytest.approx(T_95_DF2 * 0.1 / math.sqrt(3))
    assert statistics.paired_difference(per_seed, "syn", "nat", "m", 0.9)["half_width"] == \
        pytest.approx(T_95_DF2 * 0.1 / math.sqrt(3))
    # random effects (the agreeing seeds above: se 1/15); MDD = (t(0.95, 2) + t(0.8, 2)) * se
    out = statistics.combine_seeds({"0": (0.1, 0.01, 10), "1": (0.3, 0.04, 20), "2": (0.2, 0.01, 30)}, 0.9)
    assert out["half_width"] == pytest.approx(T_95_DF2 / 15)
    assert out["mdd"] == pytest.approx((T_95_DF2 + T_80_DF2) / 15)
    # every item agreeing: the seeds' means (0.1, 0.2, 0.3), std 0.1
    agreed = statistics.combine_seeds({"0": (0.1, 0.0, 5), "1": (0.2, 0.0, 5), "2": (0.3, 0.0, 5)}, 0.9)
    assert agreed["half_width"] == pytest.approx(T_95_DF2 * 0.1 / math.sqrt(3))
    assert agreed["mdd"] == pytest.approx((T_95_DF2 + T_80_DF2) * 0.1 / math.sqrt(3))
    by_seed = {s: {"a": {"x": 1.0, "y": 0.0}, "b": {"x": 0.0, "y": 0.0}} for s in "01"}
    assert statistics.item_contrast(by_seed, [("a", 1.0), ("b", -1.0)], 0.9)["half_width"] == \
        pytest.approx(6.313751514675043 * math.sqrt(1 / 8))  # t(0.95, 1) = 6.314


def test_seeds_are_listed_in_numeric_order():
    per_seed = {"syn": {"m": {"10": 0.5, "2": 0.7, "0": 0.9}}, "nat": {"m": {"10": 0.4, "2": 0.5, "0": 0.6}}}
    assert statistics.paired_difference(per_seed, "syn", "nat", "m")["seeds"] == ["0", "2", "10"]
    combined = statistics.combine_seeds({"10": (0.1, 0.01, 1), "2": (0.2, 0.01, 1), "0": (0.3, 0.01, 1)})
    assert combined["seeds"] == ["0", "2", "10"]


def test_edge_cases_return_none_or_nan_without_errors_or_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "degrees of freedom <= 0" for one item would be an error here
        one = statistics.seed_item_contrast({"a": {"x": 0.7}, "b": {"x": 0.2}}, [("a", 1.0), ("b", -1.0)])
    assert math.isnan(one[1])
    # a model missing from the seed: no shared item
    assert statistics.seed_item_contrast({"a": {"x": 1.0}}, [("a", 1.0), ("b", -1.0)]) is None
    assert statistics.contrast({"a": {"m": {"0": 1.0}}}, []) is None  # no terms: no seed has them all


def test_random_effects_of_one_study_has_no_between_study_variance():
    # k = 1: C = w - w^2 / w = 0, so tau^2 is 0 by definition (not Q / C); the usual se is sqrt(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the HKSJ se of one study is 0 / 0
        estimate, se, tau2 = statistics.random_effects(np.array([0.3]), np.array([0.01]))
    assert (estimate, tau2) == (pytest.approx(0.3), 0.0) and se == pytest.approx(0.1)


def test_random_effects_with_large_variances_small_c_still_gets_tau2():
    # means (0, 5, 10), variances 4: weights 0.25, fixed 5, Q = 0.25 (25 + 0 + 25) = 12.5,
    # C = 0.75 - 3 * 0.0625 / 0.75 = 0.5 (below 1), tau^2 = (12.5 - 2) / 0.5 = 21
    estimate, se, tau2 = statistics.random_effects(np.array([0.0, 5.0, 10.0]), np.array([4.0, 4.0, 4.0]))
    assert tau2 == pytest.approx(21.0) and estimate == pytest.approx(5.0) and se == pytest.approx(math.sqrt(25 / 3))


def test_the_all_items_agree_threshold_is_below_1e_12():
    below = statistics.combine_seeds({"0": (0.1, 0.9e-12, 5), "1": (0.2, 0.9e-12, 5), "2": (0.3, 0.9e-12, 5)})
    at = statistics.combine_seeds({"0": (0.1, 1e-12, 5), "1": (0.2, 1e-12, 5), "2": (0.3, 1e-12, 5)})
    assert below["tau2"] is None and at["tau2"] is not None  # seeds' means alone, then random effects


def test_mean_ci_of_one_value_is_a_single_seed_and_of_two_an_interval():
    assert statistics.mean_ci([0.7]) == {"n": 1, "mean": 0.7, "std": None, "low": 0.7, "high": 0.7, "half_width": 0.0,
                                         "single_seed": True}
    two = statistics.mean_ci([1.0, 3.0])  # std sqrt(2), half width t(0.975, 1) * sqrt(2) / sqrt(2)
    assert two["single_seed"] is False and two["n"] == 2 and two["half_width"] == pytest.approx(T_975_DF1)
    assert two["std"] == pytest.approx(math.sqrt(2)) and (two["low"], two["high"]) == (
        pytest.approx(2.0 - T_975_DF1), pytest.approx(2.0 + T_975_DF1))
