"""Supervised fine-tuning (stage 06): identical for every model, loss on assistant tokens only.

Each chat is rendered with the tokenizer's own chat template (so a hub model's template works too), tokenised
once, and labelled -100 everywhere except the assistant turns' content and the token that closes each turn
(`<|end|>` in the embedded template), which is what teaches the model to stop.

Batches are packed (`PackedChatCollator`): a step's chats, the same ones a padded batch would hold, share a few rows
of `max_length` tokens, each chat with its own positions and attention kept inside it. The loss is the same mean over
the same assistant tokens as with padding (transformers divides by the labelled tokens of the step either way), so
packing changes the arithmetic's rounding, not what is trained; chats average ~63 tokens against a batch's longest
~2x that, so a padded batch is about half padding.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import TrainerCallback

from synthflaw.models.batching import pad
from synthflaw.training.scaffold import (
    IGNORE_INDEX,
    CausalLMCollator,
    data_parallel_processes,
    train_causal_lm,
    write_summary,
)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans the model is trained on: each assistant turn's content plus
    its closing tokens, without the whitespace after them.

    A turn's span starts where the generation prompt before it ends and stops where the rendered conversation
    up to that turn ends, less trailing whitespace; this needs a template whose rendering of a prefix of the
    conversation is a prefix of the whole, which holds for the embedded template and common hub templates.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through_turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through_turn) and through_turn.startswith(prompt)):
            raise ValueError(
                "The tokenizer's chat template does not render a conversation's prefix as a prefix of the whole, so "
                "assistant turns cannot be located; use a template without look-ahead (e.g. the embedded one)."
            )
        spans.append((len(prompt), len(through_turn.rstrip())))
    return text, spans


def encode_chat(tokenizer, records: list[dict], max_length: int) -> datasets.Dataset:
    """Tokenise SFT records ({"messages": [{"role", "content"}, ...]}) into input_ids and labels.

    labels[t] = input_ids[t] for tokens lying wholly inside an assistant span (see `assistant_char_spans`) and
    -100 elsewhere. Chats longer than `max_length` tokens are cut at the end; a chat left with no assistant
    token is dropped, with a warning that counts them.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: an SFT example needs at least 2 tokens (use e.g. 256).")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_chat needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; train it with "
                         "synthflaw.models.tokenizer.train_tokenizer or set one.")
    input_ids, labels, dropped = [], [], 0
    for n, record in enumerate(records):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not messages or not any(m.get("role") == "assistant" for m in messages):
            raise ValueError(
                f"SFT record {n} (id={record.get('id') if isinstance(record, dict) else None!r}) has no assistant "
                "turn: every record needs 'messages' with at least one {'role': 'assistant', 'content': ...}."
            )
        text, spans = assistant_char_spans(tokenizer, messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"][:max_length]
        offsets = encoded["offset_mapping"][:max_length]
        row_labels = [
            token if any(start <= a and b <= end for start, end in spans) else IGNORE_INDEX
            for token, (a, b) in zip(ids, offsets)
        ]
        if all(label == IGNORE_INDEX for label in row_labels):
            dropped += 1
            continue
        input_ids.append(ids)
        labels.append(row_labels)
    if dropped:
        warnings.warn(f"{dropped} of {len(records)} SFT chats had no assistant token within max_length={max_length} "
                      "and were dropped; raise max_length to keep them.", stacklevel=2)
    if not input_ids:
        raise ValueError("No SFT example left to train on: pass records with assistant turns, or raise max_length.")
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


@dataclass
class PackedChatCollator:
    """Packs a batch's chats into rows of at most `row_tokens` tokens (a chat longer than that gets a row of its own).

    Each chat keeps its own positions (0, 1, ...). With `position_ids` and no attention mask, transformers finds the
    packed sequences from where the positions restart and keeps attention inside each (a block-diagonal causal mask,
    `masking_utils.find_packed_sequence_indices`); `use_cache=False` is what lets it, since a cache switches that
    detection off. A chat's first label is set to -100: inside a row it would be predicted from the previous chat's
    last token, and a padded batch never trains on a first token either. The row tail is padding with label -100,
    each padding token a sequence of its own.
    """

    pad_token_id: int
    row_tokens: int

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """The chats (indices) of each row: as few rows as the tokens need, filled evenly (longest chat first, each
        into the emptiest row it fits), since every row is padded to the longest one."""
        rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / self.row_tokens)))]
        filled = [0] * len(rows)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            fits = [r for r in range(len(rows)) if filled[r] + lengths[i] <= self.row_tokens or not rows[r]]
            if not fits:
                rows.append([])
                filled.append(0)
                fits = [len(rows) - 1]
            r = min(fits, key=lambda r: filled[r])
            rows[r].append(i)
            filled[r] += lengths[i]
        return [row for row in rows if row]

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        rows = self.rows(lengths)
        ids = [[t for i in row for t in features[i]["input_ids"]] for row in rows]
        labels = [[t for i in row for t in [IGNORE_INDEX, *features[i]["labels"][1:]]] for row in rows]
        positions = [[p for i in row for p in range(lengths[i])] for row in rows]
        return {"input_ids": pad(ids, self.pad_token_id), "labels": pad(labels, IGNORE_INDEX),
                "position_ids": pad(positions, 0), "use_cache": False}


CURVE_DIR = "curve"


class SnapshotCallback(TrainerCallback):
    """Saves the model and tokenizer at the given optimizer steps into ``<folder>/step-<N>/`` (written whole into a
    temporary folder, then renamed), for measurements along training. A step already saved (a resumed run) is kept.
    The main process saves; with DDP every process holds the whole model, so that is all of it."""

    def __init__(self, steps, folder: Path, tokenizer):
        self.steps, self.folder, self.tokenizer = set(steps), Path(folder), tokenizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps or not state.is_world_process_zero:
            return
        target = self.folder / f"step-{state.global_step}"
        if target.exists():
            return
        partial = self.folder / f".step-{state.global_step}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        model.save_pretrained(partial)
        self.tokenizer.save_pretrained(partial)
        os.replace(partial, target)


def curve_steps(total_steps: int, points: int) -> list[int]:
    """The steps of a `points`-point curve along `total_steps` steps, the last being the final step: k/points of the
    way for k = 1..points (a point falling on the same step as another is dropped)."""
    return sorted({max(1, round(total_steps * k / points)) for k in range(1, points + 1)})


def supervised_finetune(
    model,
    tokenizer,
    records: list[dict],
    out_dir: str | Path,
    *,
    max_length: int,
    epochs: float,
    batch_size: int,
    gradient_accumulation_steps: int = 1,
    packed: bool = True,
    curve_points: int = 1,
    **train_kwargs,
) -> dict:
    """Fine-tune `model` on chat `records` for `epochs` passes (rounded up to whole steps), loss on assistant tokens.

    Every model of the study gets the same records and arguments, so their SFT differs only in the starting
    weights. `packed`: a step's chats share rows of `max_length` tokens (`PackedChatCollator`), else each is padded
    to the batch's longest. `curve_points` > 1 also saves the model at the curve's earlier points
    (`curve_steps`) into ``<out_dir>/curve/step-<N>/`` for the SFT budget curve (the last point is `model/`).
    `train_kwargs` (learning rate, seed, checkpoints, ...) are :func:`synthflaw.training.scaffold.make_trainer`'s.
    Returns `train_causal_lm`'s summary plus the data's size (examples, dropped, assistant tokens) and the curve's
    steps.
    """
    if epochs <= 0:
        raise ValueError(f"epochs={epochs}: must be > 0.")
    dataset = encode_chat(tokenizer, records, max_length)
    per_step = batch_size * data_parallel_processes() * gradient_accumulation_steps
    steps = max(1, math.ceil(epochs * len(dataset) / per_step))
    curve = curve_steps(steps, curve_points)
    snapshots = SnapshotCallback([s for s in curve if s < steps], Path(out_dir) / CURVE_DIR, tokenizer)
    train_kwargs["callbacks"] = (*train_kwargs.get("callbacks", ()), snapshots)
    summary = train_causal_lm(
        model, tokenizer, dataset, out_dir, max_steps=steps, batch_size=batch_size,
        collator=(PackedChatCollator(tokenizer.pad_token_id, max_length) if packed
                  else CausalLMCollator(tokenizer.pad_token_id)),
        gradient_accumulation_steps=gradient_accumulation_steps, **train_kwargs,
    )
    assistant_tokens = sum(sum(label != IGNORE_INDEX for label in row) for row in dataset["labels"])
    return write_summary(out_dir, {
        **summary, "examples": len(dataset), "dropped_examples": len(records) - len(dataset), "epochs": epochs,
        "assistant_tokens_per_epoch": int(assistant_tokens), "curve_steps": curve,
    })
