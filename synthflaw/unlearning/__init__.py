"""Unlearning the synthetic pattern (stage 05): the paper's lower-bounded method and four baselines.

One file per method; `METHODS` is the one list of them. `unlearn()` (loop.py) runs a method on a model.
"""

from __future__ import annotations

import inspect

from synthflaw.unlearning.base import UnlearningMethod
from synthflaw.unlearning.batches import template_token_mask
from synthflaw.unlearning.gradient_ascent import GradientAscent
from synthflaw.unlearning.gradient_difference import GradientDifference
from synthflaw.unlearning.loop import UnlearnJob, UnlearningDiverged, select_checkpoint, unlearn
from synthflaw.unlearning.lower_bounded import LowerBounded
from synthflaw.unlearning.npo import NPO
from synthflaw.unlearning.simnpo import SimNPO

METHODS: dict[str, type[UnlearningMethod]] = {
    "lower_bounded": LowerBounded,
    "gradient_ascent": GradientAscent,
    "gradient_difference": GradientDifference,
    "npo": NPO,
    "simnpo": SimNPO,
}


def make_method(name: str, **hyperparameters) -> UnlearningMethod:
    """Build the method called `name` with the given hyperparameters (ValueError on an unknown name or argument)."""
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise ValueError(
            f"{name}: unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(**hyperparameters)


__all__ = [
    "METHODS", "make_method", "unlearn", "UnlearnJob", "select_checkpoint", "template_token_mask", "UnlearningDiverged",
    "UnlearningMethod", "LowerBounded", "GradientAscent", "GradientDifference", "NPO", "SimNPO",
]
