"""Forget / replay / general batches for unlearning: tokenisation, the template forget_mask, seeded pairing, padding."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from synthflaw.models.batching import pad
from synthflaw.unlearning.base import IGNORE_INDEX

# Independent random streams of one seed, so adding a general set does not reshuffle the forget/replay order.
FORGET_STREAM, REPLAY_STREAM, GENERAL_STREAM = 0, 1, 2


def template_token_mask(tokenizer, texts: list[str], markers: list[str], max_length: int):
    """Tokenise `texts` and mark the tokens that belong to the SynthQA template's structural markers.

    A token is marked (forget_mask = 1) when its character span overlaps an occurrence of any marker string (e.g.
    "Question:", "Answer:"); special tokens, whose span is empty, are never marked. Needs a fast tokenizer (for the
    offset mapping). Returns the tokenizer's encoding (lists, unpadded, truncated to `max_length`) with an added
    "forget_mask" list per text.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("template_token_mask needs a fast tokenizer (offset mapping); load it with use_fast=True")
    markers = list(markers)
    if not markers or any(not isinstance(m, str) or not m for m in markers):
        raise ValueError(f"markers must be a non-empty list of non-empty strings, got {markers!r}")
    encodings = tokenizer(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True)
    masks = []
    for text, offsets in zip(texts, encodings.pop("offset_mapping")):
        spans = [(start, start + len(marker)) for marker in markers for start in _occurrences(text, marker)]
        masks.append([int(end > start and any(start < m_end and m_start < end for m_start, m_end in spans))
                      for start, end in offsets])
    encodings["forget_mask"] = masks
    return encodings


def _occurrences(text: str, marker: str) -> list[int]:
    starts, at = [], text.find(marker)
    while at != -1:
        starts.append(at)
        at = text.find(marker, at + 1)
    return starts


def tokenize(tokenizer, texts: list[str], max_length: int, markers: list[str] | None = None) -> list[dict]:
    """One dict of token lists per text ("input_ids", "attention_mask", and "forget_mask" when markers are given).

    Every text must give at least 2 tokens (one next-token target), else ValueError naming it.
    """
    if markers is not None:
        encodings = template_token_mask(tokenizer, texts, markers, max_length)
    else:
        encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "forget_mask") if k in encodings]
    examples = [{k: encodings[k][i] for k in keys} for i in range(len(texts))]
    for i, example in enumerate(examples):
        if len(example["input_ids"]) < 2:
            raise ValueError(f"text {i} ({texts[i][:40]!r}) gives fewer than 2 tokens: nothing to predict; drop it")
    return examples


def pairing_order(n_items: int, total: int, seed: int, stream: int) -> list[int]:
    """`total` indices into n_items: seeded permutations laid end to end (each item once per pass).

    The order for a longer run extends the order for a shorter one, so a resumed run with more steps sees the
    same first batches.
    """
    rng = np.random.default_rng([seed, stream])
    order: list[int] = []
    while len(order) < total:
        order.extend(rng.permutation(n_items).tolist())
    return order[:total]


class PairedBatches(Dataset):
    """Item i = {"forget": ..., "replay": ..., ["general": ...]}: the i-th example of each seeded order.

    Read in sequence (the Trainer is told so), consecutive items form the paired forget/replay(/general) batches.
    """

    def __init__(self, forget: list[dict], replay: list[dict], general: list[dict] | None, total: int, seed: int):
        self.groups = {"forget": forget, "replay": replay}
        if general is not None:
            self.groups["general"] = general
        streams = {"forget": FORGET_STREAM, "replay": REPLAY_STREAM, "general": GENERAL_STREAM}
        self.orders = {name: pairing_order(len(examples), total, seed, streams[name])
                       for name, examples in self.groups.items()}
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict:
        return {name: self.groups[name][self.orders[name][i]] for name in self.groups}

    def tokens_seen(self, n_items: int) -> dict[str, int]:
        """Tokens (non-padding) of each group in the first n_items items, i.e. in the first n_items/B steps."""
        return {name: sum(len(self.groups[name][j]["input_ids"]) for j in self.orders[name][:n_items])
                for name in self.groups}


class PairedCollator:
    """Pads each group of a list of PairedBatches items on the right; labels are input_ids with padding -> -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        return {name: self.pad([item[name] for item in items]) for name in items[0]}

    def pad(self, examples: list[dict]) -> dict:
        batch = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("forget_mask", 0)):
            if key in examples[0]:
                batch[key] = pad([e[key] for e in examples], fill)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        if "forget_mask" in batch:
            batch["forget_mask"] = batch["forget_mask"].bool()
        return batch
