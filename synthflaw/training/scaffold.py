"""The training scaffold shared by stages 03 (base model), 04 (continued pre-training), 05 (unlearning) and 06 (SFT).

Everything goes through `transformers.Trainer`: checkpoint/resume, progress bars, mixed precision, CUDA and
multi-process data parallelism (`accelerate launch`) come from the ecosystem. What this module adds is small:
packing a corpus into fixed blocks (tokenised once), converting a token budget into an exact number of steps,
a padding collator that never puts loss on padding, the loss curve as CSV, and an atomic final save.

Several processes: `accelerate launch --config_file accelerate/ddp.yaml --num_processes 2 -m synthflaw.training.jobs
job.json` runs one of the training tasks (see `synthflaw.training.jobs.run_job`) with DDP: NCCL on GPUs, gloo on a CPU-only host
(`synthflaw.training.launch` builds that command from the `compute` config section). With accelerate 1.x,
`accelerate launch --cpu --num_processes 2` (or `distributed_type: MULTI_CPU`) starts a single process;
`--multi_gpu` (`distributed_type: MULTI_GPU`) goes through torchrun, and on a host without CUDA the processes join
a gloo group because the TrainingArguments say `use_cpu`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from synthflaw.models.batching import pad, pad_batch

# Measured by benchmarks/throughput.py on the 2-core Xeon this project is developed on (AVX-512 but no
# AVX512-BF16/AMX, so bf16 matmuls are emulated: ~26-50 GFLOP/s against ~85-260 in fp32): the default model
# trains at ~1.3k (1 thread) / ~2.4k (2 threads) tokens/s under bf16 autocast against ~3.4-3.8k / ~6k in fp32.
# So "auto" keeps fp32 on CPU; on CUDA it uses bf16 wherever the GPU supports it.
CPU_BF16_AUTOCAST_IS_FASTER = False

IGNORE_INDEX = -100  # the label value Hugging Face losses skip
LOSS_CURVE_COLUMNS = ("step", "loss", "learning_rate", "tokens_seen", "elapsed_s")
CHECKPOINTS_KEPT = 2


def pack_texts(tokenizer, texts: list[str], block_size: int) -> datasets.Dataset:
    """Tokenise `texts` once, join them with eos after every document and cut the stream into full blocks.

    Every block holds exactly `block_size` real tokens, so a step of `batch_size` blocks trains on exactly
    `batch_size * block_size` tokens and never on padding. The tail that does not fill a block is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: a causal LM block needs at least 2 tokens (use e.g. 256).")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token to separate packed documents; set tokenizer.eos_token.")
    ids = document_token_ids(tokenizer, texts)
    stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int64)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"The corpus has {len(stream)} tokens, fewer than one block of {block_size}: pass more text or a "
            "smaller block_size."
        )
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)
    return datasets.Dataset.from_dict({"input_ids": blocks.tolist()})


def document_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds the eos separators itself)."""
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to tokenise: pass a non-empty list of documents.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Document {i} is a {type(text).__name__}, not a string; pass the documents' text.")
    ids: list[list[int]] = []
    # Batches of 1000 keep the fast tokenizer parallel without a second full copy of the corpus in flight.
    for start in range(0, len(texts), 1000):
        ids.extend(tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"])
    return ids


def steps_for_token_budget(
    max_tokens: int, *, block_size: int, batch_size: int, num_processes: int = 1, gradient_accumulation_steps: int = 1
) -> int:
    """Optimizer steps that train on at most `max_tokens` tokens of packed data.

    One step consumes `block_size * batch_size * num_processes * gradient_accumulation_steps` tokens, all real
    (packed blocks have no padding), so two runs given the same budget and batch shape train on exactly
    `steps * tokens_per_step` tokens each, whatever their corpus.
    """
    tokens_per_step = block_size * batch_size * num_processes * gradient_accumulation_steps
    steps = max_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(
            f"max_tokens={max_tokens} is less than one optimizer step of {tokens_per_step} tokens "
            f"(block {block_size} x batch {batch_size} x {num_processes} processes x {gradient_accumulation_steps} "
            "accumulation): raise max_tokens or shrink the batch."
        )
    return steps


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


class LossCurveCallback(TrainerCallback):
    """Appends one CSV row per logging step to `path`, flushed at once, so a killed run keeps its curve.

    Columns: step, loss, learning_rate, tokens_seen (non-padding tokens, all processes), elapsed_s (training
    seconds across resumes), then grad_norm and any other scalar the trainer logs (an unlearning trainer's loss
    terms) as found in the first row. On resume, rows past the checkpoint's step are dropped: that work is redone.
    """

    NOT_CURVES = ("epoch", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns: list[str] | None = None
        self.elapsed_offset = 0.0
        self.start = time.perf_counter()
        self.initial_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.initial_tokens = state.num_input_tokens_seen
        if not state.is_world_process_zero:
            return
        if state.global_step == 0 or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or [])
            rows = [r for r in reader if int(r["step"]) <= state.global_step]
        if rows:
            self.elapsed_offset = float(rows[-1]["elapsed_s"])
        self._rewrite(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "tokens_seen": state.num_input_tokens_seen,
            "elapsed_s": round(self.elapsed_offset + time.perf_counter() - self.start, 3),
        }
        extras = {k: v for k, v in logs.items() if k not in row and k not in self.NOT_CURVES}
        row.update({k: v for k, v in extras.items() if isinstance(v, (int, float))})
        if self.columns is None:
            self.columns = list(LOSS_CURVE_COLUMNS) + [k for k in row if k not in LOSS_CURVE_COLUMNS]
            self._rewrite([])
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)

    def _rewrite(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)


class LossInProgressBar(ProgressCallback):
    """The usual tqdm bar (also a widget in notebooks) with the latest loss as its postfix.

    Replaces the default progress callbacks, which print every log as a line (or a notebook table row): with
    a log per step that buries the notebook. The curve itself is in loss.csv.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def resolve_bf16(bf16: bool | str) -> bool:
    """`"auto"`: bf16 on a CUDA GPU that supports it, on CPU only where measured faster (see module constant)."""
    if bf16 == "auto":
        if torch.cuda.is_available():
            return torch.cuda.is_bf16_supported()
        return CPU_BF16_AUTOCAST_IS_FASTER
    if isinstance(bf16, bool):
        return bf16
    raise ValueError(f"bf16={bf16!r}: use True, False or 'auto'.")


def train_causal_lm(
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
) -> dict:
    """Train `model` for `max_steps` optimizer steps and save it with its tokenizer into `out_dir/model/`.

    Checkpoints go to `out_dir/checkpoints/` every `save_steps` (the last two are kept); with `resume=True` a run
    whose checkpoints exist continues from the last one, with optimizer, scheduler, RNG and data position
    restored, so a killed and resumed run ends with the weights of an uninterrupted one. The loss curve is
    written to `out_dir/loss.csv` as training goes. `trainer_cls` lets a `Trainer` subclass (e.g. an unlearning
    method overriding `compute_loss`) reuse all of this. The model is trained in place.

    `batch_size` is per process and per micro-step: an optimizer step sees `batch_size * processes *
    gradient_accumulation_steps` examples. `gradient_checkpointing` recomputes each block's activations in the
    backward pass instead of keeping them (less memory, ~30% more compute); the weights it trains are the same.

    Returns a summary: steps, tokens (non-padding tokens trained on, all processes, whole run), tokens and
    wall seconds of this call, tokens/s, final loss, the step resumed from, bf16, the number of processes and the
    batch layout; on CUDA also the peak memory and the model FLOP utilisation (`model_flops_utilisation`).
    """
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size), ("save_steps", save_steps),
                        ("logging_steps", logging_steps), ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0.")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token; load it with synthflaw.models.tokenizer.load_tokenizer (pads with eos)."
        )
    if len(train_dataset) < batch_size * data_parallel_processes():
        raise ValueError(
            f"The training set has {len(train_dataset)} examples, fewer than one batch of {batch_size} per process "
            f"x {data_parallel_processes()} processes: pass more data or a smaller batch_size."
        )
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    last_checkpoint = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if last_checkpoint is not None and not resume:
        raise FileExistsError(
            f"{checkpoint_dir} already holds checkpoints and resume=False: pass resume=True to continue from "
            f"{Path(last_checkpoint).name}, or delete {out_dir} to start over."
        )

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
        bf16=resolve_bf16(bf16),
        # Explicit on CPU-only hosts: it is what makes processes started by torchrun / `accelerate launch
        # --multi_gpu` join one gloo DDP group, and what allows bf16 autocast on CPU. CUDA is used when present.
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=CHECKPOINTS_KEPT,
        logging_strategy="steps",
        logging_steps=logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        dataloader_num_workers=0,
        # Every step gets a full batch, also at an epoch's end: what makes a token budget an exact step count.
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; the search costs a graph traversal
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies only
        disable_tqdm=False,
    )
    loss_curve = LossCurveCallback(out_dir / "loss.csv")
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator if collator is not None else CausalLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[loss_curve, *callbacks],
    )
    for default_bar in [c for c in trainer.callback_handler.callbacks if type(c).__name__.endswith("ProgressCallback")]:
        trainer.remove_callback(default_bar)
    trainer.add_callback(LossInProgressBar())
    on_cuda = args.device.type == "cuda"
    # Measured before training, on the same GPU, so MFU is against what this device does, not a datasheet.
    peak_flops = matmul_flops(torch.bfloat16, args.device) if on_cuda else None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    wall_s = time.perf_counter() - start
    peak_memory = torch.cuda.max_memory_allocated(args.device) if on_cuda else None
    _save_final(trainer, out_dir / "model")

    state = trainer.state
    tokens_this_call = state.num_input_tokens_seen - loss_curve.initial_tokens
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    summary = {
        "steps": state.global_step,
        "tokens": int(state.num_input_tokens_seen),
        "tokens_this_call": int(tokens_this_call),
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens_this_call / wall_s, 1) if wall_s > 0 else None,
        "final_loss": losses[-1] if losses else result.training_loss,
        "resumed_from_step": int(Path(last_checkpoint).name.split("-")[-1]) if last_checkpoint else None,
        "bf16": args.bf16,
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


def write_summary(out_dir: str | Path, summary: dict) -> dict:
    """Write `out_dir/train_summary.json` (main process only) and return the summary.

    Each wrapper (pretrain, continue_pretraining, supervised_finetune) rewrites it with its fuller summary, so the
    file holds the outermost call's.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        path = Path(out_dir) / "train_summary.json"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(partial, path)
    return summary


def _save_final(trainer: Trainer, model_dir: Path) -> None:
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
