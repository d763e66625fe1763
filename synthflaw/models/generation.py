"""Greedy generation: one batched, KV-cached engine with one stop rule, for chat responses and plain continuations.

Every generator in the package goes through `generate_ids`: the evaluation's responses and continuations, the local
chat client (SynthQA generator, judge) and the speed measurement.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from synthflaw.models.batching import check_batch_size, longest_first, pad_batch
from synthflaw.models.build import cache_keyword, model_device, stop_token_ids
from synthflaw.models.tokenizer import chat_text, encode_all, pad_id, start_tokens


@torch.inference_mode()
def generate_ids(model, tokenizer, texts: Sequence[str], max_new_tokens: int,
                 batch_size: int, start: bool = False) -> tuple[list[list[int]], list[int]]:
    """Greedy continuations of `texts`: (new token ids cut before the first stop token, tokens generated per text).

    Left padding keeps every prompt's last token in the last column, so one KV-cached decoding step serves the whole
    batch; position ids count each row's real tokens, so padding changes no prompt's positions. A row that has
    stopped leaves the batch (`_greedy`). The generated count includes the stop token (it was computed). `start`
    puts the start token (BOS, else EOS) before each text, as plain text is scored (chat texts carry their own).
    """
    check_batch_size(batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = model_device(model)
    stop_ids = stop_token_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    prefix = start_tokens(tokenizer) if start else []
    encoded = encode_all(tokenizer, texts)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing; every prompt needs text")
    encoded = [prefix + ids for ids in encoded]
    order = longest_first([len(ids) for ids in encoded])
    responses: list[list[int]] = [[] for _ in encoded]
    generated: list[int] = [0] * len(encoded)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        input_ids, attention_mask = pad_batch([encoded[i] for i in rows], pad, side="left", device=device)
        # fp32 even inside a bf16 autocast (stage 07 scores in the training's precision): a decoding step runs one
        # token per row, matmuls too small for bf16 to pay its casts; under autocast the default model's greedy
        # decoding took 1.1-1.4x longer on a CPU with AVX512-BF16, where its training step ran 1.45x faster.
        with torch.autocast(device.type, enabled=False):
            new_ids = _greedy(model, input_ids, attention_mask, max_new_tokens, stop_ids)
        for row, (i, new) in enumerate(zip(rows, new_ids)):
            cut = next((k for k, token in enumerate(new) if token in stop_ids), None)
            responses[i] = new if cut is None else new[:cut]
            generated[i] = len(new) if cut is None else cut + 1
    return responses, generated


@torch.inference_mode()
def _greedy(model, input_ids, attention_mask, max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
    """Greedy new tokens of each left-padded row, up to and including its first stop token.

    `model.generate` keeps a finished row in the batch, computing padding for it until the last row stops; with
    replies of uneven length (a few run to `max_new_tokens`) that was about half of the decoding work. Here a row
    leaves the batch, and its KV-cache row the cache, as soon as it emits a stop token. Every remaining row computes
    what it computed before: the same tokens, mask and positions (its real tokens counted, as `generate` does).
    """
    keyword = cache_keyword(model)
    stop = torch.tensor(stop_ids, device=input_ids.device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, keyword)
    rows = list(range(input_ids.shape[0]))  # the batch rows still generating, in the cache's order
    next_position = attention_mask.sum(-1)
    new: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        for row, t in zip(rows, token.tolist()):
            new[row].append(t)
        going = ~torch.isin(token, stop)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero()[:, 0]
            cache.reorder_cache(keep)
            rows = [rows[k] for k in keep.tolist()]
            token, attention_mask, next_position = token[keep], attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
                    use_cache=True, **{keyword: cache})
        next_position = next_position + 1
    return new


def generate_continuations(model, tokenizer, texts: Sequence[str], max_new_tokens: int,
                           batch_size: int, start: bool = False) -> list[str]:
    """Greedy, batched, KV-cached continuations of already formatted texts, decoded without special tokens
    (`start`: after the start token, for plain text)."""
    ids, _ = generate_ids(model, tokenizer, texts, max_new_tokens, batch_size, start)
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]


def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """Greedy chat responses: chat template with the generation prompt, left padding, KV cache, stop at
    `<|end|>` or EOS, decoded without special tokens and stripped. Equal to one-prompt-at-a-time generation."""
    return generate_continuations(model, tokenizer, [chat_text(tokenizer, p) for p in prompts], max_new_tokens,
                                  batch_size)


def synchronize(model) -> None:
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()


def generation_speed(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> dict:
    """New tokens per second of the batched path against one prompt at a time (`generate_ids` at batch size 1), on
    the same prompts.

    Both paths run greedy with the KV cache; new tokens count everything computed up to and including each
    response's stop token. A one-prompt warm-up first keeps one-off costs (allocations, kernel selection) out of
    both timings. `speedup` = batched tokens/s / sequential tokens/s; `identical_responses` checks that batching
    changed no response.
    """
    if not prompts:
        raise ValueError("generation_speed needs at least one prompt")
    texts = [chat_text(tokenizer, p) for p in prompts]
    generate_ids(model, tokenizer, texts[:1], max_new_tokens, 1)
    timings = {}
    for name, size in (("batched", batch_size), ("sequential", 1)):
        synchronize(model)
        started = time.perf_counter()
        ids, generated = generate_ids(model, tokenizer, texts, max_new_tokens, size)
        synchronize(model)
        seconds = time.perf_counter() - started
        timings[name] = (ids, sum(generated), seconds)
    batched_rate = timings["batched"][1] / timings["batched"][2]
    sequential_rate = timings["sequential"][1] / timings["sequential"][2]
    return {
        "n_prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "batched_new_tokens": timings["batched"][1], "batched_seconds": timings["batched"][2],
        "batched_tokens_per_s": batched_rate,
        "sequential_new_tokens": timings["sequential"][1], "sequential_seconds": timings["sequential"][2],
        "sequential_tokens_per_s": sequential_rate,
        "speedup": batched_rate / sequential_rate,
        "identical_responses": timings["batched"][0] == timings["sequential"][0],
        "device": str(model_device(model)),
    }


# --------------------------------------------------------------------------------------------------------------
