"""Stage 05 entry point: unlearn the synthetic pattern from the `synthetic` CPT model with one method.

Budget: `unlearn.token_fraction` of the CPT token budget, counted in forget (SynthQA) tokens, the way the paper
counts its 1B unlearning tokens against 300B CPT tokens.

The bound `tau` of the lower-bounded method, when not given, is calibrated: the `natural` control's mean-token NLL on
SynthQA (on the template's tokens for `forget_scope=template`). Forgetting then stops once the synthetic pattern is
as unlikely as it is for a model that never saw SynthQA, which is this reconstruction's reading of "controllable".

A run that diverges (NaN, or replay NLL above `unlearn.replay_loss_bound`) keeps its last good checkpoint as the
model and records where and why it stopped: an unbounded method's collapse is a result of the study, not a crash.

Unlearning runs in one process on one device (the GPU when there is one) whatever `compute.num_processes` says:
its budget is ~1/300 of CPT's. `compute.gradient_accumulation_steps` and `compute.gradient_checkpointing` apply.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from synthflaw.base_model import load_model, load_tokenizer
from synthflaw.generate import load_data
from synthflaw.unlearning import UnlearningDiverged, make_method, unlearn
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


def _keep_last_good(out_dir: Path, tokenizer, start_model_dir: Path) -> int:
    """After a divergence: copy the newest surviving checkpoint (or the starting model) to model/; its step."""
    checkpoints = sorted((out_dir / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    source = checkpoints[-1] if checkpoints else start_model_dir
    target = out_dir / MODEL
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*TRAINING_STATE_FILES, "rng_state*"))
    tokenizer.save_pretrained(target)
    return int(source.name.split("-")[1]) if checkpoints else 0


def run(cfg, step) -> dict:
    if not step.variant:
        raise ValueError("05_unlearning needs a variant: the method (one of synthflaw.unlearning.METHODS)")
    un = cfg.unlearn
    hyper = dict(un.hyperparameters.get(step.variant, {}))
    if step.variant == "lower_bounded":
        hyper.setdefault("forget_scope", un.forget_scope)
    data_dir = step.upstream("01_generate_data") / "data"
    data = load_data(data_dir)
    markers = [m for t in data["synthqa_templates"]["templates"] for m in t["markers"]]
    start_dir = step.upstream("04_continued_pretraining", "synthetic") / "model"
    # fp32 weights to train (bf16 is autocast on CUDA); frozen models too, so their scores match the trained one's
    model, tokenizer = load_model(start_dir, dtype=torch.float32), load_tokenizer(start_dir)
    forget = [r["text"] for r in data["synthqa"]]
    replay = [r["text"] for r in data["nonsynth"]]
    general = [r["text"] for r in data["extra_natural"]] or replay
    scope = hyper.get("forget_scope", "all")
    calibrated = None
    if step.variant == "lower_bounded" and "tau" not in hyper:
        natural_dir = step.upstream("04_continued_pretraining", "natural") / "model"
        calibrated = forget_nll(load_model(natural_dir, dtype=torch.float32), tokenizer, forget[:CALIBRATION_TEXTS],
                                cfg.base.block_size, markers if scope == "template" else None)
        hyper["tau"] = round(calibrated, 4)
    method = make_method(step.variant, **hyper)
    reference = None
    if method.needs_reference:
        ref_branch = "synthetic" if un.reference == "cpt" else "natural"
        reference = load_model(step.upstream("04_continued_pretraining", ref_branch) / "model", dtype=torch.float32)

    # Budget in forget tokens: a fraction of the CPT budget, at the SynthQA texts' mean length.
    mean_len = sum(len(e["input_ids"]) for e in tokenize(tokenizer, forget[:CALIBRATION_TEXTS], cfg.base.block_size)
                   ) / min(len(forget), CALIBRATION_TEXTS)
    budget = un.token_fraction * cfg.cpt.max_tokens
    max_steps = max(1, math.ceil(budget / (un.batch_size * mean_len)))
    stopped = None
    try:
        summary = unlearn(model, tokenizer, method, forget, replay, step.path, reference=reference,
                          general_texts=general, max_steps=max_steps, batch_size=un.batch_size,
                          learning_rate=un.learning_rate, seed=cfg.seed, markers=markers, forget_scope=scope,
                          max_length=cfg.base.block_size, save_steps=un.save_steps,
                          replay_loss_bound=un.replay_loss_bound,
                          gradient_accumulation_steps=cfg.compute.gradient_accumulation_steps,
                          gradient_checkpointing=cfg.compute.gradient_checkpointing)
    except UnlearningDiverged as err:
        kept = _keep_last_good(step.path, tokenizer, start_dir)
        stopped = {"step": err.step, "term": err.term, "value": err.value, "kept_step": kept, "message": str(err)}
        print(f"05_unlearning/{step.variant}: diverged at step {err.step} ({err.term}={err.value:.3g}); "
              f"kept the model of step {kept}")
        summary = {"steps": err.step}
    wall = summary.get("wall_seconds")
    return {"method": step.variant, "hyperparameters": method.hyperparameters, "tau_calibrated": calibrated,
            "max_steps": max_steps, "steps": summary.get("steps"), "forget_tokens": summary.get("forget_tokens"),
            "replay_tokens": summary.get("replay_tokens"), "cpt_tokens": cfg.cpt.max_tokens,
            "forget_token_fraction_of_cpt": (summary.get("forget_tokens") or 0) / cfg.cpt.max_tokens,
            "wall_seconds": wall, "final_losses": summary.get("final_losses"), "diverged": stopped}
