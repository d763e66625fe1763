"""Likelihood scoring: log p(continuation | context) for many (context, continuation) pairs, batched.

What every likelihood measurement of the package is built on: multiple-choice benchmarks, perplexities, and the
paired likelihood endpoints of the evaluation (compliance margin, template pull).
"""

from __future__ import annotations

import torch

from synthflaw.models.batching import check_batch_size, longest_first, pad_batch
from synthflaw.models.build import model_device


@torch.inference_mode()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                          pad_id: int) -> list[tuple[float, int]]:
    """Sum of log p(continuation token | everything before it) and the token count, per (context, continuation).

    Sequences are right-padded, so every real token keeps its unpadded positions and the causal mask hides the
    padding from it: batched and unbatched scores agree up to floating-point rounding. Batches are formed from
    length-sorted sequences to waste little compute on padding.
    """
    check_batch_size(batch_size)
    for context, continuation in pairs:
        if not context:
            raise ValueError("a scored continuation needs at least one context token to condition on")
        if not continuation:
            raise ValueError("a scored continuation is empty; remove empty choices or texts from the data")
    device = model_device(model)
    order = longest_first([len(c) + len(x) for c, x in pairs])
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = pad_batch([pairs[i][0] + pairs[i][1] for i in rows], pad_id, device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # position t predicts token t + 1
        token_logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        for row, i in enumerate(rows):
            n_context, n_cont = len(pairs[i][0]), len(pairs[i][1])
            total = token_logprobs[row, n_context - 1:n_context - 1 + n_cont].sum().item()
            results[i] = (float(total), n_cont)
    return results

