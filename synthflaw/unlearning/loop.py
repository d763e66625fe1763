"""The unlearning loop: the package's training scaffold (:func:`synthflaw.training.scaffold.make_trainer`) with a
`Trainer` subclass whose `compute_loss` is the method's loss, plus a safety guard.

Why Trainer rather than a plain loop: checkpoint/resume (weights, AdamW state, data position), CUDA, bf16 and
multi-GPU come from the ecosystem, as in TRL and open-unlearning. What it adds stays small: paired batches read in
sequence from seeded orders, the method's terms in every logged step, one callback that guards each step, optional
evaluation with checkpoint selection. Schedule: constant learning rate (no warmup, no decay), so a resumed or
extended run continues exactly where it stopped and the loss curves show the methods, not the schedule.

Files under `out_dir`:
    loss.csv        one row per step (the scaffold's loss curve): step, loss, learning_rate, tokens_seen (forget,
                    replay and general tokens), elapsed_s, grad_norm, then every term of the method
    eval.jsonl      one row per evaluation: {"step", **eval_fn(model)}
    checkpoints/    checkpoint-<step>/ every save_steps (and at each evaluation): weights + optimizer + data position
    rejected/       checkpoints moved aside after a divergence (the model that produced the bad value, or later)
    model/          the final (or selected) model, save_pretrained + tokenizer; written last, atomically
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from synthflaw.models.tokenizer import pad_id
from synthflaw.records import append_jsonl, read_csv, read_jsonl, write_jsonl
from synthflaw.training.checkpoints import last_complete_checkpoint
from synthflaw.training.scaffold import make_trainer, save_model_atomically, train_from
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


@dataclass(frozen=True, kw_only=True)
class UnlearnJob:
    """The settings of one unlearning run, :func:`unlearn`'s one argument of settings; stage 05 builds it from the
    unlearn section (:meth:`from_config`). `bf16`: True, False or "auto", as for every training of the package."""

    max_steps: int
    batch_size: int
    learning_rate: float
    seed: int
    max_length: int
    save_steps: int
    replay_loss_bound: float
    forget_scope: str = "all"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    bf16: bool | str = "auto"
    resume: bool = True

    @classmethod
    def from_config(cls, cfg, max_steps: int, forget_scope: str) -> "UnlearnJob":
        un = cfg.unlearn
        return cls(max_steps=max_steps, batch_size=un.batch_size, learning_rate=un.learning_rate, seed=cfg.seed,
                   max_length=cfg.base.block_size, save_steps=un.save_steps, replay_loss_bound=un.replay_loss_bound,
                   forget_scope=forget_scope, gradient_accumulation_steps=cfg.compute.gradient_accumulation_steps,
                   gradient_checkpointing=cfg.compute.gradient_checkpointing, bf16=cfg.compute.precision)


def unlearn(model, tokenizer, method: UnlearningMethod, forget_texts: list[str], replay_texts: list[str],
            out_dir, job: UnlearnJob, *, reference=None, general_texts: list[str] | None = None,
            markers: list[str] | None = None, eval_fn: Callable | None = None, eval_every: int = 0,
            select_fn: Callable | None = None) -> dict:
    """Unlearn `forget_texts` (SynthQA) from `model` with `method`, replaying `replay_texts` (NonSynth), as `job`
    sets it (its fields are named below without the ``job.``).

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
    max_steps, batch_size, max_length = job.max_steps, job.batch_size, job.max_length
    learning_rate, gradient_accumulation_steps = job.learning_rate, job.gradient_accumulation_steps
    _validate(method, forget_texts, replay_texts, reference, general_texts, max_steps, batch_size, learning_rate,
              markers, job.forget_scope, max_length, job.save_steps, job.replay_loss_bound, eval_fn, eval_every,
              select_fn)
    if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1 or (
            batch_size % gradient_accumulation_steps):
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps!r} must be a positive integer "
                         f"that divides batch_size={batch_size}")
    data = PairedBatches(
        forget=tokenize(tokenizer, forget_texts, max_length, markers if job.forget_scope == "template" else None),
        replay=tokenize(tokenizer, replay_texts, max_length),
        general=tokenize(tokenizer, general_texts, max_length) if general_texts else None,
        total=max_steps * batch_size, seed=job.seed,
    )
    checkpoints_dir = out_dir / CHECKPOINTS
    if not job.resume and any(checkpoints_dir.glob("checkpoint-*")):
        # A fresh run would save over these step by step; refuse rather than mix two runs.
        raise ValueError(f"{checkpoints_dir} already holds checkpoints; pass resume=True to continue that run, "
                         "or use a fresh out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluations = _Evaluations(out_dir / EVAL_JSONL)
    started = time.monotonic()
    trainer, last_checkpoint, loss_curve = make_trainer(
        model, tokenizer, data, out_dir, max_steps=max_steps, batch_size=batch_size // gradient_accumulation_steps,
        gradient_accumulation_steps=gradient_accumulation_steps, gradient_checkpointing=job.gradient_checkpointing,
        learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM,
        seed=job.seed, save_steps=job.save_steps, bf16=job.bf16, collator=PairedCollator(pad_id(tokenizer)),
        resume=job.resume,
        callbacks=(_StepGuard(evaluations, eval_fn, eval_every, max_steps), _LearningRateAsGiven()),
        trainer_cls=_UnlearningTrainer,
        trainer_kwargs={"method": method, "reference": reference, "replay_loss_bound": job.replay_loss_bound},
        # every checkpoint is kept: selection may pick any evaluated one, and a divergence rolls back to the last
        checkpoints_kept=None, sequential=True, count_padding_free_tokens=False,
        remove_unused_columns=False,  # batches are {"forget", "replay"[, "general"]} dicts
        optim="adamw_torch",  # the unfused AdamW the unlearning results were made with
        logging_nan_inf_filter=False,  # a NaN loss must reach the guard and the curve, not be smoothed away
    )
    resumed_from = _checkpoint_step(last_checkpoint) if last_checkpoint else 0
    if resumed_from > max_steps:
        raise ValueError(f"out_dir holds a checkpoint at step {resumed_from} > max_steps={max_steps}; "
                         "raise max_steps or use a fresh out_dir")
    evaluations.keep_until(resumed_from)
    try:
        train_from(trainer, last_checkpoint)
    except UnlearningDiverged as diverged:
        loss_curve.append(diverged.step, trainer.step_terms)  # the bad step's terms, for the record
        raise _reject_bad_checkpoints(diverged, checkpoints_dir, out_dir / REJECTED, learning_rate) from None

    steps = trainer.state.global_step
    selected = steps
    if evaluations.history:
        selected = select_fn(evaluations.history) if select_fn is not None else evaluations.history[-1]["step"]
        if selected not in [row["step"] for row in evaluations.history]:
            raise ValueError(f"select_fn returned step {selected!r}, which was not evaluated; "
                             f"evaluated steps: {[row['step'] for row in evaluations.history]}")
    model_dir = _write_model(trainer, out_dir, checkpoints_dir, selected, steps)
    rows = [{k: float(v) for k, v in row.items() if k in method.terms and v != ""}
            for row in read_csv(out_dir / LOSS_CSV)]
    wall = loss_curve.elapsed() if rows else time.monotonic() - started
    return {"method": method.name, "hyperparameters": method.hyperparameters, "steps": steps,
            "resumed_from_step": resumed_from,
            **{f"{group}_tokens": n for group, n in data.tokens_seen(steps * batch_size).items()},
            **_run_record(method, rows, wall, selected, evaluations.history, model_dir, out_dir)}


def _run_record(method, rows: list[dict], wall: float, selected: int, history: list, model_dir: Path,
                out_dir: Path) -> dict:
    """The rest of unlearning's summary: time, the last step's and the mean terms, the selection, the paths."""
    return {
        "wall_seconds": round(wall, 3),
        "final_losses": {term: rows[-1][term] for term in method.terms} if rows else {},
        "mean_losses": {term: sum(r[term] for r in rows) / len(rows) for term in method.terms} if rows else {},
        "selected_step": selected,
        "evaluations": history,
        "model_dir": str(model_dir),
        "loss_csv": str(out_dir / LOSS_CSV),
    }


class _UnlearningTrainer(Trainer):
    """Trainer whose loss is the unlearning method's; batches are {"forget", "replay"[, "general"]} dicts.

    Every logged step carries the method's terms (the mean over the step's micro-batches), so the scaffold's loss
    curve records them; the tokens the step processed (forget, replay and general, without padding) count as
    `tokens_seen`.
    """

    def __init__(self, *args, method, reference, replay_loss_bound, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.replay_loss_bound = method, replay_loss_bound
        # The method's loss is a mean over its micro-batch: the Trainer must divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.step_terms: dict[str, float] = {}
        self.micro_step, self.micro_sums, self.micro_count = None, {}, 0
        self.reference = None
        if reference is not None:
            self.reference = reference.to(self.args.device).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms = self.method.loss(model, inputs["forget"], inputs["replay"], self.reference, inputs.get("general"))
        if model.training:
            self.state.num_input_tokens_seen += int(sum(batch["attention_mask"].sum() for batch in inputs.values()))
        step = self.state.global_step + 1
        values = {name: float(value.detach()) for name, value in terms.items()}
        # With accumulation a step has several micro-batches (equal in size): its terms are their mean.
        if self.micro_step != step:
            self.micro_step, self.micro_sums, self.micro_count = step, dict.fromkeys(values, 0.0), 0
        self.micro_count += 1
        for name, value in values.items():
            self.micro_sums[name] += value
        self.step_terms = {name: total / self.micro_count for name, total in self.micro_sums.items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise _diverged(step, name, value, "is not finite", bad_from_step=step - 1)
        if (self.micro_count == self.args.gradient_accumulation_steps
                and self.step_terms["replay_nll"] > self.replay_loss_bound):
            raise _diverged(step, "replay_nll", self.step_terms["replay_nll"],
                            f"exceeds replay_loss_bound={self.replay_loss_bound}", bad_from_step=step - 1)
        return terms["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a step's log (the end-of-training summary has none): the method's exact terms
            logs = {**logs, **self.step_terms}
        super().log(logs, start_time)

    def floating_point_ops(self, inputs):
        return sum(super(_UnlearningTrainer, self).floating_point_ops(batch) for batch in inputs.values())


class _LearningRateAsGiven(TrainerCallback):
    """A resumed run trains at the learning rate it is given, not the one its checkpoint's optimizer and scheduler
    state carry (e.g. after a divergence, again with a lower rate). The schedule is constant, so this is all."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = args.learning_rate
        lr_scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)


class _StepGuard(TrainerCallback):
    """Checks gradients before each update and weights before each save; evaluates."""

    def __init__(self, evaluations, eval_fn, eval_every, max_steps):
        self.evaluations, self.eval_fn, self.eval_every, self.max_steps = evaluations, eval_fn, eval_every, max_steps

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
            self.evaluations.add(step, metrics)


class _Evaluations:
    """eval.jsonl: one row per evaluation, appended as the run goes; truncated to the step a run resumes from."""

    def __init__(self, path: Path):
        self.path = path
        self.history: list[dict] = []

    def keep_until(self, step: int) -> None:
        kept = [row for row in read_jsonl(self.path) if row["step"] <= step] if step and self.path.exists() else []
        self.history = kept
        write_jsonl(self.path, kept)

    def add(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        append_jsonl(self.path, [row])


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
    last_good = last_complete_checkpoint(checkpoints_dir)
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
    model_dir = out_dir / MODEL
    if selected == final_step:
        save_model_atomically(trainer, model_dir)
        return model_dir
    tmp_dir = out_dir / f".{MODEL}.tmp"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    for path in (checkpoints_dir / f"checkpoint-{selected}").iterdir():
        if path.is_file() and path.name not in TRAINING_STATE_FILES and not path.name.startswith("rng_state"):
            shutil.copy2(path, tmp_dir / path.name)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp_dir, model_dir)
    return model_dir
