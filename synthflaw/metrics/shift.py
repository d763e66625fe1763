"""Output-distribution shift: how a model's outputs move away from the natural control's.

Per-sample perplexities (the paper's shifted, narrower distribution), template leakage (the SynthQA format showing
up where nobody asked for it), response length, and the next-token KL divergence from a reference model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from synthflaw.models.batching import check_batch_size, pad_batch
from synthflaw.models.build import model_device
from synthflaw.models.scoring import continuation_logprobs
from synthflaw.models.tokenizer import encode_all, encode_chats, pad_id, start_tokens


def perplexities(model, tokenizer, texts: Sequence[str], batch_size: int, *, contexts: Sequence[str] | None = None,
                 max_length: int | None = None) -> np.ndarray:
    """Per-sample perplexity PPL(x) = exp(-(1/|x|) sum_t log p(x_t | x_<t)), batched (equal to unbatched).

    Without `contexts`, each text is scored after the start token (BOS, else EOS), so every token counts. With
    `contexts` (e.g. chat prompts), text i is scored as the response to prompt i: the context is rendered with the
    chat template and only the text's tokens count. Texts longer than `max_length` tokens in all (default: the
    model's `max_position_embeddings`) are cut to fit; the cut is the perplexity of the text's beginning.
    """
    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(contexts)} contexts; pass one context per text or none")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    # with contexts, the generation prompt ends in a newline that belongs to the prompt (not lm-eval's pair rule here)
    contexts_ids = ([start_tokens(tokenizer) for _ in texts] if contexts is None
                    else encode_chats(tokenizer, contexts))
    pairs = []
    for i, (text, context_ids, text_ids) in enumerate(zip(texts, contexts_ids, encode_all(tokenizer, texts))):
        if not text.strip():
            raise ValueError(f"text {i} is empty; perplexity needs at least one token")
        room = max_length - len(context_ids)
        if room < 1:
            raise ValueError(f"context {i} alone fills max_length={max_length} tokens; shorten it or raise "
                             "max_length")
        pairs.append((context_ids, text_ids[:room]))
    scores = continuation_logprobs(model, pairs, batch_size, pad_id(tokenizer))
    return np.array([math.exp(-logprob / n) for logprob, n in scores], dtype=np.float64)


def perplexity_summary(ppl: Sequence[float]) -> dict:
    """Mean, population standard deviation (ddof=0) and median of per-sample perplexities."""
    values = np.asarray(ppl, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no perplexities to summarise; score at least one text")
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values))}


def template_leakage_rate(responses: Sequence[str], markers: Sequence[str]) -> float:
    """Share of responses that contain any SynthQA structural marker (e.g. "Question:", "Answer:"), case-sensitive,
    since the template's markers are capitalised and a lower-case "answer:" in prose is no leak."""
    if not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"markers must be non-empty strings (the SynthQA templates' structural strings), "
                         f"got {markers!r}")
    if not responses:
        raise ValueError("no responses to check for template leakage")
    return float(np.mean([any(m in response for m in markers) for response in responses]))


# A leaked template shows in the first line of a continuation ("Answer: ..."); longer probes only cost time.
PROBE_NEW_TOKENS = 48


def plain_prompt_probes(suite: Sequence[dict], chat: Sequence[dict]) -> list[str]:
    """The prompts a model before SFT continues as plain text to test template leakage: each chat instruction and
    each instruction-suite base prompt once (its level-1 item), none of them in the SynthQA format."""
    return [r["prompt"] for r in chat] + [r["prompt"] for r in suite if r.get("level") == 1]


def mean_response_words(responses: Sequence[str]) -> float:
    """Mean response length in whitespace-separated words."""
    if not responses:
        raise ValueError("no responses to measure")
    return float(np.mean([len(r.split()) for r in responses]))


@torch.inference_mode()
def next_token_kl(model, reference_model, tokenizer, prompts: Sequence[str], batch_size: int) -> float:
    """Mean over prompts of KL(p_model || p_reference) of the next-token distribution at the first response position.

    KL(p || q) = sum_v p(v) (log p(v) - log q(v)), p = the evaluated model, q = the reference (the `natural` model),
    both given the chat template's generation prompt. Direction: the expectation is under the evaluated model's own
    distribution, so the KL weighs the tokens this model would actually emit and grows when it puts mass where the
    reference puts little (e.g. a "Question:" opening) -- the output shift the paper describes; it is also the
    direction of the KL penalty to a reference policy in RLHF and of this project's bias-mitigation loss.
    Both models must share the tokenizer's vocabulary.
    """
    check_batch_size(batch_size)
    if not prompts:
        raise ValueError("next_token_kl needs at least one prompt")
    pad = pad_id(tokenizer)
    encoded = encode_chats(tokenizer, prompts)
    total = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        last = torch.tensor([len(s) - 1 for s in batch])
        log_probs = []
        for m in (model, reference_model):
            input_ids, attention_mask = pad_batch(batch, pad, device=model_device(m))
            logits = m(input_ids=input_ids, attention_mask=attention_mask).logits
            log_probs.append(torch.log_softmax(logits[torch.arange(len(batch), device=logits.device), last.to(logits.device)].float(),
                                               dim=-1).cpu())
        if log_probs[0].shape != log_probs[1].shape:
            raise ValueError(f"the model and the reference model have different vocabularies "
                             f"({log_probs[0].shape[-1]} vs {log_probs[1].shape[-1]}); compare models that share "
                             "a tokenizer")
        log_p, log_q = log_probs
        total += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
    return total / len(encoded)
