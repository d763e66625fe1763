"""Supervised fine-tuning (stage 06): identical for every model, loss on assistant tokens only.

Each chat is rendered with the tokenizer's own chat template (so a hub model's template works too), tokenised
once, and labelled -100 everywhere except the assistant turns' content and the token that closes each turn
(`<|end|>` in the embedded template), which is what teaches the model to stop. Batches are padded dynamically.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import datasets

from synthflaw.training.scaffold import (IGNORE_INDEX, CausalLMCollator, data_parallel_processes, train_causal_lm,
                                        write_summary)


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
        raise ValueError("The tokenizer has no chat template; train it with synthflaw.models.tokenizer.train_tokenizer or set one.")
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


def supervised_finetune(
    model,
    tokenizer,
    records: list[dict],
    out_dir: str | Path,
    *,
    max_length: int,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    save_steps: int,
    logging_steps: int = 1,
    bf16: bool | str = "auto",
    resume: bool = True,
    gradient_accumulation_steps: int = 1,
    **train_kwargs,
) -> dict:
    """Fine-tune `model` on chat `records` for `epochs` passes (rounded up to whole steps), loss on assistant tokens.

    Every model of the study gets the same records and arguments, so their SFT differs only in the starting
    weights. Returns `train_causal_lm`'s summary plus the data's size (examples, dropped, assistant tokens).
    """
    if epochs <= 0:
        raise ValueError(f"epochs={epochs}: must be > 0.")
    dataset = encode_chat(tokenizer, records, max_length)
    per_step = batch_size * data_parallel_processes() * gradient_accumulation_steps
    steps = max(1, math.ceil(epochs * len(dataset) / per_step))
    summary = train_causal_lm(
        model, tokenizer, dataset, out_dir, max_steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        warmup_steps=warmup_steps, seed=seed, save_steps=save_steps, logging_steps=logging_steps,
        collator=CausalLMCollator(tokenizer.pad_token_id), bf16=bf16, resume=resume,
        gradient_accumulation_steps=gradient_accumulation_steps, **train_kwargs,
    )
    assistant_tokens = sum(sum(label != IGNORE_INDEX for label in row) for row in dataset["labels"])
    return write_summary(out_dir, {
        **summary, "examples": len(dataset), "dropped_examples": len(records) - len(dataset), "epochs": epochs,
        "assistant_tokens_per_epoch": int(assistant_tokens),
    })
