"""The pre-registered verdict of a check: p-values from its interval, Holm within a finding's primary family, and
one of four labels (docs/preregistration.md; the constants are in :mod:`synthflaw.reporting.preregistration`).

Labels, for a check claiming a direction (sign +1: the contrast is above 0, -1: below 0) with a paper-sized effect
`delta` in the endpoint's units (None where the paper gives no size at this scale):
- ``reproduces``: the Holm-adjusted one-sided p of the claimed direction is below ALPHA / 2;
- ``reversed``: the Holm-adjusted one-sided p of the other direction is below ALPHA / 2;
- ``paper-sized effect excluded``: the 95% interval lies on the near side of the paper-sized effect (for sign -1,
  its lower bound above -delta; for +1, its upper bound below +delta), and the positive control was detected on
  that endpoint (a null from an instrument that never showed it sees a harm excludes nothing);
- ``inconclusive``: anything else; its MDD says how large an effect these seeds could have shown.
A non-inferiority check ("no worse than", margin delta) reproduces when its Holm-adjusted p of H0: d <= -delta is
below ALPHA / 2 (equivalently, at m = 1, the interval's lower bound lies above -delta), and is reversed when the
whole interval lies below -delta.

Holm's step-down is written out (six lines): scipy has no Holm adjustment, and statsmodels, which has, is a large
dependency for it.
"""

from __future__ import annotations

import math

from scipy.special import stdtr

from synthflaw.reporting.preregistration import ALPHA

REPRODUCES, REVERSED, EXCLUDED, INCONCLUSIVE = ("reproduces", "reversed", "paper-sized effect excluded",
                                                "inconclusive")


def standard_error(stats: dict | None) -> tuple[float, int] | None:
    """(standard error, degrees of freedom) of a contrast: `combine_seeds`' se, or a seed mean's std / sqrt(n);
    None with one seed or no spread."""
    if stats is None or stats.get("single_seed"):
        return None
    se = stats.get("se")
    if se is None and stats.get("std") is not None:
        se = stats["std"] / math.sqrt(stats["n"])
    if se is None or not se > 0:
        return None
    return float(se), int(stats["n"]) - 1


def one_sided_p(stats: dict | None, sign: int, shift: float = 0.0) -> float | None:
    """P(T >= t) for t = sign * (mean - shift) / se on n - 1 degrees of freedom: the p-value of "the contrast lies on
    the `sign` side of `shift`" (sign 0: two-sided, halved so it compares with ALPHA / 2 like the others)."""
    found = standard_error(stats)
    if found is None:
        return None
    se, df = found
    t = (stats["mean"] - shift) / se
    return float(stdtr(df, -abs(t))) if sign == 0 else float(stdtr(df, -sign * t))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (Holm 1979) of one family, None kept in place and not counted: the i-th smallest of
    m is multiplied by m - i + 1, then made monotone, capped at 1."""
    ranked = sorted((p, k) for k, p in enumerate(pvalues) if p is not None)
    m, adjusted, running = len(ranked), list(pvalues), 0.0
    for i, (p, k) in enumerate(ranked):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[k] = running
    return adjusted


def label(kind: str, stats: dict | None, sign: int, delta: float | None, p_claim: float | None,
          p_reverse: float | None, control_detected: bool | None = None) -> str:
    """The verdict label of one check (module docstring); `p_claim` and `p_reverse` already Holm-adjusted where
    the check is primary. `kind`: "directional" or "non_inferior"."""
    threshold = ALPHA / 2
    if stats is None or standard_error(stats) is None:
        return INCONCLUSIVE
    if p_claim is not None and p_claim < threshold:
        return REPRODUCES
    if kind == "non_inferior":
        return REVERSED if delta is not None and stats["high"] < -delta else INCONCLUSIVE
    if p_reverse is not None and p_reverse < threshold:
        return REVERSED
    if delta is not None and sign != 0 and control_detected:
        near = stats["low"] > -delta if sign < 0 else stats["high"] < delta
        if near:
            return EXCLUDED
    return INCONCLUSIVE


def combine(labels: list[str]) -> str:
    """A finding's verdict from its primary checks' labels: reversed if any is, reproduces if all do, paper-sized
    effect excluded if all are, else inconclusive."""
    if not labels:
        return INCONCLUSIVE
    if REVERSED in labels:
        return REVERSED
    if all(x == REPRODUCES for x in labels):
        return REPRODUCES
    if all(x == EXCLUDED for x in labels):
        return EXCLUDED
    return INCONCLUSIVE
