"""The study's stages, one module each, named by number as in ``notebooks/`` and ``runs/``:

    s01_generate_data  s02_data_flaws  s03_base_model  s04_continued_pretraining
    s05_unlearning     s06_sft         s07_evaluate    s08_figures

Each holds the stage's `run(cfg, step) -> dict` (read inputs, call library functions, write outputs) and, where a
configuration can be wrong in a way its types cannot show, `check(cfg) -> list[str]` (the problems, found before any
step runs). The table of stages (order, fan-out, config sections) is :mod:`synthflaw.registry`.

`run_stage` is the one call a stage's notebook makes: every variant of the stage, each in its own step folder,
marked done as it finishes.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import ModuleType

from synthflaw import progress
from synthflaw.config import ConfigError, StudyConfig
from synthflaw.registry import STAGES, Stage, stage_variants
from synthflaw.registry import stage as find_stage
from synthflaw.runs import Freshness, Step, decide


def stage_module(stage: str | Stage) -> ModuleType:
    """The module of a stage (imported on first use: each stage imports only what it needs).

    Every way of running a stage (a notebook's `run_stage`, the runner's in-process engine) gets its module here,
    so this is where the libraries' own progress bars and messages go off (`synthflaw.progress`; SYNTHFLAW_DEBUG=1
    keeps them).
    """
    progress.quiet_libraries()
    return importlib.import_module(find_stage(stage).module)


def check(cfg: StudyConfig) -> None:
    """Every stage's own checks of `cfg`; ConfigError listing every problem found."""
    problems = []
    for s in STAGES:
        checker = getattr(stage_module(s), "check", None)
        if checker is not None:
            problems += checker(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def run_stage(stage: str | Stage, run_dir: str | Path, cfg: StudyConfig, variants=None, *, overwrite: bool = False,
              log=print):
    """Run a stage into ``<run_dir>/<NN_stage>[/<variant>]``: every variant `cfg` lists (or the subset `variants`),
    in study order; a finished step with the same configuration is not run again. Prints one line per finished
    step with its time. Returns the stage's result, or {variant: result} for a fanned-out stage.

    A finished step that is stale (its products or an upstream it read changed since) is refused unless
    `overwrite`, which runs it again; one that reads the whole run (stage 08) runs again when steps finished after
    it. A done.json that cannot be read counts as not finished: the step runs again, and the line says why.
    """
    s = find_stage(stage)
    module = stage_module(s)
    freshness = Freshness(run_dir)
    results = {}
    for variant in stage_variants(cfg, s, variants) if s.variants else [None]:
        step = Step(Path(run_dir), s, variant)
        if step.marker_problem():
            log(f"{step.marker_problem()}: {step.name} counts as not finished and runs again")
        decision = decide(step, cfg, overwrite=overwrite, causes=lambda step, marker: freshness.causes(step.name))
        if decision.action == "reset":
            log(f"{step.name}: runs again ({decision.reason})")
        step = decision.enact(step).open(cfg)
        started = time.time()
        was_done = decision.action == "skip"
        results[variant] = step.run(module.run)
        step.complete()
        log(f"{step.name}: {'done before, skipped' if was_done else f'done in {time.time() - started:.1f} s'}")
    return results if s.variants else results[None]
