"""The training scaffold shared by stages 03 (base model), 04 (continued pre-training), 05 (unlearning) and 06 (SFT).

Everything goes through `transformers.Trainer`: checkpoint/resume, progress bars, mixed precision, CUDA and
multi-process data parallelism (`accelerate launch`) come from the ecosystem. What this module adds is small:
one way to build the Trainer (`make_trainer`, which unlearning reuses with its own Trainer subclass), a padding
collator that never puts loss on padding, the loss curve as CSV (`synthflaw.training.callbacks`), an atomic final
save, and resuming only from a complete checkpoint (`resume_checkpoint`): the Trainer writes a checkpoint file by
file, so a kill during a save leaves a folder it cannot resume from.

Several processes: `accelerate launch --config_file accelerate/ddp.yaml --num_processes 2 -m
synthflaw.training.jobs job.json` runs one of the training tasks (see `synthflaw.training.jobs.run_job`) with DDP:
NCCL on GPUs, gloo on a CPU-only host (`synthflaw.training.launch` builds that command from the `compute` section).
With accelerate 1.x, `accelerate launch --cpu --num_processes 2` (or `distributed_type: MULTI_CPU`) starts a single
process;
`--multi_gpu` (`distributed_type: MULTI_GPU`) goes through torchrun, and on a host without CUDA the processes join
a gloo group because the TrainingArguments say `use_cpu`.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from synthflaw.models.batching import pad, pad_batch
from synthflaw.records import write_json
from synthflaw.training import precision
from synthflaw.training.callbacks import LossCurveCallback, StepProgress
from synthflaw.training.checkpoints import (checkpoint_folders, checkpoint_step, last_complete_checkpoint,
                                            resume_checkpoint)

IGNORE_INDEX = -100  # the label value Hugging Face losses skip
# The TrainingArguments field that recomputes activations: transformers 5.2x renamed `gradient_checkpointing` to
# `activation_checkpointing` (the old name a deprecated alias); earlier 5.x releases, e.g. 5.17 in a CUDA image, know
# only the old one.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
                 else "gradient_checkpointing")
CHECKPOINTS_KEPT = 2


@dataclass
class CausalLMCollator:
    """Right-pads a batch to its longest example; padding gets attention 0 and label -100 (no loss on it).

    Examples without "labels" are trained on every real token (packed pre-training); examples with "labels"
    keep them (SFT: -100 outside the assistant turns). Padding is found by position, not by token id, so a
    tokenizer whose pad token is its eos still trains on the real eos tokens.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        input_ids, attention_mask = pad_batch(ids, self.pad_token_id)
        labels = pad([f.get("labels", f["input_ids"]) for f in features], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def resolve_precision(bf16: bool | str, model, train_dataset, batch_size: int) -> dict:
    """`bf16`: True or "bf16", False or "fp32", or "auto" (`compute.precision`), as
    `synthflaw.training.precision.choose` decides it for this model at this batch shape (timed on a CPU, cached per
    machine)."""
    if isinstance(bf16, bool):
        bf16 = "bf16" if bf16 else "fp32"
    if bf16 not in precision.PRECISIONS:
        raise ValueError(f"bf16={bf16!r}: use True, False, or one of {', '.join(precision.PRECISIONS)}.")
    lengths = []
    for i in range(min(len(train_dataset), 16)):  # the batch shape to time: the longest of the first examples
        item = train_dataset[i]
        parts = [item] if "input_ids" in item else [v for v in item.values() if isinstance(v, dict)]  # unlearning
        lengths += [len(part["input_ids"]) for part in parts]
    return precision.choose(bf16, model, batch_size, max(lengths))


def make_trainer(
    model,
    tokenizer,
    train_dataset,
    out_dir: str | Path,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    save_steps: int,
    logging_steps: int = 1,
    collator=None,
    bf16: bool | str = "auto",
    resume: bool = True,
    lr_scheduler_type: str = "cosine",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    callbacks: tuple[TrainerCallback, ...] = (),
    trainer_cls: type[Trainer] = Trainer,
    trainer_kwargs: dict | None = None,
    checkpoints_kept: int | None = CHECKPOINTS_KEPT,
    sequential: bool = False,
    count_padding_free_tokens: bool = True,
    **extra_args,
) -> tuple[Trainer, str | None, LossCurveCallback]:
    """The one way this package builds a `transformers.Trainer`: (trainer, checkpoint to resume from, loss curve).

    Checkpoints go to `out_dir/checkpoints/` every `save_steps` (the last `checkpoints_kept`, None = all); with
    `resume=True` a run whose checkpoints exist continues from the last complete one (`resume_checkpoint`), with
    optimizer, scheduler, RNG and data position restored. The loss curve is written to `out_dir/loss.csv` as
    training goes (`LossCurveCallback`).
    `trainer_cls` (with `trainer_kwargs`) lets a `Trainer` subclass, e.g. an unlearning method's, reuse all of this.
    `sequential`: batches in dataset order (a dataset already in its seeded order), else a seeded random order.
    `count_padding_free_tokens`: the Trainer counts the non-padding tokens of each batch (`tokens_seen`); a trainer
    whose batches are not plain {input_ids, ...} dicts counts its own. `extra_args` go to `TrainingArguments`.

    `batch_size` is per process and per micro-step: an optimizer step sees `batch_size * processes *
    gradient_accumulation_steps` examples. `gradient_checkpointing` recomputes each block's activations in the
    backward pass instead of keeping them (less memory, ~30% more compute); the weights it trains are the same.
    """
    _check_inputs(tokenizer, train_dataset, collator, batch_size, warmup_steps,
                  {"max_steps": max_steps, "batch_size": batch_size, "save_steps": save_steps,
                   "logging_steps": logging_steps, "gradient_accumulation_steps": gradient_accumulation_steps})
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    last_checkpoint = _resume_from(checkpoint_dir, resume)
    chosen = resolve_precision(bf16, model, train_dataset, batch_size)

    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="sequential" if sequential else "random",
        bf16=chosen["precision"] == "bf16",  # autocast: the weights the optimizer updates stay fp32
        # Explicit on CPU-only hosts: it is what makes processes started by torchrun / `accelerate launch
        # --multi_gpu` join one gloo DDP group, and what allows bf16 autocast on CPU. CUDA is used when present.
        use_cpu=not torch.cuda.is_available(),
        **{CHECKPOINTING: gradient_checkpointing,
           f"{CHECKPOINTING}_kwargs": {"use_reentrant": False} if gradient_checkpointing else None},
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=checkpoints_kept,
        logging_strategy="steps",
        logging_steps=logging_steps,
        include_num_input_tokens_seen="non_padding" if count_padding_free_tokens else "no",
        report_to="none",
        dataloader_num_workers=0,
        # Every step gets a full batch, also at an epoch's end: what makes a token budget an exact step count.
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; the search costs a graph traversal
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies only
        disable_tqdm=False,
        **extra_args,
    )
    loss_curve = LossCurveCallback(out_dir / "loss.csv")
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator if collator is not None else CausalLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[loss_curve, *callbacks],
        **(trainer_kwargs or {}),
    )
    # The default progress callbacks print every log as a line (or a notebook table row): one bar instead.
    for default in [c for c in trainer.callback_handler.callbacks
                    if type(c).__name__.endswith(("ProgressCallback", "PrinterCallback"))]:
        trainer.remove_callback(default)
    trainer.add_callback(StepProgress(out_dir.name))  # labelled by the step folder: 03_base_model, natural, npo
    trainer.precision = chosen  # what the summary (result.json) records: the choice and, for `auto`, its timings
    return trainer, last_checkpoint, loss_curve


def _check_inputs(tokenizer, train_dataset, collator, batch_size: int, warmup_steps: int, counts: dict) -> None:
    """ValueError for what `make_trainer` cannot train with, before anything is built."""
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0.")
    if collator is None and tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token; load it with synthflaw.models.tokenizer.load_tokenizer (pads with eos)."
        )
    if len(train_dataset) < batch_size * data_parallel_processes():
        raise ValueError(
            f"The training set has {len(train_dataset)} examples, fewer than one batch of {batch_size} per process "
            f"x {data_parallel_processes()} processes: pass more data or a smaller batch_size."
        )


def _resume_from(checkpoint_dir: Path, resume: bool) -> str | None:
    """The checkpoint to resume from: the newest complete one with `resume`, else None (FileExistsError when
    checkpoints are there and `resume` is off: a fresh run would save over them step by step)."""
    if not resume and checkpoint_folders(checkpoint_dir):
        complete = last_complete_checkpoint(checkpoint_dir)
        raise FileExistsError(
            f"{checkpoint_dir} already holds checkpoints and resume=False: pass resume=True to continue from "
            + (Path(complete).name if complete else "the start (none of them is complete)")
            + f", or delete {checkpoint_dir.parent} to start over."
        )
    # Not the highest-numbered folder (transformers' get_last_checkpoint): a kill during a save leaves it incomplete.
    return resume_checkpoint(checkpoint_dir) if resume else None


def train_causal_lm(model, tokenizer, train_dataset, out_dir: str | Path, **kwargs) -> dict:
    """Train `model` (in place) as `make_trainer` sets it up, for its `max_steps` optimizer steps, and save it with
    its tokenizer into `out_dir/model/`, atomically. A killed and resumed run ends with the weights of an
    uninterrupted one.

    Returns a summary: steps, tokens (non-padding tokens trained on, all processes, whole run), tokens and
    wall seconds of this call, tokens/s, final loss, the step resumed from, bf16, the number of processes and the
    batch layout; on CUDA also the peak memory and the model FLOP utilisation (`model_flops_utilisation`).
    """
    out_dir = Path(out_dir)
    trainer, last_checkpoint, loss_curve = make_trainer(model, tokenizer, train_dataset, out_dir, **kwargs)
    args = trainer.args
    batch_size, gradient_accumulation_steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    gradient_checkpointing = bool(getattr(args, CHECKPOINTING))
    on_cuda = args.device.type == "cuda"
    # Measured before training, on the same GPU, so MFU is against what this device does, not a datasheet.
    peak_flops = matmul_flops(torch.bfloat16, args.device) if on_cuda else None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    result = train_from(trainer, last_checkpoint)
    wall_s = time.perf_counter() - start
    peak_memory = torch.cuda.max_memory_allocated(args.device) if on_cuda else None
    save_model_atomically(trainer, out_dir / "model")

    state = trainer.state
    tokens_this_call = state.num_input_tokens_seen - loss_curve.initial_tokens
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    summary = {
        "steps": state.global_step,
        "tokens": int(state.num_input_tokens_seen),
        "tokens_this_call": int(tokens_this_call),
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens_this_call / wall_s, 1) if wall_s > 0 else None,
        "final_loss": losses[-1] if losses else result.training_loss if result else None,
        "resumed_from_step": checkpoint_step(last_checkpoint) if last_checkpoint else None,
        "bf16": args.bf16,
        "precision": trainer.precision,
        "num_processes": args.world_size,
        "per_device_batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_checkpointing": gradient_checkpointing,
        "device": str(args.device),
    }
    if on_cuda:
        tokens_per_s_per_device = tokens_this_call / wall_s / args.world_size
        summary.update({
            "peak_memory_gib": round(peak_memory / 2**30, 2),
            "bf16_matmul_tflops": round(peak_flops / 1e12, 1),
            "matmul_parameters": matmul_parameters(model),
            # 6N per token (Kaplan et al. 2020): attention scores and gradient checkpointing's recompute not counted
            "model_flops_utilisation": round(6 * matmul_parameters(model) * tokens_per_s_per_device / peak_flops, 4),
        })
    return write_summary(out_dir, summary)


@contextmanager
def _older_objects_frozen():
    """The objects alive before training (the imported libraries: ~0.5M in a study's process) are set aside from the
    garbage collector while the Trainer runs: `train()` calls gc.collect(), which walked them all (0.2-0.3 s a call,
    a tenth of a smoke study). Unfrozen after, so they are collected as before: nothing is kept that would not be.
    Left alone where the process froze objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@_older_objects_frozen()
def train_from(trainer: Trainer, checkpoint: str | None):
    """`trainer.train(resume_from_checkpoint=checkpoint)`, but from a checkpoint already at max_steps nothing is
    trained: the checkpoint is loaded (weights, state, wrapped for the run's backend as usual) and None returned.

    Why: the Trainer checks max_steps after each step, so resumed at max_steps in mid-epoch it trains one step more.
    A kill after the last checkpoint and before model/ is swapped in leaves exactly that; the re-run would add a
    step (a row in loss.csv, a batch of tokens, and with a learning rate not yet at 0 other weights).
    """
    if checkpoint is None or checkpoint_step(checkpoint) < trainer.args.max_steps:
        return trainer.train(resume_from_checkpoint=checkpoint)
    guard = _StopBeforeStepPastMax()
    trainer.add_callback(guard)
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)  # returns when max_steps ends an epoch: no step
    except _AlreadyAtMaxSteps:
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        return None
    finally:
        trainer.remove_callback(guard)


class _AlreadyAtMaxSteps(Exception):
    """Raised before a step past max_steps (see `train_from`)."""


class _StopBeforeStepPastMax(TrainerCallback):
    """Stops the Trainer before a step that would go past max_steps: the only way out before it trains, since the
    Trainer asks its callbacks to stop only after a step. Every process raises at the same point."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _AlreadyAtMaxSteps


def write_summary(out_dir: str | Path, summary: dict) -> dict:
    """Write `out_dir/train_summary.json` (main process only) and return the summary.

    Each wrapper (pretrain, continue_pretraining, supervised_finetune) rewrites it with its fuller summary, so the
    file holds the outermost call's.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(out_dir) / "train_summary.json", summary)
    return summary


def save_model_atomically(trainer: Trainer, model_dir: Path) -> None:
    """Save model + tokenizer into a temporary folder, then swap it in, so `model/` is never half-written."""
    partial = model_dir.with_name(model_dir.name + ".partial")
    if trainer.is_world_process_zero() and partial.exists():
        shutil.rmtree(partial)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))  # only the main process writes; safetensors by default
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(partial, model_dir)
    trainer.accelerator.wait_for_everyone()


def matmul_parameters(model) -> int:
    """Weights that do matrix multiplies per token: every `nn.Linear`, the output head included (also when tied to
    the input embedding, which is a lookup and is left out otherwise)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_flops(dtype: torch.dtype, device: str | torch.device = "cpu", n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) on `device`, best of `reps` after one warm-up: the
    denominator of model FLOP utilisation, measured rather than taken from a datasheet."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def data_parallel_processes() -> int:
    """Processes taking part in data-parallel training (1 unless started by `accelerate launch` / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
