"""Stage 04: continued pre-training, one step per branch, equal token budgets (see
:mod:`synthflaw.training.pretraining` for what each branch trains on)."""

from __future__ import annotations

from synthflaw.config import BRANCHES
from synthflaw.registry import BASE_MODEL, CONTINUED_PRETRAINING, GENERATE_DATA
from synthflaw.training.jobs import ContinuedPretrainingJob
from synthflaw.training.launch import run_training


def run(cfg, step) -> dict:
    """Stage 04 entry point: one CPT branch (the step's variant) from the base model, with the branch's budget.

    `more_natural` continues from the `cpt.more_natural_from` branch's model (default `synthetic`) for
    `cpt.more_natural_ratio` budgets of extra natural data. From `synthetic` it is the paper's "300B more natural
    tokens" row: the alternative mitigation to unlearning, at ~300x its cost, which "recovers only part of the loss"
    (finding 5); from `natural` it asks whether more natural data alone changes instruction following.

    Runs in this process, or on `compute.num_processes` processes under `accelerate launch`
    (`synthflaw.training.launch`).
    """
    branch, c = step.variant, cfg.cpt
    if branch not in BRANCHES:
        raise ValueError(f"{CONTINUED_PRETRAINING.name} needs a branch as variant, one of {', '.join(BRANCHES)}")
    data_dir = step.upstream(GENERATE_DATA) / "data"
    start = (step.upstream(CONTINUED_PRETRAINING, c.more_natural_from) if branch == "more_natural"
             else step.upstream(BASE_MODEL)) / "model"
    max_tokens = round(c.max_tokens * c.more_natural_ratio) if branch == "more_natural" else c.max_tokens
    job = ContinuedPretrainingJob.from_config(cfg, branch, start, step.path, data_dir, max_tokens)
    summary = run_training(job, cfg.compute, step.path)
    return {"branch": branch, "started_from": str(start.relative_to(step.run_dir)), **summary}
