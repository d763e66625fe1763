"""Likelihood endpoints: measurements read off a model's log-probabilities of fixed replies, paired across models
on identical items. They have range where greedy generation of a tiny model is weak or fragile (a collapsed mode
can hide or fake a pattern), and cost forward passes only.

- Compliance margin (instruction following), per constraint k of a learnable-tier item:
      m_k = lp(compliant | prompt) - lp(compliant with k's edit undone | prompt),
  lp = mean log-probability per token of the reply under the model's chat template. m_k > 0: the model prefers the
  reply that follows instruction k. Its null is the same margin with instruction k's sentence left out of the
  prompt (m0_k): a model that does not read the instruction has m_k = m0_k, so `m - m0` is what the instruction
  moved. An item's margin is the mean over its constraints.
- Template pull (output shift): lp_sum(templated) - lp_sum(plain), in nats per reply, where "templated" is the
  item's base prompt and plain answer written in the SynthQA template ("Question: q\\nAnswer: a") and "plain" the
  same words without its markers ("q\\na"): how strongly the model pulls toward the template's structure, where
  greedy leakage reads 0. After SFT under the chat template; before SFT after the start token (plain text).
- Chat preference: per chat item, lp(reference answer) - max(lp(constant reply), lp(prompt echoed)): whether the
  model ranks a real answer above both trivial replies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synthflaw.metrics.text import CONSTANT_REPLY
from synthflaw.models.scoring import shared_context_logprobs
from synthflaw.models.tokenizer import encode_all, encode_chats, pad_id, start_tokens


def _pairs(tokenizer, contexts: Sequence[str], replies: Sequence[str], chat: bool) -> list[tuple[list[int], list[int]]]:
    start = start_tokens(tokenizer)
    context_ids = (encode_chats(tokenizer, contexts) if chat
                   else [start + ids for ids in encode_all(tokenizer, contexts)])
    return [(ids or start, reply) for ids, reply in zip(context_ids, encode_all(tokenizer, replies))]


def reply_logprobs(model, tokenizer, contexts: Sequence[str], replies: Sequence[str], batch_size: int, *,
                   chat: bool = True) -> np.ndarray:
    """(sum of log-probabilities, token count) of each reply given its context, as an array [n, 2]: under the
    chat template (`chat`), else as plain text after the start token (an empty context: the start token alone).
    Pairs that share a prefix (a prompt, a prompt's first sentences, a reply's opening words) compute it once
    (`shared_context_logprobs`): pass them in one call. A
    (context, reply) pair asked for more than once is scored once: the three levels of a learnable base prompt share
    its template-pull pair, so the template pull is a third of the work it would be."""
    if len(contexts) != len(replies):
        raise ValueError(f"got {len(contexts)} contexts but {len(replies)} replies; pass one context per reply")
    pairs = [(tuple(context), tuple(reply)) for context, reply in _pairs(tokenizer, contexts, replies, chat)]
    distinct = list(dict.fromkeys(pairs))
    scores = shared_context_logprobs(model, [(list(c), list(r)) for c, r in distinct], batch_size, pad_id(tokenizer))
    index = {pair: k for k, pair in enumerate(distinct)}
    return np.array([scores[index[pair]] for pair in pairs], dtype=np.float64)


def _mean(scores: np.ndarray) -> np.ndarray:
    return scores[:, 0] / scores[:, 1]


def compliance_margins(model, tokenizer, items: Sequence[dict], batch_size: int) -> dict[str, list[float]]:
    """Per learnable-tier item: the mean over its constraints of the compliance margin with the instructions
    (`margin`) and with each constraint's own sentence left out of the prompt (`margin_null`)."""
    requests: dict[tuple, tuple[str, str]] = {}  # what to score: key -> (context, reply)
    for i, item in enumerate(items):
        requests[(i, "compliant")] = (item["prompt"], item["reference"])
        for k, undone in enumerate(item["undone"]):
            without = " ".join([item["base_prompt"], *item["instructions"][:k], *item["instructions"][k + 1:]])
            requests[(i, k, "undone")] = (item["prompt"], undone)
            requests[(i, k, "compliant_without")] = (without, item["reference"])
            requests[(i, k, "undone_without")] = (without, undone)
    keys = list(requests)
    scores = reply_logprobs(model, tokenizer, [requests[key][0] for key in keys],
                            [requests[key][1] for key in keys], batch_size)
    lp = dict(zip(keys, _mean(scores)))
    margin, null = [], []
    for i, item in enumerate(items):
        ks = range(len(item["undone"]))
        margin.append(float(np.mean([lp[(i, "compliant")] - lp[(i, k, "undone")] for k in ks])))
        null.append(float(np.mean([lp[(i, k, "compliant_without")] - lp[(i, k, "undone_without")] for k in ks])))
    return {"margin": margin, "margin_null": null}


def template_forms(item: dict, template: dict) -> tuple[str, str]:
    """(templated, plain) forms of an item's base prompt and plain answer: the SynthQA template, and the same
    words joined by a line break."""
    question, answer = item["base_prompt"], item["plain"]
    return template["format"].format(question=question, answer=answer), f"{question}\n{answer}"


def template_pull(model, tokenizer, items: Sequence[dict], template: dict, batch_size: int, *,
                  chat: bool = True) -> list[float]:
    """Per item: lp_sum(templated) - lp_sum(plain) in nats (see the module docstring); after the chat prompt of the
    item's base prompt (`chat`), else after the start token."""
    forms = [template_forms(item, template) for item in items]
    contexts = [item["base_prompt"] if chat else "" for item in items]
    # one call, so that both forms of an item share the pass over its prompt
    scores = reply_logprobs(model, tokenizer, contexts * 2, [t for t, _ in forms] + [p for _, p in forms],
                            batch_size, chat=chat)
    templated, plain = scores[:len(items)], scores[len(items):]
    return (templated[:, 0] - plain[:, 0]).tolist()


def chat_preference(model, tokenizer, items: Sequence[dict], batch_size: int) -> list[float]:
    """Per chat item: lp(reference) - max(lp(constant reply), lp(prompt echoed)), mean log-probability per token
    under the chat template. Positive: the model ranks the real answer above both trivial replies."""
    prompts, n = [item["prompt"] for item in items], len(items)
    # one call, so that the three replies of an item share the pass over its prompt
    scores = _mean(reply_logprobs(model, tokenizer, prompts * 3,
                                  [item["reference"] for item in items] + [CONSTANT_REPLY] * n + prompts, batch_size))
    reference, constant, echo = scores[:n], scores[n:2 * n], scores[2 * n:]
    return (reference - np.maximum(constant, echo)).tolist()
