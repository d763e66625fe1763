"""The unlearning method interface and the token-level maths every method shares.

A method turns a forget batch (SynthQA), a replay batch (NonSynth), an optional frozen reference model and an
optional general batch into named scalar loss terms. Batches are Hugging Face style dicts of tensors:
`input_ids`, `attention_mask`, `labels` (-100 = not scored) and, for the template scope, `forget_mask`.

Every method returns, besides its own terms, two monitors computed the same way for all methods so that runs can be
compared and the loop can guard against collapse:
- `forget_nll`: mean over sequences of the per-sequence mean-token NLL on the forget batch (the tokens the method
  targets), i.e. the quantity the lower-bounded loss holds near `tau`;
- `replay_nll`: token-averaged next-token NLL on the replay batch (the standard LM loss on NonSynth).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---- token-level maths (pure functions) ----

def next_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta(y_{t+1} | y_<=t) at every scored position.

    logits[:, t] predicts labels[:, t+1] (the causal-LM shift). Returns `(logp, mask)`, both [B, T-1]; `logp` is 0
    where `mask` is False (label -100). Computed in float32 so bf16 autocast does not round the losses.
    """
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    return -nll * mask, mask


def sequence_logprob(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-likelihood log p(y|x) = sum_t log p(y_t | y_<t) over scored tokens, and the token count |y|.

    Returns `(logprob [B], length [B])`.
    """
    return (logp * mask).sum(dim=-1), mask.sum(dim=-1)


def sequence_mean_nll(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean-token NLL, -(1/|y|) log p(y|x), for the sequences that have at least one scored token.

    Returns `(nll [B'], kept [B] bool)`; sequences with no scored token (e.g. no template token in the template
    scope) are dropped rather than counted as 0, which would bias the mean.
    """
    logprob, length = sequence_logprob(logp, mask)
    kept = length > 0
    return -logprob[kept] / length[kept], kept


def mean_token_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-averaged NLL over all scored tokens of the batch: -(sum logp) / (number of scored tokens).

    The standard causal-LM loss; 0 (still part of the graph) when nothing is scored.
    """
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def sequences_mean(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean of `values`, or a graph-connected 0 built from `reference` when `values` is empty."""
    if values.numel() == 0:
        return reference.sum() * 0.0
    return values.mean()


# ---- batch helpers ----

def forward_logits(model, batch: dict) -> torch.Tensor:
    """The model's logits on a batch; labels are not passed so the model computes no loss of its own."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def scoped_labels(batch: dict, scope: str) -> torch.Tensor:
    """The forget batch's labels restricted to its scope: "all" scored tokens, or only the "template" tokens.

    The template scope needs the batch's `forget_mask` (True on tokens overlapping a template marker, built by
    `synthflaw.unlearning.batches.template_token_mask`).
    """
    if scope == "all":
        return batch["labels"]
    if "forget_mask" not in batch:
        raise ValueError(
            "forget_scope='template' needs a 'forget_mask' in the forget batch; build the batches with "
            "template markers (unlearn(..., UnlearnJob(..., forget_scope='template'), markers=[...]))"
        )
    return batch["labels"].masked_fill(~batch["forget_mask"].bool(), IGNORE_INDEX)


def nll_monitors(forget_logp, forget_mask, replay_logp, replay_mask) -> dict[str, torch.Tensor]:
    """The two monitors every method reports (detached: they are for logging and the loop's guard)."""
    seq_nll, _ = sequence_mean_nll(forget_logp.detach(), forget_mask)
    return {
        "forget_nll": sequences_mean(seq_nll, forget_logp.detach()),
        "replay_nll": mean_token_nll(replay_logp.detach(), replay_mask),
    }


def replay_logprobs(model, replay: dict, with_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay log-probs; with a graph only when the loss trains on them (a retain term with weight > 0), otherwise
    just for reporting `replay_nll`."""
    with torch.set_grad_enabled(with_graph and torch.is_grad_enabled()):
        return next_token_logprobs(forward_logits(model, replay), replay["labels"])


def replay_nll_only(model, replay: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay log-probs without a graph, for methods whose loss has no replay term but still report `replay_nll`."""
    return replay_logprobs(model, replay, with_graph=False)


# ---- hyperparameter validation ----

def check_range(method: str, name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """Return `value` as a float if it lies in [low, high] (or (low, high] with `low_open`), else raise ValueError."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{method}: {name}={value!r} is not a number; valid range is {interval}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise ValueError(f"{method}: {name}={value!r} is out of range; valid range is {interval}")
    return float(value)


def check_choice(method: str, name: str, value, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{method}: {name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


# ---- the interface ----

class UnlearningMethod:
    """Base class: one subclass per method, its hyperparameters are its (validated) constructor arguments.

    Subclasses set `name`, `needs_reference` and `terms` (every key `loss()` returns, "loss" first) and implement
    `loss()`. `hyperparameters` records the resolved values so a run can save them.
    """

    name: ClassVar[str] = ""
    terms: ClassVar[tuple[str, ...]] = ()
    needs_reference: bool = False

    def __init__(self, **hyperparameters):
        self.hyperparameters = dict(hyperparameters)

    def loss(self, model, forget: dict, replay: dict, reference=None, general: dict | None = None) -> dict:
        """Return {"loss": total, every term...} as scalar tensors; only "loss" needs a graph."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def require_reference(self, reference) -> None:
        if self.needs_reference and reference is None:
            raise ValueError(
                f"{self.name} needs a frozen reference model (pass reference=...); "
                "for lower_bounded, w_b=0 removes the need"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({args})"
