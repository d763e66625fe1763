"""Stage 05: unlearning the synthetic pattern from the `synthetic` CPT model, one step per method.

Budget: `unlearn.token_fraction` of the CPT token budget, counted in forget (SynthQA) tokens. The lower-bounded
method's `tau`, when not given, is calibrated on the `natural` control (:mod:`synthflaw.unlearning.calibration`).
A run that diverges (NaN, or replay NLL above `unlearn.replay_loss_bound`) keeps its last good checkpoint as the
model and records where and why it stopped: an unbounded method's collapse is a result of the study, not a crash.

Unlearning runs in one process on one device (the GPU when there is one) whatever `compute.num_processes` says:
its budget is ~1/300 of CPT's. `compute.gradient_accumulation_steps` and `compute.gradient_checkpointing` apply.
"""

from __future__ import annotations

import torch

from synthflaw.data.schema import load_data, template_markers
from synthflaw.models.build import load_model
from synthflaw.models.tokenizer import load_tokenizer
from synthflaw.registry import CONTINUED_PRETRAINING, GENERATE_DATA, UNLEARNING
from synthflaw.unlearning import METHODS, UnlearningDiverged, make_method, unlearn
from synthflaw.unlearning.calibration import (CALIBRATION_TEXTS, forget_nll, keep_last_good,
                                              steps_for_forget_budget)


def check(cfg) -> list[str]:
    """Unknown methods, and hyperparameters a method does not take, before any step runs."""
    problems = []
    for name in cfg.unlearn.methods:
        if name not in METHODS:
            problems.append(f"unlearn.methods: unknown method {name!r}; valid: {', '.join(METHODS)}")
    for name, hyper in cfg.unlearn.hyperparameters.items():
        if name not in METHODS:
            problems.append(f"unlearn.hyperparameters: {name!r} is not a method; valid: {', '.join(METHODS)}")
            continue
        if not isinstance(hyper, dict):
            problems.append(f"unlearn.hyperparameters[{name!r}] must be a dict of constructor arguments")
            continue
        try:
            make_method(name, **{"forget_scope": cfg.unlearn.forget_scope, "tau": 1.0, **hyper}
                        if name == "lower_bounded" else hyper)
        except (ValueError, TypeError) as error:
            problems.append(f"unlearn.hyperparameters[{name!r}]: {error}")
    return problems


def run(cfg, step) -> dict:
    if not step.variant:
        raise ValueError(f"{UNLEARNING.name} needs a variant: the method (one of synthflaw.unlearning.METHODS)")
    un = cfg.unlearn
    hyper = dict(un.hyperparameters.get(step.variant, {}))
    if step.variant == "lower_bounded":
        hyper.setdefault("forget_scope", un.forget_scope)
    data = load_data(step.upstream(GENERATE_DATA) / "data")
    markers = template_markers(data["synthqa_templates"])
    start_dir = step.upstream(CONTINUED_PRETRAINING, "synthetic") / "model"
    # fp32 weights to train (bf16 is autocast on CUDA); frozen models too, so their scores match the trained one's
    model, tokenizer = load_model(start_dir, dtype=torch.float32), load_tokenizer(start_dir)
    forget = [r["text"] for r in data["synthqa"]]
    replay = [r["text"] for r in data["nonsynth"]]
    general = [r["text"] for r in data["extra_natural"]] or replay
    scope = hyper.get("forget_scope", "all")
    calibrated = None
    if step.variant == "lower_bounded" and "tau" not in hyper:
        natural_dir = step.upstream(CONTINUED_PRETRAINING, "natural") / "model"
        calibrated = forget_nll(load_model(natural_dir, dtype=torch.float32), tokenizer, forget[:CALIBRATION_TEXTS],
                                cfg.base.block_size, markers if scope == "template" else None)
        hyper["tau"] = round(calibrated, 4)
    method = make_method(step.variant, **hyper)
    reference = None
    if method.needs_reference:
        ref_branch = "synthetic" if un.reference == "cpt" else "natural"
        reference = load_model(step.upstream(CONTINUED_PRETRAINING, ref_branch) / "model", dtype=torch.float32)

    max_steps = steps_for_forget_budget(tokenizer, forget, cfg.base.block_size, un.token_fraction, cfg.cpt.max_tokens,
                                        un.batch_size)
    stopped = None
    try:
        summary = unlearn(model, tokenizer, method, forget, replay, step.path, reference=reference,
                          general_texts=general, max_steps=max_steps, batch_size=un.batch_size,
                          learning_rate=un.learning_rate, seed=cfg.seed, markers=markers, forget_scope=scope,
                          max_length=cfg.base.block_size, save_steps=un.save_steps,
                          replay_loss_bound=un.replay_loss_bound,
                          gradient_accumulation_steps=cfg.compute.gradient_accumulation_steps,
                          gradient_checkpointing=cfg.compute.gradient_checkpointing, bf16=cfg.compute.precision)
    except UnlearningDiverged as err:
        kept = keep_last_good(step.path, tokenizer, start_dir)
        stopped = {"step": err.step, "term": err.term, "value": err.value, "kept_step": kept, "message": str(err)}
        print(f"{step.name}: diverged at step {err.step} ({err.term}={err.value:.3g}); "
              f"kept the model of step {kept}")
        summary = {"steps": err.step}
    wall = summary.get("wall_seconds")
    return {"method": step.variant, "hyperparameters": method.hyperparameters, "tau_calibrated": calibrated,
            "max_steps": max_steps, "steps": summary.get("steps"), "forget_tokens": summary.get("forget_tokens"),
            "replay_tokens": summary.get("replay_tokens"), "cpt_tokens": cfg.cpt.max_tokens,
            "forget_token_fraction_of_cpt": (summary.get("forget_tokens") or 0) / cfg.cpt.max_tokens,
            "wall_seconds": wall, "final_losses": summary.get("final_losses"), "diverged": stopped}
