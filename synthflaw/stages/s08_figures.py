"""Stage 08: every figure and table of the run, from its JSON and CSV files only (never from checkpoints)."""

from __future__ import annotations

from synthflaw.registry import EVALUATE, models_of, study_steps
from synthflaw.reporting.figures import make_figures


def check(cfg) -> list[str]:
    if cfg.figures.dpi < 10:
        return [f"figures.dpi={cfg.figures.dpi}: the PNGs need a resolution of at least 10 dots per inch"]
    return []


def run(cfg, step) -> dict:
    """Every figure and table the run's finished steps allow, and what is missing: the models the configuration
    lists that have no finished evaluation (left out of every table), and every unfinished step.

    Stage 08 reads every finished step of the run (`step.read_run()` records them): a step that finishes later makes
    these figures stale, and the runner makes them again. The runner prints `warnings` on the console.
    """
    finished = {s.name for s in step.read_run()}
    result = make_figures(step.run_dir, step.path, cfg.figures.dpi)
    missing = [m for m in models_of(cfg) if f"{EVALUATE.name}/{m}" not in finished]
    unfinished = [s.name for s in study_steps(cfg) if s.stage.number < step.stage.number and s.name not in finished]
    warnings = []
    if missing:
        warnings.append(f"no finished evaluation for {', '.join(missing)} (of the {len(models_of(cfg))} models the "
                        "configuration lists): the figures and tables leave them out; finish the run (synthflaw run "
                        "with the same run id) and the figures are made again")
    return {**result, "missing_models": missing, "unfinished_steps": unfinished, "warnings": warnings}
