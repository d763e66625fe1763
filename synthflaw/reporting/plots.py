"""Figures of a run's results, each drawn from the CSV beside it (never from a model): loss curves, the headline
table, instruction following by level, perplexity distributions, unlearning, and their cross-seed versions.

Figures are bare matplotlib `Figure`s (no pyplot: nothing global changes, and they render with Agg whatever the
session's backend), written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from synthflaw.records import read_csv, write_bytes_atomic
from synthflaw.reporting.tables import NULL_PREFIX, num

# The headline bars: metric column, label, scale (scores out of 10 drawn /10).
HEADLINE_BARS = (("benchmark", "benchmark acc", 1), ("learnable_HSR", "learnable HSR", 1),
                 ("chat_score", "chat score / 10", 10))


def new_figure(size=(6.4, 4.8), rows: int | None = None, cols: int | None = None):
    """(figure, axes): one axes, or with `rows`/`cols` a 2-D array of them."""
    fig = Figure(figsize=size, layout="constrained")
    if rows is None and cols is None:
        return fig, fig.add_subplot()
    return fig, fig.subplots(rows or 1, cols or 1, squeeze=False)


def save_figure(fig, png_path, dpi: int = 120) -> str:
    """Write `fig` as PNG, atomically; returns the file's name."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(png_path, buf.getvalue())
    return png_path.name


def colors(names: list[str]) -> dict[str, tuple]:
    """One tab10 colour per name, in order."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def plot_loss_curves(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    rows = read_csv(csv_path)
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = new_figure((4.2 * len(stages), 3.4), cols=len(stages))
    for ax, stage in zip(axes[0], stages):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["stage"] == stage):
            pts = [(num(r["step"]), num(r["loss"])) for r in rows
                   if r["stage"] == stage and r["variant"] == variant and num(r["loss"]) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant, lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    return save_figure(fig, png_path, dpi)


def plot_loss_csv(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """One step's loss.csv: every numeric loss column against the step (one training or unlearning run)."""
    rows = read_csv(csv_path)
    skip = {"step", "lr", "learning_rate", "elapsed_s", "tokens_seen", "grad_norm", "epoch"}
    fig, ax = new_figure((6, 3.6))
    steps = [num(r["step"]) for r in rows]
    for col in [c for c in rows[0] if c not in skip] if rows else []:
        vals = [num(r[col]) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(steps, vals, lw=1.2, label=col)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    return save_figure(fig, png_path, dpi)


def plot_headline(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """Benchmark accuracy, learnable-tier HSR and chat score (/10) side by side per model (one run), each metric's
    best null (the highest-scoring trivial reply) as a dashed line in its colour."""
    rows = read_csv(csv_path)
    models = [r for r in rows if not r["model"].startswith(NULL_PREFIX)]
    nulls = [r for r in rows if r["model"].startswith(NULL_PREFIX)]
    fig, ax = new_figure((max(5, 1.1 * len(models) + 2), 3.6))
    width = 0.8 / len(HEADLINE_BARS)
    for k, (col, label, scale) in enumerate(HEADLINE_BARS):
        vals = [(num(r.get(col)) or 0.0) / scale for r in models]
        bars = ax.bar([i + k * width for i in range(len(models))], vals, width, label=label)
        null_values = [num(r.get(col)) for r in nulls if num(r.get(col)) is not None]
        if null_values:
            ax.axhline(max(null_values) / scale, ls="--", lw=0.9, color=bars.patches[0].get_facecolor(),
                       label=f"best null, {label}")
    ax.set_xticks([i + width for i in range(len(models))], [r["model"] for r in models], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    ax.set_title("Benchmark vs instruction following vs chat quality")
    return save_figure(fig, png_path, dpi)


def plot_hsr_by_level(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """HSR per number of constraints of one run, one panel per tier; the nulls dashed."""
    return plot_hsr_by_level_ci(csv_path, png_path, dpi)


def plot_perplexity_distributions(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """Per-sample log-perplexity, one violin per model and text set: the paper reports the SynthQA model's
    distribution shifted and narrower (lower variance) than the natural model's."""
    rows = read_csv(csv_path)
    sets = list(dict.fromkeys(r.get("set", "heldout_nonsynth") for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure((max(6, 0.9 * len(models) + 2), 3.2 * len(sets)), rows=len(sets))
    for ax, name in zip(axes[:, 0], sets):
        data = [[math.log(v) for r in rows if r["model"] == model and r.get("set", "heldout_nonsynth") == name
                 and (v := num(r["perplexity"])) and v > 0] for model in models]
        keep = [i for i, d in enumerate(data) if d]
        ax.violinplot([data[i] for i in keep], positions=keep, showmedians=True)
        ax.set_xticks(range(len(models)), models, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("log perplexity per sample")
        ax.set_title(name)
    return save_figure(fig, png_path, dpi)


def plot_unlearning_losses(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """One panel per method with its logged loss terms, and a last panel with every method's forget-set NLL over
    steps: unbounded gradient ascent keeps pushing it up, the lower-bounded method stops near its tau (dashed)."""
    rows = read_csv(csv_path)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    skip = {"method", "step", "lr", "learning_rate", "elapsed_s", "forget_nll", "replay_nll", "grad_norm", "tau",
            "tokens_seen", "epoch"}
    fig, axes = new_figure((3.2 * (len(methods) + 1), 3.2), cols=len(methods) + 1)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in rows if r["method"] == method]
        steps = [num(r["step"]) for r in mine]
        for term in [k for k in mine[0] if k not in skip and num(mine[0][k]) is not None]:
            ax.plot(steps, [num(r[term]) for r in mine], lw=1.1, label=term)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("loss term")
    last = axes[0][-1]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if "forget_nll" in mine[0]:
            line, = last.plot([num(r["step"]) for r in mine], [num(r["forget_nll"]) for r in mine], lw=1.2,
                              label=method)
            tau = num(mine[0].get("tau"))
            if tau is not None:
                last.axhline(tau, ls="--", lw=0.9, color=line.get_color(), label=f"tau ({method})")
    last.set_title("forget-set NLL per token", fontsize=9)
    last.set_xlabel("step")
    last.legend(fontsize=6)
    return save_figure(fig, png_path, dpi)


def plot_tradeoff(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    rows = read_csv(csv_path)
    fig, ax = new_figure((5, 4))
    for r in rows:
        x, y = num(r["benchmark_retention"]), num(r["hsr_recovery"])
        x = x if x is not None else 0.0
        y = y if y is not None else 0.0
        ax.scatter([x], [y])
        ax.annotate(r["method"], (x, y), fontsize=8)
    ax.axhline(1.0, ls="--", c="grey", lw=0.8)
    ax.axvline(1.0, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("benchmark gain kept (1 = all of SynthQA's gain)")
    ax.set_ylabel("HSR recovered (1 = back to natural)")
    ax.set_title("Unlearning: recovery vs retention")
    return save_figure(fig, png_path, dpi)


def plot_headline_ci(csv_path, png_path, dpi: int = 120) -> str:
    """Benchmark accuracy, learnable-tier HSR and chat score / 10 per model, bars at the mean with the CI as error
    bars, and each metric's best null (the highest-scoring trivial reply) as a dashed line in its colour."""
    rows = read_csv(csv_path, required=("model", "metric", "mean", "low", "high"))
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if not m.startswith(NULL_PREFIX)]
    by_key = {(r["model"], r["metric"]): r for r in rows}
    fig, ax = new_figure((max(5, 1.1 * len(models) + 2), 3.8))
    width = 0.8 / len(HEADLINE_BARS)
    for k, (metric, label, scale) in enumerate(HEADLINE_BARS):
        xs, means, errs = [], [], [[], []]
        for i, model in enumerate(models):
            r = by_key.get((model, metric))
            if r is None or num(r["mean"]) is None:
                continue
            mean, low, high = (num(r[c]) / scale for c in ("mean", "low", "high"))
            xs.append(i + k * width)
            means.append(mean)
            errs[0].append(mean - low)
            errs[1].append(high - mean)
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
        nulls = [num(r["mean"]) for (m, metric_), r in by_key.items()
                 if m.startswith(NULL_PREFIX) and metric_ == metric and num(r["mean"]) is not None]
        if nulls and xs:
            ax.axhline(max(nulls) / scale, ls="--", lw=0.9, color=bars.patches[0].get_facecolor(),
                       label=f"best null, {label}")
    ax.set_xticks([i + width for i in range(len(models))], models, rotation=30, ha="right")
    ax.set_ylabel("score (mean and CI over seeds)")
    ax.legend(fontsize=7)
    ax.set_title("Benchmark vs instruction following vs chat quality, across seeds")
    return save_figure(fig, png_path, dpi)


def plot_hsr_by_level_ci(csv_path, png_path, dpi: int = 120) -> str:
    """HSR per number of constraints, one panel per tier (learnable, out-of-distribution suite), one line per model
    at the mean with its CI shaded; the nulls dashed."""
    rows = read_csv(csv_path, required=("model", "level", "mean"))
    tiers = list(dict.fromkeys(r.get("tier", "suite") for r in rows))
    fig, axes = new_figure((5.8 * len(tiers), 3.8), cols=len(tiers))
    for ax, tier in zip(axes[0], tiers):
        mine = [r for r in rows if r.get("tier", "suite") == tier]
        for model in dict.fromkeys(r["model"] for r in mine):
            pts = sorted((int(r["level"]), num(r["mean"]), num(r.get("low")), num(r.get("high")))
                         for r in mine if r["model"] == model)
            style = {"ls": "--", "lw": 0.9} if model.startswith(NULL_PREFIX) else {"marker": "o"}
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=model, **style)
            if all(p[2] is not None for p in pts):
                ax.fill_between([p[0] for p in pts], [p[2] for p in pts], [p[3] for p in pts],
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xticks(sorted({int(r["level"]) for r in mine}))
        ax.set_xlabel("constraints per instruction (level)")
        ax.set_ylabel("hard satisfaction rate")
        ax.set_title(f"{tier}: hard satisfaction rate by level", fontsize=9)
        ax.legend(fontsize=6)
    return save_figure(fig, png_path, dpi)


# The SFT curve's panels: metric, axis label.
CURVE_PANELS = (("learnable_hard_satisfaction_rate", "learnable-tier HSR"),
                ("compliance_margin", "compliance margin (nats/token)"),
                ("template_pull", "template pull (nats/reply)"))


def plot_sft_curve(csv_path, png_path, dpi: int = 120) -> str:
    """Each model's learnable-tier measurements along SFT (one run): HSR, compliance margin (its null dashed),
    template pull, against the fraction of the SFT budget."""
    return _plot_curve(read_csv(csv_path, required=("model", "fraction", "metric", "mean")), png_path, dpi,
                       "along SFT")


def plot_sft_curve_ci(csv_path, png_path, dpi: int = 120) -> str:
    """The same across seeds: the mean with its CI shaded."""
    return _plot_curve(read_csv(csv_path, required=("model", "fraction", "metric", "mean", "low", "high")), png_path,
                       dpi, "along SFT (mean and CI over seeds)")


def _plot_curve(rows: list[dict], png_path, dpi: int, title: str) -> str:
    fig, axes = new_figure((4.4 * len(CURVE_PANELS), 3.6), cols=len(CURVE_PANELS))
    for ax, (metric, label) in zip(axes[0], CURVE_PANELS):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((num(r["fraction"]), num(r["mean"]), num(r.get("low")), num(r.get("high")))
                         for r in rows if r["model"] == model and r["metric"] == metric)
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
            if all(p[2] is not None for p in pts):
                ax.fill_between([p[0] for p in pts], [p[2] for p in pts], [p[3] for p in pts],
                                color=line.get_color(), alpha=0.15, lw=0)
            if metric == "compliance_margin":
                null = sorted((num(r["fraction"]), num(r["mean"])) for r in rows
                              if r["model"] == model and r["metric"] == "compliance_margin_null")
                ax.plot([p[0] for p in null], [p[1] for p in null], ls="--", lw=0.8, color=line.get_color())
        ax.set_xlabel("fraction of the SFT budget")
        ax.set_ylabel(label)
        ax.set_title(f"{label}, {title}", fontsize=8)
        ax.legend(fontsize=6)
    return save_figure(fig, png_path, dpi)
