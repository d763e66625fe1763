"""The one policy for a step at its turn: skip it, run it, resume it, reset it, or refuse it (:func:`decide`).

Both engines ask it: the runner (batch, papermill or in-process) for each step of a stage before the stage runs,
and :func:`synthflaw.stages.run_stage` (what a notebook calls, also when stepped through by hand) for each step it
opens. The runner has vetted the whole run beforehand (:func:`synthflaw.runner.plan_run`: products hashed, every
refusal listed), so it asks with the cheap checks of the upstream records; a notebook on its own asks with the
products' digests too (`causes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from synthflaw.config import StudyConfig
from synthflaw.runs.step import BrokenStepFile, Step, StepStale
from synthflaw.runs.staleness import upstream_causes


@dataclass(frozen=True)
class Decision:
    """What to do with a step: "skip" (finished and current), "run" (nothing there yet), "resume" (a started step:
    its checkpoints are kept), "reset" (run from scratch: `reason` says why). A refusal is raised, not returned."""

    action: str
    reason: str = ""

    def enact(self, step: Step) -> Step:
        """Delete the step's folder when the decision is to start it over; the step, for opening."""
        if self.action == "reset":
            step.reset()
        return step


def decide(step: Step, cfg: StudyConfig, *, overwrite: bool = False, reset: bool = False, ran=(),
           restart_after=(), causes=None) -> Decision:
    """The decision for `step` under `cfg`; StepConfigChanged / StepStale (with the fix) when it must be refused.

    - `reset`: the caller's plan asks for the step from scratch (changed or stale with overwrite, figures redone).
    - A step that ran (or started) with another configuration, or whose config.json cannot be read: reset with
      `overwrite`, else refused.
    - A finished step: skipped when nothing it read ran again in this run (`ran`: step names) and `causes(step,
      marker)` (default: its upstream records against the upstreams' markers) finds nothing; reset when every cause
      is healed by running it again (an upstream that ran in this run, steps finished after a step that reads the
      whole run) or with `overwrite`; refused as stale otherwise.
    - An unfinished step: resumed from its checkpoints, unless a step it may read (`restart_after`) ran again in this
      run since it started: its checkpoints were trained on what that step held before, so it starts over.
    """
    if reset:
        return Decision("reset", "asked to run again")
    try:
        state = step.status(cfg)
    except BrokenStepFile:
        if not overwrite:
            raise
        state = "changed"
    if state == "changed":
        if not overwrite:
            raise step.changed_error()
        return Decision("reset", "it ran with a different configuration")
    marker = step.marker()
    if marker is not None:
        found = [name for name in marker.get("upstream", {}) if name in ran]
        stale = (causes or upstream_causes)(step, marker)
        texts = [f"{name} ran again in this run" for name in found] + [c.text for c in stale]
        if not texts:
            return Decision("skip")
        healed = all(c.kind == "new steps" or c.upstream in ran for c in stale)
        if not (healed or overwrite):
            what = f"step {step.name} is stale: {'; '.join(texts)}"
            raise StepStale(f"{what}. Run it again with overwrite=True (synthflaw run --overwrite), which also redoes "
                            "the steps downstream of it", what=what, folders=[step.path])
        return Decision("reset", texts[0])
    if not step.path.exists():
        return Decision("run")
    again = [name for name in restart_after if name in ran]
    if again:
        return Decision("reset", f"{again[0]} ran again since it started")
    return Decision("resume")
