"""Stage 08: every figure and table of the run, from its JSON and CSV files only (never from checkpoints)."""

from __future__ import annotations

from synthflaw.reporting.figures import make_figures


def check(cfg) -> list[str]:
    if cfg.figures.dpi < 10:
        return [f"figures.dpi={cfg.figures.dpi}: the PNGs need a resolution of at least 10 dots per inch"]
    return []


def run(cfg, step) -> dict:
    """Every figure and table the run's finished steps allow."""
    return make_figures(step.run_dir, step.path, cfg.figures.dpi)
