"""Likelihood scoring: log p(continuation | context) for many (context, continuation) pairs, batched.

What every likelihood measurement of the package is built on: multiple-choice benchmarks, perplexities, and the
paired likelihood endpoints of the evaluation (compliance margin, template pull).
"""

from __future__ import annotations

import torch

from synthflaw.models.batching import check_batch_size, longest_first, pad_batch
from synthflaw.models.build import cache_keyword, model_device


@torch.inference_mode()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                          pad_id: int) -> list[tuple[float, int]]:
    """Sum of log p(continuation token | everything before it) and the token count, per (context, continuation).

    Sequences are right-padded, so every real token keeps its unpadded positions and the causal mask hides the
    padding from it: batched and unbatched scores agree up to floating-point rounding. Batches are formed from
    length-sorted sequences to waste little compute on padding.
    """
    check_batch_size(batch_size)
    _check_pairs(pairs)
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



def _check_pairs(pairs) -> None:
    for context, continuation in pairs:
        if not context:
            raise ValueError("a scored continuation needs at least one context token to condition on")
        if not continuation:
            raise ValueError("a scored continuation is empty; remove empty choices or texts from the data")


def _shared_context_batches(pairs, batch_size: int) -> list[list[tuple[list[int], list[int]]]]:
    """The pairs grouped by identical context, as batches of (context, [pair indices]) with at most `batch_size`
    continuations each. Groups with the longest continuations come first: the continuations are most of the tokens,
    so batching by their length wastes least on padding (and an out-of-memory error shows at once)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(i)
    units = [(list(context), members[k:k + batch_size])
             for context, members in groups.items() for k in range(0, len(members), batch_size)]
    units = [units[i] for i in longest_first([max(len(pairs[j][1]) for j in members) for _, members in units])]
    batches, size = [], batch_size
    for unit in units:
        if size + len(unit[1]) > batch_size:
            batches.append([])
            size = 0
        batches[-1].append(unit)
        size += len(unit[1])
    return batches


@torch.inference_mode()
def shared_context_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                            pad_id: int) -> list[tuple[float, int]]:
    """`continuation_logprobs`, with each distinct context encoded once (its KV cache) for all its continuations.

    The paired likelihood endpoints score several replies after one prompt (a compliant and an undone reply, a
    templated and a plain one); running the prompt once per reply cost most of their forward passes. Contexts are
    right-padded and their cache rows repeated per continuation; each continuation is then run on its context's
    cache, with its own positions (after its context's real tokens) and the context's padding masked out, so every
    token sees exactly what it sees in `continuation_logprobs`: the scores agree up to floating-point rounding.
    """
    check_batch_size(batch_size)
    _check_pairs(pairs)
    device, keyword = model_device(model), cache_keyword(model)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for batch in _shared_context_batches(pairs, batch_size):
        context_ids, context_mask = pad_batch([context for context, _ in batch], pad_id, device=device)
        lengths = context_mask.sum(dim=1)
        # Logits at each context's last position only (it predicts the continuation's first token): the output
        # layer over the vocabulary is ~1/5 of this model's work per token, wasted on the other context positions.
        # `logits_to_keep` takes positions shared by the batch's rows, so each row's is picked out of the few kept.
        kept, column = torch.unique(lengths - 1, return_inverse=True)
        out = model(input_ids=context_ids, attention_mask=context_mask, use_cache=True, logits_to_keep=kept)
        last = torch.log_softmax(out.logits[torch.arange(len(batch), device=device), column].float(), dim=-1)
        owner = torch.tensor([g for g, (_, members) in enumerate(batch) for _ in members], device=device)
        rows = [i for _, members in batch for i in members]
        cache = getattr(out, keyword)
        cache.reorder_cache(owner)  # one cache row per continuation, copied from its context's
        input_ids, mask = pad_batch([pairs[i][1] for i in rows], pad_id, device=device)
        positions = lengths[owner, None] + torch.arange(input_ids.shape[1], device=device)
        logits = model(input_ids=input_ids, attention_mask=torch.cat([context_mask[owner], mask], dim=1),
                       position_ids=positions, **{keyword: cache}).logits.float()
        first = last[owner].gather(1, input_ids[:, :1])[:, 0]
        rest = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        for row, i in enumerate(rows):
            n = len(pairs[i][1])
            results[i] = (float(first[row] + rest[row, :n - 1].sum()), n)
    return results
