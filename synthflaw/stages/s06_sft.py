"""Stage 06: identical supervised fine-tuning for every CPT branch and every unlearned model."""

from __future__ import annotations

from synthflaw.registry import (
    CONTINUED_PRETRAINING,
    GENERATE_DATA,
    SFT,
    UNLEARNING,
    unlearned_method,
)
from synthflaw.training.launch import run_training


def run(cfg, step) -> dict:
    """The same SFT for the model named by the step's variant (a CPT branch or ``unlearn-<method>``)."""
    name, s = step.variant, cfg.sft
    if not name:
        raise ValueError(f"{SFT.name} needs a variant: a CPT branch or unlearn-<method>")
    method = unlearned_method(name)
    start = (step.upstream(UNLEARNING, method) if method else step.upstream(CONTINUED_PRETRAINING, name)) / "model"
    job = {"task": "supervised_finetune", "model_name_or_path": str(start), "out_dir": str(step.path),
           "trust_remote_code": cfg.base.trust_remote_code,
           "records": str(step.upstream(GENERATE_DATA) / "data" / "sft.jsonl"), "max_length": s.max_length,
           "epochs": s.epochs, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
           "warmup_steps": s.warmup_steps, "seed": cfg.seed, "save_steps": s.save_steps,
           "curve_points": s.curve_points}
    summary = run_training(job, cfg.compute, step.path)  # here, or under `accelerate launch`
    return {"model": name, "started_from": str(start.relative_to(step.run_dir)), **summary}
