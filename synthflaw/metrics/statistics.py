"""Statistics across seeds: means with Student-t intervals, and paired linear contrasts between models.

Why paired: every model of one seed shares that seed's world, base model and SFT data, so the seed-to-seed spread
of a metric is mostly shared between models; the difference within a seed cancels it, and the interval of the mean
difference over seeds is the honest test of a finding (a difference of two unpaired intervals is not).
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy.special import stdtrit  # the Student-t quantile; scipy.stats takes seconds to import


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
