"""The callbacks every training run of the package has: the loss curve as CSV, kept across resumes
(:class:`LossCurveCallback`), and the step's one progress bar (:class:`StepProgress`)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from transformers import TrainerCallback

from synthflaw import progress
from synthflaw.records import append_csv_row, write_csv

LOSS_CURVE_COLUMNS = ("step", "loss", "learning_rate", "tokens_seen", "elapsed_s")


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
        self.tokens_seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.initial_tokens = state.num_input_tokens_seen
        if not state.is_world_process_zero:
            return
        if state.global_step == 0 or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        text = self.path.read_text(encoding="utf-8")
        # A last line without its newline was cut by a kill: dropped (records.py's rule for logs), else a row cut
        # to "1" of "12,..." would come back as a second step 1.
        reader = csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1], newline=""))
        if not reader.fieldnames:  # even the header was cut: no curve to keep
            self.path.unlink()
            return
        self.columns = list(reader.fieldnames)
        rows = [r for r in reader if int(r["step"]) <= state.global_step]
        if rows:
            self.elapsed_offset = float(rows[-1]["elapsed_s"])
        self._rewrite(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.tokens_seen = state.num_input_tokens_seen
        self.append(state.global_step, logs)

    def elapsed(self) -> float:
        """Training seconds so far, across resumes."""
        return self.elapsed_offset + time.perf_counter() - self.start

    def append(self, step: int, logs: dict) -> None:
        """Write one row: the step, its loss, learning rate, tokens seen and time, and every other scalar in `logs`."""
        row = {
            "step": step,
            "loss": logs.get("loss"),
            "learning_rate": logs.get("learning_rate"),
            "tokens_seen": self.tokens_seen,
            "elapsed_s": round(self.elapsed(), 3),
        }
        extras = {k: v for k, v in logs.items() if k not in row and k not in self.NOT_CURVES}
        row.update({k: v for k, v in extras.items() if isinstance(v, (int, float))})
        if self.columns is None:
            self.columns = list(LOSS_CURVE_COLUMNS) + [k for k in row if k not in LOSS_CURVE_COLUMNS]
            self._rewrite([])
        append_csv_row(self.path, self.columns, row)

    def _rewrite(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(self.path, rows, columns=self.columns)


class StepProgress(TrainerCallback):
    """The step's one bar (a widget in notebooks, `synthflaw.progress`): optimizer steps, with the last logged loss
    and the tokens/s of this call as its postfix. Replaces the Trainer's own callbacks, which print every log as a
    line (or a notebook table row): with a log per step that buries the notebook. The curve itself is in loss.csv.
    """

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None
        self.start, self.initial_tokens = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress.bar(state.max_steps, self.desc, initial=state.global_step, unit="step")
            self.start, self.initial_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            tokens_per_s = (state.num_input_tokens_seen - self.initial_tokens) / (time.perf_counter() - self.start)
            self.bar.set_postfix_str(f"loss={logs['loss']:.4f}, {tokens_per_s:,.0f} tokens/s", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
