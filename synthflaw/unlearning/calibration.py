"""What stage 05 sets up around an unlearning run: the calibrated bound, the step budget, and the model kept after
a divergence.

- The bound `tau` of the lower-bounded method, when not given, is calibrated: the `natural` control's mean-token
  NLL on SynthQA (`forget_nll`; on the template's tokens for `forget_scope=template`). Forgetting then stops once
  the synthetic pattern is as unlikely as it is for a model that never saw SynthQA, which is this reconstruction's
  reading of "controllable".
- Budget: a fraction of the CPT token budget, counted in forget (SynthQA) tokens, the way the paper counts its 1B
  unlearning tokens against 300B CPT tokens (`steps_for_forget_budget`).
- A run that diverges keeps its last good checkpoint as the model (`keep_last_good`): an unbounded method's
  collapse is a result of the study, not a crash.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from synthflaw.training.checkpoints import checkpoint_step, last_complete_checkpoint
from synthflaw.unlearning.base import next_token_logprobs, sequence_mean_nll
from synthflaw.unlearning.batches import PairedCollator, tokenize
from synthflaw.unlearning.loop import CHECKPOINTS, MODEL, TRAINING_STATE_FILES

CALIBRATION_TEXTS = 256


@torch.no_grad()
def forget_nll(model, tokenizer, texts: list[str], max_length: int, markers: list[str] | None,
               batch_size: int = 16) -> float:
    """Mean over sequences of the per-sequence mean-token NLL on `texts` (template tokens only with `markers`):
    the quantity `relu(tau - NLL)` bounds."""
    model.eval()
    device = next(model.parameters()).device
    encoded = tokenize(tokenizer, texts, max_length, markers)
    collate = PairedCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    values = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = collate([{"forget": e, "replay": e} for e in chunk])["forget"]
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        if markers is not None:
            labels = labels.masked_fill(batch["forget_mask"] == 0, -100)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = next_token_logprobs(logits, labels)
        nll, _ = sequence_mean_nll(logp, mask)
        values += nll.tolist()
    if not values:
        raise ValueError("no forget text has a scored token; check the SynthQA templates' markers")
    return sum(values) / len(values)


def keep_last_good(out_dir: Path, tokenizer, start_model_dir: Path) -> int:
    """After a divergence: copy the newest complete surviving checkpoint (or the starting model) to model/ through a
    temporary folder and a rename; returns its step (0: the starting model)."""
    last = last_complete_checkpoint(out_dir / CHECKPOINTS)
    source = Path(last) if last else start_model_dir
    target, partial = out_dir / MODEL, out_dir / f".{MODEL}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*TRAINING_STATE_FILES, "rng_state*"))
    tokenizer.save_pretrained(partial)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return checkpoint_step(last) if last else 0


def steps_for_forget_budget(tokenizer, forget_texts: list[str], max_length: int, token_fraction: float,
                            cpt_tokens: int, batch_size: int) -> int:
    """Optimizer steps whose forget batches hold about `token_fraction * cpt_tokens` tokens, at the mean tokenised
    length of the first CALIBRATION_TEXTS forget texts."""
    sample = forget_texts[:CALIBRATION_TEXTS]
    mean_len = sum(len(e["input_ids"]) for e in tokenize(tokenizer, sample, max_length)) / len(sample)
    return max(1, math.ceil(token_fraction * cpt_tokens / (batch_size * mean_len)))
