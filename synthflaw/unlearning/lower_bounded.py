"""The paper's mitigation: lower-bounded forgetting on SynthQA + replay on NonSynth + bias mitigation.

Chen et al. (EMNLP 2024 Findings) name the three parts (a "controllable lower-bounded forgetting loss", a replay
loss and a bias-mitigation loss) but publish no formulas. What follows is THIS PROJECT'S RECONSTRUCTION,
not the paper's formulas; every choice is a hyperparameter:

    L = w_f * L_forget + w_r * L_replay + w_b * L_bias

- L_forget, `forget_loss="bounded_nll"` (default): per forget sequence, relu(tau - NLL(x_syn)), averaged over
  sequences. Gradient ascent on NLL, but the push on a sequence stops once its mean-token NLL reaches tau: the
  loss is bounded below by 0 and cannot drive the model to collapse.
- L_forget, `forget_loss="unlikelihood"`: -log(1 - p(y_t)) averaged over scored tokens (Welleck et al. 2020,
  "Neural text generation with unlikelihood training"); bounded below by 0, its gradient fades as p -> 0.
- `forget_scope="template"`: only tokens overlapping the SynthQA template's structural markers ("Question:",
  "Answer:") are forgotten, so the facts the Q-A pairs carry are not pushed down.
- L_replay: next-token NLL on the replay (NonSynth) batch, to keep general ability.
- L_bias: KL(p_ref || p_theta) on the general batch (the replay batch if none), pulling the output distribution back
  towards a frozen reference (the CPT model before unlearning, or the natural-data control: the caller's choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthflaw.unlearning.base import (
    UnlearningMethod,
    check_choice,
    check_range,
    forward_logits,
    mean_token_nll,
    next_token_logprobs,
    nll_monitors,
    scoped_labels,
    sequence_mean_nll,
)

FORGET_LOSSES = ("bounded_nll", "unlikelihood")
FORGET_SCOPES = ("all", "template")
UNLIKELIHOOD_EPS = 1e-6


def bounded_nll_forget_loss(sequence_nll: torch.Tensor, tau: float) -> torch.Tensor:
    """L_forget = (1/B) sum_i relu(tau - NLL_i), NLL_i the mean-token NLL of forget sequence i.

    Reconstruction of the paper's "controllable lower-bounded forgetting loss" (this project's reading). L >= 0;
    dL/dNLL_i = -1/B while NLL_i < tau (descent raises the NLL) and exactly 0 once NLL_i >= tau (the push stops).
    """
    return torch.relu(tau - sequence_nll).mean()


def unlikelihood_forget_loss(logp: torch.Tensor, mask: torch.Tensor, eps: float = UNLIKELIHOOD_EPS) -> torch.Tensor:
    """L_forget = mean over scored tokens of -log(1 - (1 - eps) * p(y_t)), p = exp(logp).

    The unlikelihood loss of Welleck et al. 2020 ("Neural text generation with unlikelihood training"), applied to
    the forget tokens themselves. The factor (1 - eps) keeps it finite for p -> 1 (at most -log(eps)) while keeping
    it >= 0 and its gradient nonzero there, unlike clamping p, which would zero the gradient where it matters most.
    """
    p = logp.exp()
    token_loss = -torch.log1p(-(1.0 - eps) * p)
    return (token_loss * mask).sum() / mask.sum().clamp(min=1)


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_bias = mean over scored positions t of KL(p_ref(. | x_<=t) || p_theta(. | x_<=t)).

    Direction: from the frozen reference to the model, i.e. sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), the
    distillation direction. It is the cross-entropy against the reference's soft labels minus a constant, so its
    gradient w.r.t. the model's logits is simply p_theta - p_ref, and it penalises the model for losing mass the
    reference puts on general text (mass-covering), which is what "pulling the distribution back" asks for.
    Positions are those whose next token is scored (labels[:, t+1] != -100). Source: this project's reconstruction
    of the paper's bias-mitigation loss; the KL-to-reference regulariser is standard (e.g. TOFU's KL retain term).
    """
    mask = labels[:, 1:] != -100
    log_q = F.log_softmax(logits[:, :-1].float(), dim=-1)
    log_p_ref = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(log_q, log_p_ref, log_target=True, reduction="none").sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class LowerBounded(UnlearningMethod):
    """The paper's method (reconstruction): w_f * L_forget + w_r * L_replay + w_b * L_bias.

    Hyperparameters:
        tau: NLL (nats per token) at which the bounded forget push stops; calibrate it between the synthetic
            model's NLL on SynthQA and the natural control's. Unused by the unlikelihood variant. Range (0, 100].
        forget_loss: "bounded_nll" | "unlikelihood".
        forget_scope: "all" scored tokens, or only the "template" marker tokens (needs `forget_mask` in the batch).
        w_f, w_r, w_b: weights of the three terms, each in [0, 100]; w_b = 0 drops the reference model.
    """

    name = "lower_bounded"
    terms = ("loss", "forget", "replay", "bias", "forget_nll", "replay_nll")

    def __init__(self, *, tau: float = 3.0, forget_loss: str = "bounded_nll", forget_scope: str = "all",
                 w_f: float = 1.0, w_r: float = 1.0, w_b: float = 1.0):
        self.tau = check_range(self.name, "tau", tau, 0.0, 100.0, low_open=True)
        self.forget_loss = check_choice(self.name, "forget_loss", forget_loss, FORGET_LOSSES)
        self.forget_scope = check_choice(self.name, "forget_scope", forget_scope, FORGET_SCOPES)
        self.w_f = check_range(self.name, "w_f", w_f, 0.0, 100.0)
        self.w_r = check_range(self.name, "w_r", w_r, 0.0, 100.0)
        self.w_b = check_range(self.name, "w_b", w_b, 0.0, 100.0)
        if self.w_f + self.w_r + self.w_b == 0:
            raise ValueError(f"{self.name}: w_f, w_r and w_b are all 0, so nothing would be trained; set one > 0")
        self.needs_reference = self.w_b > 0
        super().__init__(tau=self.tau, forget_loss=self.forget_loss, forget_scope=self.forget_scope,
                         w_f=self.w_f, w_r=self.w_r, w_b=self.w_b)

    def loss(self, model, forget, replay, reference=None, general=None):
        self.require_reference(reference)
        forget_labels = scoped_labels(forget, self.forget_scope)
        forget_logp, forget_mask = next_token_logprobs(forward_logits(model, forget), forget_labels)
        if self.forget_loss == "bounded_nll":
            sequence_nll, _ = sequence_mean_nll(forget_logp, forget_mask)
            if sequence_nll.numel():
                l_forget = bounded_nll_forget_loss(sequence_nll, self.tau)
            else:  # no targeted token in the whole batch: a zero that still belongs to the graph
                l_forget = forget_logp.sum() * 0.0
        else:
            l_forget = unlikelihood_forget_loss(forget_logp, forget_mask)

        replay_logits = forward_logits(model, replay)
        replay_logp, replay_mask = next_token_logprobs(replay_logits, replay["labels"])
        l_replay = mean_token_nll(replay_logp, replay_mask)

        if self.w_b > 0:
            bias_batch = general if general is not None else replay
            # Reuse the replay forward pass when the bias term is measured on the replay batch.
            logits = replay_logits if bias_batch is replay else forward_logits(model, bias_batch)
            with torch.no_grad():
                reference_logits = forward_logits(reference, bias_batch)
            l_bias = kl_to_reference(logits, reference_logits, bias_batch["labels"])
        else:
            l_bias = torch.zeros((), device=l_replay.device)

        total = self.w_f * l_forget + self.w_r * l_replay + self.w_b * l_bias
        return {"loss": total, "forget": l_forget, "replay": l_replay, "bias": l_bias,
                **nll_monitors(forget_logp, forget_mask, replay_logp, replay_mask)}

