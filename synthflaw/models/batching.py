"""Padding: the one helper every batch in the package is built with (scoring, generation, training collators).

Right padding keeps every real token at its unpadded position, so the causal mask hides the padding from it (scoring
and training); left padding keeps every prompt's last token in the last column, so one KV-cached decoding step
serves a whole batch (generation). Padding positions get attention 0 and, for labels, -100 (no loss on them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SIDES = ("right", "left")


def pad(sequences: Sequence[Sequence[int]], value: int, *, side: str = "right",
        dtype: torch.dtype = torch.long) -> torch.Tensor:
    """The sequences as one [B, longest] tensor, padded with `value` on `side`."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if not sequences:
        raise ValueError("nothing to pad: pass at least one sequence")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=dtype)
    for row, seq in enumerate(sequences):
        if len(seq):
            values = torch.as_tensor(seq, dtype=dtype)
            if side == "right":
                out[row, :len(seq)] = values
            else:
                out[row, width - len(seq):] = values
    return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [B, longest], padded on `side`, on `device` when given."""
    input_ids = pad(sequences, pad_id, side=side)
    attention_mask = pad([[1] * len(s) for s in sequences], 0, side=side)
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices ordered by decreasing length: batches of similar length waste little compute on padding, and the
    longest batch comes first, so an out-of-memory error shows at once. Ties keep their order (stable)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
