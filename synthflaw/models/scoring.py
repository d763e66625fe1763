"""Likelihood scoring: log p(continuation | context) for many (context, continuation) pairs, batched.

What every likelihood measurement of the package is built on: multiple-choice benchmarks, perplexities, and the
paired likelihood endpoints of the evaluation (compliance margin, template pull).
"""

from __future__ import annotations

import torch

from synthflaw.models.batching import check_batch_size, longest_first, pad_batch
from synthflaw.models.build import model_device
from synthflaw.models.prefix_tree import PrefixTree


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


# A row's width: room for one or more learnable items' trees (~200 tokens each with the default model's tokenizer).
# On the default model's compliance-margin pairs, rows of 160-256 tokens ran within noise of each other, and rows as
# wide as the longest pair (141; trees cut at more places, each cut repeating the path above it) 1.1-1.2x slower.
ROW_TOKENS = 256

# The attention implementations that take a custom 4D mask (a boolean one for sdpa, an additive one for eager).
TREE_ATTENTION = ("sdpa", "eager")


@torch.inference_mode()
def shared_context_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                            pad_id: int) -> list[tuple[float, int]]:
    """`continuation_logprobs`, with every prefix the pairs share computed once.

    The paired likelihood endpoints score several replies after one prompt (a compliant and an undone reply, a
    templated and a plain one) and one reply after several prompts that differ late (a prompt without one of its
    instructions); run pair by pair, the shared tokens were most of the work. Here the pairs' token sequences form
    one prefix tree (`PrefixTree`), packed into rows of `ROW_TOKENS` (or the longest pair), each token at its own
    position and attending to its ancestors only: every token sees exactly what it sees in `continuation_logprobs`,
    so the scores agree up to floating-point rounding. A forward pass takes as many tokens as `batch_size` of the
    longest pairs, the plain path's bound. Models whose attention takes no custom mask (flash attention) are scored
    by the plain path.
    """
    check_batch_size(batch_size)
    _check_pairs(pairs)
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in TREE_ATTENTION:
        return continuation_logprobs(model, pairs, batch_size, pad_id)
    device = model_device(model)
    tree = PrefixTree([context + continuation for context, continuation in pairs])
    longest = max(len(context) + len(continuation) for context, continuation in pairs)
    width = max(ROW_TOKENS, longest)
    # each scored token: its prefix's node (whose next-token distribution scores it) and the token
    wanted: dict[int, set[int]] = {}
    for (context, _), path in zip(pairs, tree.paths):
        for j in range(len(context), len(path)):
            wanted.setdefault(path[j - 1], set()).add(tree.token[path[j]])
    scores: dict[tuple[int, int], float] = {}
    rows = tree.rows(width)
    per_pass = max(1, batch_size * longest // width)
    for start in range(0, len(rows), per_pass):
        ids, positions, allowed, placed = tree.batch(rows[start:start + per_pass], pad_id)
        mask = torch.from_numpy(allowed).to(device)
        if implementation == "eager":  # added to the attention scores
            blocked = torch.finfo(model.dtype).min
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=device).masked_fill(~mask, blocked)
        logits = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=mask,
                       position_ids=torch.from_numpy(positions).to(device)).logits
        picks = [(r, c, node, token) for r, c, node in placed for token in wanted.get(node, ())
                 if (node, token) not in scores]
        if not picks:
            continue
        r, c, _, token = (torch.tensor(column, device=device) for column in zip(*picks))
        chosen = logits[r, c].float()
        logprobs = chosen.gather(1, token[:, None])[:, 0] - torch.logsumexp(chosen, dim=-1)
        scores.update(zip(((node, t) for _, _, node, t in picks), logprobs.tolist()))
    results = []
    for (context, continuation), path in zip(pairs, tree.paths):
        total = sum(scores[(path[j - 1], tree.token[path[j]])] for j in range(len(context), len(path)))
        results.append((float(total), len(continuation)))
    return results
