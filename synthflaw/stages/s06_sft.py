"""Stage 06: identical supervised fine-tuning for every CPT branch and every unlearned model."""

from __future__ import annotations

from synthflaw.data.positive_control import harmed_sft
from synthflaw.records import read_jsonl, write_jsonl
from synthflaw.registry import GENERATE_DATA, POSITIVE_CONTROL, SFT, sft_start
from synthflaw.training.jobs import SFTJob
from synthflaw.training.launch import run_training


def run(cfg, step) -> dict:
    """The same SFT for the model named by the step's variant (a CPT branch or ``unlearn-<method>``); the positive
    control (`harmed`) starts from natural's CPT model and reads the harmed SFT set, written into its step."""
    name, s = step.variant, cfg.sft
    if not name:
        raise ValueError(f"{SFT.name} needs a variant: a CPT branch, {POSITIVE_CONTROL} or unlearn-<method>")
    start = step.upstream(*sft_start(name)) / "model"
    records = step.upstream(GENERATE_DATA) / "data" / "sft.jsonl"
    if name == POSITIVE_CONTROL:
        records_harmed = step.path / "sft_harmed.jsonl"
        write_jsonl(records_harmed, harmed_sft(read_jsonl(records), s.harm_fraction, cfg.seed))
        records = records_harmed
    job = SFTJob.from_config(cfg, start, step.path, records)
    summary = run_training(job, cfg.compute, step.path)  # here, or under `accelerate launch`
    return {"model": name, "started_from": str(start.relative_to(step.run_dir)), **summary}
