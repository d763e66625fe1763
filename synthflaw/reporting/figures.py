"""Every figure and table of one run (stage 08), from its JSON and CSV files only (never from checkpoints).

Each figure is written as PNG beside the CSV it plots, so a figure can be re-drawn, or checked, from the CSV alone.
Only what the finished steps allow is drawn; the result lists what was made and which models were found. `README.md`
indexes the figures drawn (:mod:`synthflaw.reporting.index`); every title and axis is in words
(:mod:`synthflaw.reporting.labels`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from synthflaw.records import read_csv, write_csv, write_text_atomic
from synthflaw.registry import (
    DATA_FLAWS,
    EVALUATE,
    STAGES,
    UNLEARNING,
    model_order,
    unlearned_method,
)
from synthflaw.reporting import labels
from synthflaw.reporting.data_plots import DATA_FIGURES, plot_data_figures
from synthflaw.reporting.index import run_index
from synthflaw.reporting.plots import (
    plot_headline,
    plot_hsr_by_level,
    plot_loss_curves,
    plot_perplexity_distributions,
    plot_sft_curve,
    plot_tradeoff,
    plot_unlearning_losses,
)
from synthflaw.reporting.tables import (
    NULL_PREFIX,
    headline_values,
    markdown_table,
    null_rows,
    num,
)
from synthflaw.runs import load_marker


def done_variants(run_dir: Path, stage) -> list[tuple[str, Path]]:
    """(variant, folder) of a fanned-out stage's finished steps, in the study's order (the control first)."""
    root = Path(run_dir) / stage.name
    if not root.is_dir():
        return []
    done = {p.name: p for p in root.iterdir() if load_marker(p)[0] is not None}
    return [(name, done[name]) for name in model_order(done)]


def loss_curves(run_dir: Path, out: Path, dpi: int) -> list[str]:
    """Training loss per step for every training stage and variant (one panel per stage)."""
    rows = []
    for stage in (s for s in STAGES if s.trains):
        sources = done_variants(run_dir, stage) if stage.variants else (
            [("base", run_dir / stage.name)] if load_marker(run_dir / stage.name)[0] is not None else [])
        for variant, path in sources:
            if (path / "loss.csv").exists():
                for r in read_csv(path / "loss.csv"):
                    rows.append({"stage": stage.name, "variant": variant, "step": r.get("step"), "loss": r.get("loss")})
    if not rows:
        return []
    write_csv(out / "loss_curves.csv", rows)
    return [plot_loss_curves(out / "loss_curves.csv", out / "loss_curves.png", dpi)]


def headline_table(run_dir: Path, out: Path) -> list[dict]:
    """The paper's headline table: benchmark vs instruction following vs chat quality, one row per model, then one
    row per null (what a constant reply, the prompt echoed and the plain answer score on the same items)."""
    evaluated = [(model, json.loads((path / "metrics.json").read_text()))
                 for model, path in done_variants(run_dir, EVALUATE)]
    rows = [{"model": model, **headline_values(metrics)} for model, metrics in evaluated]
    if rows:
        rows += null_rows(evaluated[0][1])  # the same items for every model: the first one's nulls are all of them
        tables = out / "tables"
        tables.mkdir(exist_ok=True)
        write_csv(tables / "headline.csv", rows)
        write_text_atomic(tables / "headline.md", markdown_table(rows) + "\n\n" + labels.legend(rows[0]))
    return rows


def hsr_by_level(run_dir: Path, out: Path, dpi: int) -> list[str]:
    """HSR per number of constraints, per model and per tier (learnable, out-of-distribution suite), nulls too."""
    rows = []
    for k, (model, path) in enumerate(done_variants(run_dir, EVALUATE)):
        metrics = json.loads((path / "metrics.json").read_text())
        sources = [(model, metrics)] + ([(NULL_PREFIX + kind, v) for kind, v in (metrics.get("nulls") or {}).items()]
                                        if k == 0 else [])
        for name, values in sources:
            for tier, key in (("learnable", "learnable_hsr_by_level"), ("suite", "hsr_by_level")):
                rows += [{"model": name, "tier": tier, "level": int(level), "mean": value}
                         for level, value in sorted((values.get(key) or {}).items())]
    if not rows:
        return []
    write_csv(out / "hsr_by_level.csv", rows)
    return [plot_hsr_by_level(out / "hsr_by_level.csv", out / "hsr_by_level.png", dpi)]


def sft_curve(run_dir: Path, out: Path, dpi: int) -> list[str]:
    """Each model's learnable-tier measurements along SFT (metrics.json "sft_curve")."""
    rows = []
    for model, path in done_variants(run_dir, EVALUATE):
        for point in json.loads((path / "metrics.json").read_text()).get("sft_curve") or []:
            rows += [{"model": model, "step": point["step"], "fraction": point["fraction"], "metric": metric,
                      "mean": point[metric]}
                     for metric in ("learnable_hard_satisfaction_rate", "compliance_margin", "compliance_margin_null",
                                    "template_pull") if point.get(metric) is not None]
    if not rows:
        return []
    write_csv(out / "sft_curve.csv", rows)
    return [plot_sft_curve(out / "sft_curve.csv", out / "sft_curve.png", dpi)]


def perplexity_distributions(run_dir: Path, out: Path, dpi: int) -> list[str]:
    rows = []
    for model, path in done_variants(run_dir, EVALUATE):
        if (path / "perplexities.csv").exists():
            rows += [{"model": model, **r} for r in read_csv(path / "perplexities.csv")]
    if not rows:
        return []
    write_csv(out / "perplexity_distributions.csv", rows)
    return [plot_perplexity_distributions(out / "perplexity_distributions.csv",
                                          out / "perplexity_distributions.png", dpi)]


def recovery_and_retention(model: dict, natural: dict, synthetic: dict) -> dict:
    """HSR recovery = (HSR_m - HSR_syn) / (HSR_nat - HSR_syn); benchmark retention = (acc_m - acc_nat) / (acc_syn -
    acc_nat), i.e. the share of SynthQA's benchmark gain kept. Either is None when its denominator is ~0 (no loss to
    recover, or no gain to keep), rather than a meaningless ratio."""
    def ratio(numerator, denominator):
        if numerator is None or denominator is None or abs(denominator) < 1e-9:
            return None
        return numerator / denominator
    hsr = [num(x.get("HSR")) for x in (model, natural, synthetic)]
    acc = [num(x.get("benchmark")) for x in (model, natural, synthetic)]
    rec = ratio(None if None in hsr else hsr[0] - hsr[2], None if None in hsr else hsr[1] - hsr[2])
    ret = ratio(None if None in acc else acc[0] - acc[1], None if None in acc else acc[2] - acc[1])
    return {"hsr": hsr[0], "benchmark": acc[0], "hsr_recovery": rec, "benchmark_retention": ret}


def unlearning_figures(run_dir: Path, out: Path, dpi: int, headline: list[dict]) -> list[str]:
    """Loss terms per method; forget NLL over steps; instruction-following recovery vs benchmark retention."""
    made = []
    rows = []
    for method, path in done_variants(run_dir, UNLEARNING):
        if (path / "loss.csv").exists():
            tau = json.loads((path / "result.json").read_text()).get("hyperparameters", {}).get("tau")
            rows += [{"method": method, **r, "tau": tau} for r in read_csv(path / "loss.csv")]
    if rows:
        write_csv(out / "unlearning_losses.csv", rows)
        made.append(plot_unlearning_losses(out / "unlearning_losses.csv", out / "unlearning_losses.png", dpi))
    by_model = {r["model"]: r for r in headline if not r["model"].startswith(NULL_PREFIX)}
    if "natural" in by_model and "synthetic" in by_model:
        nat, syn = by_model["natural"], by_model["synthetic"]
        trade = [{"method": unlearned_method(model), **recovery_and_retention(r, nat, syn)}
                 for model, r in by_model.items() if unlearned_method(model)]
        if trade:
            write_csv(out / "unlearning_tradeoff.csv", trade)
            made.append(plot_tradeoff(out / "unlearning_tradeoff.csv", out / "unlearning_tradeoff.png", dpi))
    return made


def data_flaw_figures(run_dir: Path, out: Path) -> list[str]:
    """Stage 02's figures, re-drawn into `out` from copies of its CSVs."""
    src = run_dir / DATA_FLAWS.name
    if load_marker(src)[0] is None:
        return []
    for csv_name in DATA_FIGURES:
        if (src / csv_name).exists():
            shutil.copyfile(src / csv_name, out / csv_name)
    return plot_data_figures(out)


def make_figures(run_dir: Path, out: Path, dpi: int) -> dict:
    """Every figure and table the run's finished steps allow, into `out`: {"figures": [...], "models": [...]}."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = data_flaw_figures(run_dir, out) + loss_curves(run_dir, out, dpi)
    headline = headline_table(run_dir, out)
    if headline:
        made.append(plot_headline(out / "tables" / "headline.csv", out / "headline.png", dpi))
    made += hsr_by_level(run_dir, out, dpi) + sft_curve(run_dir, out, dpi)
    made += perplexity_distributions(run_dir, out, dpi)
    made += unlearning_figures(run_dir, out, dpi, headline)
    run_index(out, made, "Figures of this run (stage 08)",
              "A multi-seed run's intervals across seeds and the findings' forest plot are in the run's `seeds/` "
              "folder, with an index of their own.")
    return {"figures": made, "models": [r["model"] for r in headline if not r["model"].startswith(NULL_PREFIX)]}
