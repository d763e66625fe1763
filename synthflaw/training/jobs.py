"""A training task as plain JSON, and the ``python -m synthflaw.training.jobs JOB.json`` entry point that
`accelerate launch` starts in every process (:mod:`synthflaw.training.launch`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from synthflaw import progress
from synthflaw.models.build import load_model
from synthflaw.models.tokenizer import load_tokenizer
from synthflaw.records import read_jsonl
from synthflaw.runs import end_with_parent
from synthflaw.training.pretraining import continue_pretraining, pretrain
from synthflaw.training.sft import supervised_finetune

TEXT_INPUTS = ("texts", "nonsynth", "synthqa", "rewritten", "extra_natural")  # JSONL paths -> lists of "text"
RECORD_INPUTS = ("records",)  # JSONL paths -> lists of records (SFT chats)


def run_job(job: dict) -> dict:
    """Run one training task described by plain JSON, the way `accelerate launch` needs it.

    `job = {"task": "pretrain" | "continue_pretraining" | "supervised_finetune", "model_name_or_path": folder or
    hub id, "out_dir": ..., **keyword arguments of that function}`; text inputs (`texts`, `nonsynth`, `synthqa`,
    `rewritten`, `extra_natural`) and SFT `records` may be given as JSONL paths.
    """
    tasks = {"pretrain": pretrain, "continue_pretraining": continue_pretraining,
             "supervised_finetune": supervised_finetune}
    job = dict(job)
    task = job.pop("task", None)
    if task not in tasks:
        raise ValueError(f"job['task']={task!r}: choose one of {sorted(tasks)}.")
    if "model_name_or_path" not in job or "out_dir" not in job:
        raise ValueError("A job needs 'model_name_or_path' (the model to train) and 'out_dir'.")
    source = job.pop("model_name_or_path")
    trust_remote_code = job.pop("trust_remote_code", False)
    for key in TEXT_INPUTS:
        if isinstance(job.get(key), str):
            job[key] = [record["text"] for record in read_jsonl(job[key])]
    for key in RECORD_INPUTS:
        if isinstance(job.get(key), str):
            job[key] = read_jsonl(job[key])
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    # fp32 master weights (bf16 is autocast): a bf16 copy would round away updates of lr ~1e-5. Loaded on the CPU
    # in every process; the Trainer moves it to this process's device.
    model = load_model(source, trust_remote_code=trust_remote_code, dtype=torch.float32, device="cpu")
    return tasks[task](model, tokenizer, out_dir=job.pop("out_dir"), **job)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    end_with_parent()  # a worker of `accelerate launch` writes into the run: it ends with its launcher
    if len(argv) != 1:
        raise SystemExit("usage: [accelerate launch ...] python -m synthflaw.training.jobs JOB.json")
    progress.quiet_libraries()  # as a stage in the parent process does (launch.log stays readable)
    summary = run_job(json.loads(Path(argv[0]).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
