"""Statistics across seeds: means with Student-t intervals, and paired linear contrasts between models.

Why paired: every model of one seed shares that seed's world, base model and SFT data, so the seed-to-seed spread
of a metric is mostly shared between models; the difference within a seed cancels it, and the interval of the mean
difference over seeds is the honest test of a finding (a difference of two unpaired intervals is not).
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy.special import (
    stdtrit,  # the Student-t quantile; scipy.stats takes seconds to import
)


def seed_key(seed: str):
    """Sort key of seed labels: numeric seeds in numeric order ("2" before "10"), then any others by name."""
    return (0, int(seed), "") if re.fullmatch(r"-?\d+", seed) else (1, 0, seed)


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean and two-sided Student-t confidence interval of the mean.

    mean = sum(x) / n, std = sample standard deviation (ddof = 1), half_width = t_{(1+c)/2, n-1} * std / sqrt(n),
    [low, high] = mean -/+ half_width; the t quantile is computed (scipy.special.stdtrit, exact for every n), not
    read from a table. With n = 1 there is no
    spread to estimate: low = high = mean, std = None and ``single_seed`` = True (findings then stay inconclusive).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value (one seed)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci got non-finite values {x.tolist()}; drop failed seeds or fix their metrics")
    mean = float(x.mean())
    if x.size == 1:
        return {"n": 1, "mean": mean, "std": None, "low": mean, "high": mean, "half_width": 0.0, "single_seed": True}
    std = float(x.std(ddof=1))
    half = float(stdtrit(x.size - 1, (1.0 + confidence) / 2.0)) * std / math.sqrt(x.size)
    return {"n": int(x.size), "mean": mean, "std": std, "low": mean - half, "high": mean + half, "half_width": half,
            "single_seed": False}


def contrast(per_seed: dict, terms: list[tuple[str, str, float]], confidence: float = 0.95) -> dict | None:
    """Mean and CI over seeds of a paired linear contrast sum_i w_i * metric_i(model_i, seed).

    Only seeds where every term has a value count. E.g. [("synthetic", "HSR", 1), ("natural", "HSR", -1)] is the
    paired difference HSR(synthetic) - HSR(natural). None when no seed has all terms.
    """
    seed_sets = [set(per_seed.get(model, {}).get(metric, {})) for model, metric, _ in terms]
    common = sorted(set.intersection(*seed_sets), key=seed_key) if seed_sets else []
    if not common:
        return None
    values = [sum(w * per_seed[model][metric][s] for model, metric, w in terms) for s in common]
    return {**mean_ci(values, confidence), "seeds": common}


def paired_difference(per_seed: dict, model: str, reference: str, metric: str, confidence: float = 0.95):
    """The paired difference metric(model) - metric(reference) over the seeds both have (see `contrast`)."""
    return contrast(per_seed, [(model, metric, 1.0), (reference, metric, -1.0)], confidence)


# --------------------------------------------------------------------------------------------------------------
# Item-level paired contrasts within seeds, combined across seeds
# --------------------------------------------------------------------------------------------------------------

POWER = 0.8  # the power at which the minimum detectable difference is stated


def minimum_detectable_difference(se: float, df: int, confidence: float = 0.95, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at level 1 - `confidence` detects with probability `power`:
    (t_{(1+c)/2, df} + t_{power, df}) * se (Student t, so small seed counts pay for estimating their spread)."""
    return float(stdtrit(df, (1.0 + confidence) / 2.0) + stdtrit(df, power)) * se


def clustered_variance_of_mean(d: np.ndarray, clusters: list[str]) -> float:
    """The variance of mean(d) when items come in clusters that share a subject (items built on one base prompt):
    the cluster-robust (sandwich) estimate G / (G - 1) * sum_g (sum_{i in g} (d_i - mean))^2 / n^2 over G clusters.
    With every item its own cluster it is the usual var(d, ddof=1) / n; items of one cluster that move together
    widen it, as they should (they are fewer independent observations than items). NaN with fewer than 2 clusters."""
    n = len(d)
    if len(set(clusters)) == n:  # no clustering: numpy's own formula, so earlier results regenerate to the bit
        return float(d.var(ddof=1) / n) if n > 1 else float("nan")
    residual = d - d.mean()
    sums: dict[str, float] = {}
    for c, r in zip(clusters, residual):
        sums[c] = sums.get(c, 0.0) + float(r)
    g = len(sums)
    if g < 2:
        return float("nan")
    return g / (g - 1) * float(np.sum(np.square(list(sums.values())))) / n ** 2


def seed_item_contrast(values: dict[str, dict], terms: list[tuple[str, float]],
                       clusters: dict[str, str] | None = None) -> tuple[float, float, int] | None:
    """One seed's item-level paired contrast: (mean, variance of the mean, items) of sum_m w_m * value_m(item)
    over the items every model of `terms` has. `values`: model -> {item key: value}; `clusters`: item key -> its
    cluster (items without one are their own), the variance is clustered (`clustered_variance_of_mean`). None when
    no item is shared."""
    common = set.intersection(*(set(values.get(model, {})) for model, _ in terms))
    if not common:
        return None
    keys = sorted(common)
    d = np.array([sum(w * values[model][key] for model, w in terms) for key in keys], dtype=np.float64)
    clusters = clusters or {}
    var = clustered_variance_of_mean(d, [clusters.get(k, k) for k in keys])
    return float(d.mean()), var, len(d)


def random_effects(means: np.ndarray, variances: np.ndarray) -> tuple[float, float, float]:
    """(estimate, standard error, tau^2) of a random-effects meta-analysis: the DerSimonian-Laird between-study
    variance tau^2 (truncated at 0), inverse-variance weights 1 / (v_i + tau^2), and as standard error the larger of
    the usual one and the Hartung-Knapp-Sidik-Jonkman one (Roever et al. 2015: the HKSJ interval can be narrower
    than the usual one when studies agree closely, and taking the larger keeps it from doing so).

    Written out rather than taken from statsmodels, whose "dl" estimate (0.15) returned a negative tau^2 and an
    estimate outside the range of the studies for two agreeing seeds.
    """
    w = 1.0 / variances
    fixed = float(np.sum(w * means) / np.sum(w))
    q = float(np.sum(w * (means - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
    k = len(means)
    tau2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0
    w_re = 1.0 / (variances + tau2)
    estimate = float(np.sum(w_re * means) / np.sum(w_re))
    se_usual = float(np.sqrt(1.0 / np.sum(w_re)))
    se_hksj = float(np.sqrt(np.sum(w_re * (means - estimate) ** 2) / ((k - 1) * np.sum(w_re))))
    return estimate, max(se_usual, se_hksj), tau2


def combine_seeds(per_seed: dict[str, tuple[float, float, int]], confidence: float = 0.95) -> dict | None:
    """Seeds' paired contrasts (mean, variance of the mean, items) combined into one estimate with its interval.

    Random-effects meta-analysis over seeds (`random_effects`), because seeds differ in world and training noise
    beyond their items' sampling error, with a Student t quantile on k - 1 degrees of freedom (k seeds): with few
    seeds the normal interval is too narrow. A seed whose items all agree (variance 0) is given a small variance
    rather than infinite weight; when every seed's items agree, the seeds' means alone give the interval
    (`mean_ci`). With one seed: low = high = mean and `single_seed`. Also returns the minimum detectable
    difference at this many seeds.
    """
    seeds = sorted(per_seed, key=seed_key)
    if not seeds:
        return None
    means = np.array([per_seed[s][0] for s in seeds])
    variances = np.array([per_seed[s][1] for s in seeds])
    items = int(sum(per_seed[s][2] for s in seeds))
    if len(seeds) == 1 or not np.all(np.isfinite(variances)):
        mean = float(means.mean())
        return {"n": len(seeds), "items": items, "mean": mean, "se": None, "low": mean, "high": mean,
                "half_width": 0.0, "mdd": None, "tau2": None, "single_seed": True, "seeds": seeds}
    df = len(seeds) - 1
    if np.all(variances < 1e-12):  # every item agreed within every seed (e.g. both models at 0): only seeds vary
        stats = mean_ci(means, confidence)
        se = stats["std"] / np.sqrt(len(seeds))
        return {**stats, "items": items, "se": se, "mdd": minimum_detectable_difference(se, df, confidence),
                "tau2": None, "seeds": seeds}
    variances = np.maximum(variances, 1e-6 * variances.max())  # an all-agreeing seed: great weight, not infinite
    mean, se, tau2 = random_effects(means, variances)
    half = float(stdtrit(df, (1.0 + confidence) / 2.0)) * se
    return {"n": len(seeds), "items": items, "mean": mean, "se": se, "low": mean - half, "high": mean + half,
            "half_width": half, "mdd": minimum_detectable_difference(se, df, confidence), "tau2": tau2,
            "single_seed": False, "seeds": seeds}


def item_contrast(by_seed: dict[str, dict[str, dict]], terms: list[tuple[str, float]],
                  confidence: float = 0.95, clusters: dict[str, dict[str, str]] | None = None) -> dict | None:
    """`seed_item_contrast` in every seed (`by_seed`: seed -> model -> {item key: value}; `clusters`: seed -> item
    key -> cluster), combined over the seeds that have every model (`combine_seeds`); each seed's own estimate is
    kept under "per_seed"."""
    per_seed = {}
    for seed, values in by_seed.items():
        if all(model in values for model, _ in terms):
            found = seed_item_contrast(values, terms, (clusters or {}).get(seed))
            if found is not None:
                per_seed[seed] = found
    combined = combine_seeds(per_seed, confidence)
    if combined is not None:
        combined["per_seed"] = {s: per_seed[s][0] for s in combined["seeds"]}
    return combined
