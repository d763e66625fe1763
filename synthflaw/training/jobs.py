"""A training task as a typed job, one frozen dataclass per kind (pre-training, continued pre-training, SFT), and the
``python -m synthflaw.training.jobs JOB.json`` entry point that `accelerate launch` starts in every process
(:mod:`synthflaw.training.launch`).

A stage builds its job from its configuration section (`from_config`); the job is the ``job.json`` a launch writes
(:meth:`Job.to_json`, through `asdict`) and what the training function gets: its fields are that function's
arguments, under the same names, so a hyperparameter is named once, in the job, on its way from the configuration
to the Trainer.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

from synthflaw import progress
from synthflaw.records import read_jsonl
from synthflaw.runs import end_with_parent


@dataclass(frozen=True, kw_only=True)
class Job:
    """What every kind of training takes: the model to start from, where to write, and the optimisation.

    `batch_size` is the global batch (sequences per optimizer step) until :func:`synthflaw.training.launch.
    run_training` makes it the per-device one for the `compute` section, with its accumulation and checkpointing.
    `bf16`: True, False or `compute.precision`: auto | fp32 | bf16
    (:func:`synthflaw.training.scaffold.resolve_precision`).
    """

    KIND: ClassVar[str] = ""
    FUNCTION: ClassVar[str] = ""  # "module:function", the kind's training function
    INPUTS: ClassVar[tuple[str, ...]] = ()  # fields that name a JSONL file, read when the job runs

    model_name_or_path: str
    out_dir: str
    batch_size: int
    learning_rate: float
    warmup_steps: int
    seed: int
    save_steps: int
    bf16: bool | str = "auto"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    @staticmethod
    def optimisation(section, seed: int) -> dict:
        """The optimisation settings of a configuration section (base, cpt or sft: each has them under these names)."""
        return {"batch_size": section.batch_size, "learning_rate": section.learning_rate,
                "warmup_steps": section.warmup_steps, "save_steps": section.save_steps, "seed": seed}

    def to_json(self) -> dict:
        return {"kind": self.KIND, **asdict(self)}

    def train(self, model, tokenizer) -> dict:
        """Run this job's training function on `model` with the job's fields as its arguments (inputs read)."""
        arguments = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in ("model_name_or_path", "trust_remote_code")}
        for name in self.INPUTS:
            arguments[name] = self.read_input(name)
        module, name = self.FUNCTION.split(":")
        # imported here: the training modules import torch and transformers, a job's JSON needs neither
        return getattr(importlib.import_module(module), name)(model, tokenizer, **arguments)

    def read_input(self, name: str) -> list:
        return [record["text"] for record in read_jsonl(getattr(self, name))]


@dataclass(frozen=True, kw_only=True)
class PretrainJob(Job):
    """Next-token training from scratch on NonSynth (stage 03): :func:`synthflaw.training.pretraining.pretrain`."""

    KIND: ClassVar[str] = "pretrain"
    FUNCTION: ClassVar[str] = "synthflaw.training.pretraining:pretrain"
    INPUTS: ClassVar[tuple[str, ...]] = ("texts",)

    texts: str
    max_tokens: int
    block_size: int

    @classmethod
    def from_config(cls, cfg, model: Path, out_dir: Path, data_dir: Path) -> "PretrainJob":
        b = cfg.base
        return cls(model_name_or_path=str(model), out_dir=str(out_dir), texts=str(data_dir / "nonsynth.jsonl"),
                   max_tokens=b.max_tokens, block_size=b.block_size, **cls.optimisation(b, cfg.seed))


@dataclass(frozen=True, kw_only=True)
class ContinuedPretrainingJob(Job):
    """One CPT branch (stage 04): :func:`synthflaw.training.pretraining.continue_pretraining`."""

    KIND: ClassVar[str] = "continue_pretraining"
    FUNCTION: ClassVar[str] = "synthflaw.training.pretraining:continue_pretraining"
    INPUTS: ClassVar[tuple[str, ...]] = ("nonsynth", "synthqa", "rewritten", "extra_natural")

    branch: str
    nonsynth: str
    synthqa: str
    rewritten: str
    extra_natural: str
    synthetic_fraction: float
    max_tokens: int
    block_size: int

    @classmethod
    def from_config(cls, cfg, branch: str, model: Path, out_dir: Path, data_dir: Path,
                    max_tokens: int) -> "ContinuedPretrainingJob":
        return cls(model_name_or_path=str(model), out_dir=str(out_dir), trust_remote_code=cfg.base.trust_remote_code,
                   branch=branch, **{name: str(data_dir / f"{name}.jsonl") for name in cls.INPUTS},
                   synthetic_fraction=cfg.cpt.synthetic_fraction, max_tokens=max_tokens,
                   block_size=cfg.base.block_size, **cls.optimisation(cfg.cpt, cfg.seed))

    def read_input(self, name: str) -> list:
        return super().read_input(name) if getattr(self, name) else []  # a branch reads only its own corpora


@dataclass(frozen=True, kw_only=True)
class SFTJob(Job):
    """The one SFT every model gets (stage 06): :func:`synthflaw.training.sft.supervised_finetune`."""

    KIND: ClassVar[str] = "supervised_finetune"
    FUNCTION: ClassVar[str] = "synthflaw.training.sft:supervised_finetune"
    INPUTS: ClassVar[tuple[str, ...]] = ("records",)

    records: str
    max_length: int
    epochs: float
    curve_points: int = 1

    @classmethod
    def from_config(cls, cfg, model: Path, out_dir: Path, records: Path) -> "SFTJob":
        s = cfg.sft
        return cls(model_name_or_path=str(model), out_dir=str(out_dir), trust_remote_code=cfg.base.trust_remote_code,
                   records=str(records), max_length=s.max_length, epochs=s.epochs, curve_points=s.curve_points,
                   **cls.optimisation(s, cfg.seed))

    def read_input(self, name: str) -> list:
        return read_jsonl(self.records)  # chats: whole records, not texts


KINDS = (PretrainJob, ContinuedPretrainingJob, SFTJob)


def job_from_json(data: dict) -> Job:
    """The job a ``job.json`` holds (:meth:`Job.to_json`); ValueError naming the kinds and the fields it lacks."""
    data = dict(data)
    kind = data.pop("kind", None)
    found = next((k for k in KINDS if k.KIND == kind), None)
    if found is None:
        raise ValueError(f"job kind {kind!r}: choose one of {', '.join(k.KIND for k in KINDS)}")
    try:
        return found(**data)
    except TypeError as error:
        raise ValueError(f"a {kind} job: {error}") from None


def run_job(job: Job) -> dict:
    """Load the job's model and tokenizer (in this process, or in each launched one) and train it."""
    import torch

    from synthflaw.models.build import load_model
    from synthflaw.models.tokenizer import load_tokenizer

    source = job.model_name_or_path
    tokenizer = load_tokenizer(source, trust_remote_code=job.trust_remote_code)
    # fp32 master weights (bf16 is autocast): a bf16 copy would round away updates of lr ~1e-5. Loaded on the CPU
    # in every process; the Trainer moves it to this process's device.
    model = load_model(source, trust_remote_code=job.trust_remote_code, dtype=torch.float32, device="cpu")
    return job.train(model, tokenizer)


def for_compute(job: Job, batch_size: int, compute) -> Job:
    """`job` with the per-device `batch_size` and the `compute` section's accumulation, checkpointing and precision."""
    return replace(job, batch_size=batch_size, gradient_accumulation_steps=compute.gradient_accumulation_steps,
                   gradient_checkpointing=compute.gradient_checkpointing, bf16=compute.precision)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    end_with_parent()  # a worker of `accelerate launch` writes into the run: it ends with its launcher
    if len(argv) != 1:
        raise SystemExit("usage: [accelerate launch ...] python -m synthflaw.training.jobs JOB.json")
    progress.quiet_libraries()  # as a stage in the parent process does (launch.log stays readable)
    summary = run_job(job_from_json(json.loads(Path(argv[0]).read_text())))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
