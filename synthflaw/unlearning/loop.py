"""The unlearning loop: a `transformers.Trainer` whose `compute_loss` is the method's loss, plus a safety guard.

Why Trainer rather than a plain loop: checkpoint/resume (weights, AdamW state, data position), CUDA, bf16 and
multi-GPU come from the ecosystem, as in TRL and open-unlearning. What it adds stays small: paired batches read in
sequence from seeded orders, one callback that guards each step and writes the per-term CSV, optional evaluation
with checkpoint selection. Schedule: constant learning rate (no warmup, no decay), so a resumed or extended run
continues exactly where it stopped and the loss curves show the methods, not the schedule.

Files under `out_dir`:
    loss.csv        one row per step: step, every term of the method, lr, grad_norm, elapsed_s (written as it goes)
    eval.jsonl      one row per evaluation: {"step", **eval_fn(model)}
    checkpoints/    checkpoint-<step>/ every save_steps (and at each evaluation): weights + optimizer + data position
    rejected/       checkpoints moved aside after a divergence (the model that produced the bad value, or later)
    model/          the final (or selected) model, save_pretrained + tokenizer; written last, atomically
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from synthflaw.unlearning.base import UnlearningMethod
from synthflaw.unlearning.batches import PairedBatches, PairedCollator, tokenize

LOSS_CSV, EVAL_JSONL = "loss.csv", "eval.jsonl"
CHECKPOINTS, REJECTED, MODEL = "checkpoints", "rejected", "model"
# Files of a Trainer checkpoint that are training state, not the model (left out of model/).
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")
MAX_GRAD_NORM = 1.0


class UnlearningDiverged(RuntimeError):
    """A step produced a non-finite value or a replay NLL above the bound; the run stopped before saving it.

    Attributes: step, term, value, and bad_from_step (checkpoints from this step on hold the model that produced
    the bad value and were moved to rejected/; 0 means the starting model itself).
    """

    def __init__(self, message: str, *, step: int, term: str, value: float, bad_from_step: int):
        super().__init__(message)
        self.step, self.term, self.value, self.bad_from_step = step, term, value, bad_from_step


def select_checkpoint(history: list[dict], *, recovery: str = "recovery", retention: str = "retention",
                      min_retention: float = 0.9) -> int:
    """The default selection rule: return the step of the checkpoint to keep.

    Rule: among the evaluated steps whose `retention` (the fraction of the synthetic model's benchmark gain over
    the natural control that is kept, e.g. 0.93) is >= `min_retention`, take the one with the highest
    instruction-following `recovery` (e.g. the HSR gained back); ties go to the earliest step, i.e. the least
    unlearning. If no step keeps enough of the gain, take the step with the highest retention.
    `eval_fn` must return both keys; bind other names with functools.partial.
    """
    if not history:
        raise ValueError("select_checkpoint needs at least one evaluation (set eval_every > 0 and eval_fn)")
    for key in (recovery, retention):
        missing = [row["step"] for row in history if key not in row]
        if missing:
            raise ValueError(f"evaluation at step(s) {missing} has no {key!r}; eval_fn must return it")
    kept = [row for row in history if row[retention] >= min_retention]
    if kept:
        return max(kept, key=lambda row: (row[recovery], -row["step"]))["step"]
    return max(history, key=lambda row: (row[retention], -row["step"]))["step"]


def unlearn(model, tokenizer, method: UnlearningMethod, forget_texts: list[str], replay_texts: list[str],
            out_dir, *, reference=None, general_texts: list[str] | None = None, max_steps: int, batch_size: int,
            learning_rate: float, seed: int, markers: list[str] | None = None, forget_scope: str = "all",
            max_length: int, save_steps: int, replay_loss_bound: float,
            eval_fn: Callable | None = None, eval_every: int = 0, select_fn: Callable | None = None,
            resume: bool = True, gradient_accumulation_steps: int = 1, gradient_checkpointing: bool = False) -> dict:
    """Unlearn `forget_texts` (SynthQA) from `model` with `method`, replaying `replay_texts` (NonSynth).

    Each step pairs batch_size forget texts with batch_size replay texts (and general texts when given, for the
    bias term), each drawn from its own seeded order. AdamW at a constant `learning_rate`, gradients clipped to
    norm 1, on CUDA when present (bf16 where supported). Every step writes its terms to loss.csv.

    Safety: a non-finite term or gradient, or a replay NLL above `replay_loss_bound` (float("inf") disables that
    check), raises UnlearningDiverged before anything is saved; checkpoints holding the model that produced it are
    moved to rejected/, so the last good checkpoint is what a re-run resumes from. With `resume` (default), a run
    whose out_dir already has checkpoints continues from the newest one with the arguments it is given.

    Memory: `gradient_accumulation_steps` splits each step's batch_size pairs into that many micro-batches (the
    step's loss is their mean, its logged terms too; the replay bound is checked on the step's mean), and
    `gradient_checkpointing` recomputes activations in the backward pass. Neither changes the step's examples; a
    method whose loss is a mean over the batch's tokens (gradient ascent, gradient difference) weighs micro-batches
    equally, so with sequences of unequal length its step differs slightly from the unsplit batch's.

    Evaluation: every `eval_every` steps and at the last step, `eval_fn(model) -> dict` is recorded (eval.jsonl)
    and a checkpoint saved; at the end `select_fn(history) -> step` (default: the last step; see
    `select_checkpoint` for the recovery-vs-retention rule) picks the checkpoint that lands in model/.

    Returns a JSON-ready summary: steps, tokens per group, wall seconds, the last step's terms, the mean of each
    term over the run, the selected step and the paths written.
    """
    out_dir = Path(out_dir)
    _validate(method, forget_texts, replay_texts, reference, general_texts, max_steps, batch_size, learning_rate,
              markers, forget_scope, max_length, save_steps, replay_loss_bound, eval_fn, eval_every, select_fn)
    if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1 or (
            batch_size % gradient_accumulation_steps):
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps!r} must be a positive integer "
                         f"that divides batch_size={batch_size}")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token")

    data = PairedBatches(
        forget=tokenize(tokenizer, forget_texts, max_length, markers if forget_scope == "template" else None),
        replay=tokenize(tokenizer, replay_texts, max_length),
        general=tokenize(tokenizer, general_texts, max_length) if general_texts else None,
        total=max_steps * batch_size, seed=seed,
    )
    checkpoints_dir = out_dir / CHECKPOINTS
    if not resume and any(checkpoints_dir.glob("checkpoint-*")):
        # A fresh run would save over these step by step; refuse rather than mix two runs.
        raise ValueError(f"{checkpoints_dir} already holds checkpoints; pass resume=True to continue that run, "
                         "or use a fresh out_dir")
    last_checkpoint = get_last_checkpoint(str(checkpoints_dir)) if resume and checkpoints_dir.is_dir() else None
    resumed_from = _checkpoint_step(last_checkpoint) if last_checkpoint else 0
    if resumed_from > max_steps:
        raise ValueError(f"out_dir holds a checkpoint at step {resumed_from} > max_steps={max_steps}; "
                         "raise max_steps or use a fresh out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _RunLog(out_dir, method.terms, resumed_from)

    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(checkpoints_dir), max_steps=max_steps,
        per_device_train_batch_size=batch_size // gradient_accumulation_steps,
        gradient_accumulation_steps=gradient_accumulation_steps, activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch", seed=seed, data_seed=seed,
        train_sampling_strategy="sequential", remove_unused_columns=False, dataloader_num_workers=0,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="steps", save_steps=save_steps,
        report_to="none", bf16=use_bf16, dataloader_pin_memory=torch.cuda.is_available(),
    )
    guard = _StepGuard(log, eval_fn, eval_every, max_steps)
    trainer = _UnlearningTrainer(
        model=model, args=args, train_dataset=data, data_collator=PairedCollator(pad_token_id),
        processing_class=tokenizer, callbacks=[guard],
        method=method, reference=reference, replay_loss_bound=replay_loss_bound, log=log,
    )
    # loss.csv holds the numbers; a printed dict per step would flood notebooks.
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress)
    try:
        trainer.train(resume_from_checkpoint=last_checkpoint)
    except UnlearningDiverged as diverged:
        log.write_row(diverged.step, log.step_terms, grad_norm=None)
        raise _reject_bad_checkpoints(diverged, checkpoints_dir, out_dir / REJECTED, learning_rate) from None

    steps = trainer.state.global_step
    selected = steps
    if log.history:
        selected = select_fn(log.history) if select_fn is not None else log.history[-1]["step"]
        if selected not in [row["step"] for row in log.history]:
            raise ValueError(f"select_fn returned step {selected!r}, which was not evaluated; "
                             f"evaluated steps: {[row['step'] for row in log.history]}")
    model_dir = _write_model(trainer, out_dir, checkpoints_dir, selected, steps)

    rows = log.read_rows()
    return {
        "method": method.name,
        "hyperparameters": method.hyperparameters,
        "steps": steps,
        "resumed_from_step": resumed_from,
        **{f"{group}_tokens": n for group, n in data.tokens_seen(steps * batch_size).items()},
        "wall_seconds": round(time.monotonic() - log.start, 3),
        "final_losses": {term: rows[-1][term] for term in method.terms} if rows else {},
        "mean_losses": {term: sum(r[term] for r in rows) / len(rows) for term in method.terms} if rows else {},
        "selected_step": selected,
        "evaluations": log.history,
        "model_dir": str(model_dir),
        "loss_csv": str(out_dir / LOSS_CSV),
    }


class _UnlearningTrainer(Trainer):
    """Trainer whose loss is the unlearning method's; batches are {"forget", "replay"[, "general"]} dicts."""

    def __init__(self, *args, method, reference, replay_loss_bound, log, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.replay_loss_bound, self.run_log = method, replay_loss_bound, log
        # The method's loss is a mean over its micro-batch: the Trainer must divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._micro_step, self._micro_sums, self._micro_count = None, {}, 0
        self.reference = None
        if reference is not None:
            self.reference = reference.to(self.args.device).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms = self.method.loss(model, inputs["forget"], inputs["replay"], self.reference, inputs.get("general"))
        step = self.state.global_step + 1
        values = {name: float(value.detach()) for name, value in terms.items()}
        # With accumulation a step has several micro-batches (equal in size): its terms are their mean.
        if self._micro_step != step:
            self._micro_step, self._micro_sums, self._micro_count = step, dict.fromkeys(values, 0.0), 0
        self._micro_count += 1
        for name, value in values.items():
            self._micro_sums[name] += value
        self.run_log.step_terms = {name: total / self._micro_count for name, total in self._micro_sums.items()}
        self.run_log.step_terms["lr"] = self._get_learning_rate()
        for name, value in values.items():
            if not math.isfinite(value):
                raise _diverged(step, name, value, "is not finite", bad_from_step=step - 1)
        if (self._micro_count == self.args.gradient_accumulation_steps
                and self.run_log.step_terms["replay_nll"] > self.replay_loss_bound):
            raise _diverged(step, "replay_nll", self.run_log.step_terms["replay_nll"],
                            f"exceeds replay_loss_bound={self.replay_loss_bound}", bad_from_step=step - 1)
        return terms["loss"]

    def floating_point_ops(self, inputs):
        return sum(super(_UnlearningTrainer, self).floating_point_ops(batch) for batch in inputs.values())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        # The scheduler state saved in the checkpoint carries the old learning rate; a resumed run (e.g. after a
        # divergence, with a lower rate) must use the one it is given. The schedule is constant, so this is all.
        lr = self.args.learning_rate
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr
        self.lr_scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        self.lr_scheduler._last_lr = [lr] * len(self.optimizer.param_groups)


class _StepGuard(TrainerCallback):
    """Checks gradients before each update and weights before each save; evaluates; writes the per-step CSV row."""

    def __init__(self, log, eval_fn, eval_every, max_steps):
        self.run_log, self.eval_fn, self.eval_every, self.max_steps = log, eval_fn, eval_every, max_steps

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = _count_non_finite(p.grad for p in model.parameters() if p.grad is not None)
        if bad:
            step = state.global_step + 1
            raise _diverged(step, "gradients", bad, "entries are not finite", bad_from_step=step - 1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        evaluate = self.eval_fn is not None and (step % self.eval_every == 0 or step == self.max_steps)
        if evaluate:
            control.should_save = True  # selection needs the evaluated weights on disk
        if control.should_save:
            bad = _count_non_finite(p.detach() for p in model.parameters())
            if bad:
                raise _diverged(step, "parameters", bad, "entries are not finite after the update",
                                bad_from_step=step)
        if evaluate:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                metrics = self.eval_fn(model)
            model.train(was_training)
            self.run_log.add_evaluation(step, metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # per-step logs; the end-of-training summary has no "loss"
            self.run_log.write_row(state.global_step, self.run_log.step_terms, grad_norm=logs.get("grad_norm"))


class _QuietProgress(ProgressCallback):
    """The progress bar, without printing every step's log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _RunLog:
    """loss.csv and eval.jsonl, truncated to the resumed step, appended to as the run goes."""

    def __init__(self, out_dir: Path, terms: tuple[str, ...], resumed_from: int):
        self.csv_path, self.eval_path = out_dir / LOSS_CSV, out_dir / EVAL_JSONL
        self.columns = ["step", *terms, "lr", "grad_norm", "elapsed_s"]
        self.step_terms: dict[str, float] = {}
        kept = [row for row in self.read_rows() if row["step"] <= resumed_from] if resumed_from else []
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in kept)
        # Wall time accumulates across resumed sessions.
        self.start = time.monotonic() - (kept[-1]["elapsed_s"] if kept else 0.0)
        self.history = []
        if resumed_from and self.eval_path.exists():
            self.history = [row for row in map(json.loads, self.eval_path.read_text().splitlines())
                            if row["step"] <= resumed_from]
        self.eval_path.write_text("".join(json.dumps(row) + "\n" for row in self.history))

    def write_row(self, step: int, terms: dict, grad_norm) -> None:
        row = {"step": step, **terms, "grad_norm": grad_norm, "elapsed_s": round(time.monotonic() - self.start, 3)}
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: ("" if v is None else v) for k, v in row.items()})

    def add_evaluation(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_rows(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and list(rows[0]) != self.columns:
            raise ValueError(f"{self.csv_path} has columns {list(rows[0])}, expected {self.columns}: it belongs to "
                             "another method; use a fresh out_dir")
        return [{k: (int(v) if k == "step" else float(v) if v != "" else None) for k, v in row.items()}
                for row in rows]


def _validate(method, forget_texts, replay_texts, reference, general_texts, max_steps, batch_size, learning_rate,
              markers, forget_scope, max_length, save_steps, replay_loss_bound, eval_fn, eval_every, select_fn):
    if not isinstance(method, UnlearningMethod):
        raise ValueError(f"method must be an UnlearningMethod (see synthflaw.unlearning.make_method), got {method!r}")
    for name, texts in (("forget_texts", forget_texts), ("replay_texts", replay_texts)):
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{name} must be a non-empty list of strings")
    if general_texts is not None and (not general_texts or not all(isinstance(t, str) for t in general_texts)):
        raise ValueError("general_texts must be None or a non-empty list of strings")
    method.require_reference(reference)
    for name, value, low in (("max_steps", max_steps, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 2),
                             ("save_steps", save_steps, 1), ("eval_every", eval_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < math.inf):
        raise ValueError(f"learning_rate={learning_rate!r} must be a finite number > 0")
    if not (isinstance(replay_loss_bound, (int, float)) and replay_loss_bound > 0):
        raise ValueError(f"replay_loss_bound={replay_loss_bound!r} must be > 0 (float('inf') disables the check)")
    if forget_scope not in ("all", "template"):
        raise ValueError(f"forget_scope={forget_scope!r}; choose 'all' or 'template'")
    method_scope = getattr(method, "forget_scope", "all")
    if forget_scope != method_scope:
        raise ValueError(f"forget_scope={forget_scope!r} but the method {method.name} uses {method_scope!r}; "
                         "only lower_bounded supports 'template', and both must agree")
    if forget_scope == "template" and not markers:
        raise ValueError("forget_scope='template' needs markers, the template's structural strings "
                         "(synthqa_templates.json: templates[i]['markers'])")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every > 0 needs an eval_fn(model) -> dict")
    if eval_fn is not None and not eval_every:
        raise ValueError("eval_fn is given but eval_every is 0; set eval_every to evaluate every N steps")
    if select_fn is not None and eval_fn is None:
        raise ValueError("select_fn chooses among evaluations; it needs eval_fn and eval_every > 0")


def _diverged(step: int, term: str, value: float, what: str, *, bad_from_step: int) -> UnlearningDiverged:
    return UnlearningDiverged(f"step {step}: {term} = {value!r} {what}", step=step, term=term, value=value,
                              bad_from_step=bad_from_step)


def _count_non_finite(tensors) -> int:
    """Number of NaN/inf entries; entry-wise, since a norm of huge but finite values overflows on its own."""
    return int(sum((~torch.isfinite(t)).sum() for t in tensors))


def _checkpoint_step(path) -> int:
    return int(re.search(r"checkpoint-(\d+)$", str(path)).group(1))


def _reject_bad_checkpoints(diverged: UnlearningDiverged, checkpoints_dir: Path, rejected_dir: Path,
                            learning_rate: float) -> UnlearningDiverged:
    """Move checkpoints from bad_from_step on to rejected/ and return the error with the full explanation."""
    moved = []
    if checkpoints_dir.is_dir():
        for path in sorted(checkpoints_dir.glob("checkpoint-*"), key=_checkpoint_step):
            if _checkpoint_step(path) >= diverged.bad_from_step:
                rejected_dir.mkdir(exist_ok=True)
                target = rejected_dir / path.name
                if target.exists():
                    shutil.rmtree(target)
                path.rename(target)
                moved.append(path.name)
    last_good = get_last_checkpoint(str(checkpoints_dir)) if checkpoints_dir.is_dir() else None
    keeps = (f"the last good checkpoint, {last_good}, is kept" if last_good
             else "no good checkpoint exists yet, so a re-run starts from the original model")
    message = (
        f"unlearning diverged at {diverged}. Nothing was saved from this step; {keeps}"
        + (f" ({', '.join(moved)} moved to {rejected_dir})" if moved else "")
        + f". Lower learning_rate (now {learning_rate:g}), or for lower_bounded lower tau (the forget push stops "
        "sooner) or raise w_r, then run again: it resumes from the last good checkpoint."
    )
    return UnlearningDiverged(message, step=diverged.step, term=diverged.term, value=diverged.value,
                              bad_from_step=diverged.bad_from_step)


def _write_model(trainer: Trainer, out_dir: Path, checkpoints_dir: Path, selected: int, final_step: int) -> Path:
    """Write the selected model to out_dir/model/ via a temporary folder and a rename (never half-written)."""
    model_dir, tmp_dir = out_dir / MODEL, out_dir / f".{MODEL}.tmp"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    if selected == final_step:
        trainer.save_model(str(tmp_dir))
    else:
        source = checkpoints_dir / f"checkpoint-{selected}"
        tmp_dir.mkdir()
        for path in source.iterdir():
            if path.is_file() and path.name not in TRAINING_STATE_FILES and not path.name.startswith("rng_state"):
                shutil.copy2(path, tmp_dir / path.name)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp_dir, model_dir)
    return model_dir
