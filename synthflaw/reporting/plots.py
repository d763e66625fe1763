"""Figures of a run's results, each drawn from the CSV beside it (never from a model): loss curves, the headline
table, instruction following by level, perplexity distributions, unlearning, and their cross-seed versions.

Figures are bare matplotlib `Figure`s (no pyplot: nothing global changes, and they render with Agg whatever the
session's backend), written atomically.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from synthflaw.records import read_csv, write_bytes_atomic
from synthflaw.reporting import labels
from synthflaw.reporting.tables import NULL_PREFIX, num

# The headline figures' panels, one endpoint each: knowledge, instruction following (generation, likelihood), chat.
HEADLINE_PANELS = ("benchmark", "learnable_HSR", "compliance_margin", "chat_preference", "chat_score")


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
    # no "Software" entry: the bytes then depend on what is drawn, not on which matplotlib version wrote them
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
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
    fig, axes = new_figure((4.2 * len(stages), 3.8), cols=len(stages))
    for ax, stage in zip(axes[0], stages):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["stage"] == stage):
            pts = [(num(r["step"]), num(r["loss"])) for r in rows
                   if r["stage"] == stage and r["variant"] == variant and num(r["loss"]) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant, lw=1.2)
        ax.set_title(labels.STAGES.get(stage, stage), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{labels.LOSS.words}\n({labels.LOSS.unit})", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Training loss per step of every training stage, per model ({labels.LOSS.better})")
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
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"loss term\n({labels.LOSS.unit})", fontsize=8)
    # no direction: an unlearning step logs terms it pushes up (the forget set's NLL) beside ones it pushes down
    ax.set_title("Loss terms of one training or unlearning step, per optimizer step", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, png_path, dpi)


def plot_headline(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """The headline endpoints of one run, a panel each (see `_headline_panels`)."""
    rows = read_csv(csv_path)
    values = {(r["model"], metric): (num(r.get(metric)), None, None) for r in rows for metric in HEADLINE_PANELS}
    return _headline_panels(values, [r["model"] for r in rows], png_path, dpi, "one seed")


def plot_headline_ci(csv_path, png_path, dpi: int = 120) -> str:
    """The headline endpoints across seeds, a panel each: the mean and its interval (see `_headline_panels`)."""
    rows = read_csv(csv_path, required=("model", "metric", "mean", "low", "high"))
    values = {(r["model"], r["metric"]): (num(r["mean"]), num(r["low"]), num(r["high"])) for r in rows}
    return _headline_panels(values, list(dict.fromkeys(r["model"] for r in rows)), png_path, dpi,
                            "mean and 95% interval over seeds")


def _headline_panels(values: dict, names: list[str], png_path, dpi: int, what: str) -> str:
    """One panel per endpoint (`HEADLINE_PANELS`), each on its own axis in its own unit: each model's value as a
    point with its interval (when there is one), and the best null reply (the highest-scoring trivial reply) as a
    dashed line; the legend in the last panel, clear of the data."""
    models = [m for m in names if not m.startswith(NULL_PREFIX)]
    fig, axes = new_figure((12.5, 6.6), rows=2, cols=3)
    for ax, metric in zip(axes.flat, HEADLINE_PANELS):
        label = labels.metric(metric)
        for i, model in enumerate(models):
            mean, low, high = values.get((model, metric), (None, None, None))
            if mean is None:
                continue
            errors = None if low is None else [[mean - low], [high - mean]]
            ax.errorbar([i], [mean], yerr=errors, fmt="o", color="tab:blue", capsize=4, ms=6)
        nulls = [values[(m, metric)][0] for m in names if m.startswith(NULL_PREFIX)
                 and values.get((m, metric), (None,))[0] is not None]
        if nulls:
            ax.axhline(max(nulls), ls="--", lw=1.0, color="tab:gray")
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_title(textwrap.fill(label.words, 45), fontsize=9)
        ax.set_ylabel(f"{label.unit}\n({label.better})", fontsize=8)
    legend = axes.flat[-1]
    legend.axis("off")
    legend.legend(handles=[Line2D([], [], color="tab:blue", marker="o", ls="none", label=f"model: {what}"),
                           Line2D([], [], color="tab:gray", ls="--",
                                  label="best null: a trivial reply (constant, echo, plain)")],
                  loc="center", fontsize=9, frameon=False)
    fig.suptitle("Headline endpoints per model: knowledge, instruction following, chat; each in its own unit")
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
        ax.set_ylabel("log perplexity per text\n(nats per token; lower = fits better)", fontsize=8)
        ax.set_title(f"Per-text log perplexity on {labels.TEXT_SETS.get(name, name)}, per model", fontsize=9)
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
        ax.set_title(f"{method}: loss terms", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("loss term (nats per token)")
    last = axes[0][-1]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if "forget_nll" in mine[0]:
            line, = last.plot([num(r["step"]) for r in mine], [num(r["forget_nll"]) for r in mine], lw=1.2,
                              label=method)
            tau = num(mine[0].get("tau"))
            if tau is not None:
                last.axhline(tau, ls="--", lw=0.9, color=line.get_color(), label=f"tau ({method})")
    last.set_title("forget-set negative log-likelihood\n(nats per token; higher = more forgotten)", fontsize=9)
    last.set_xlabel("optimizer step")
    last.legend(fontsize=6)
    fig.suptitle("Unlearning: each method's loss terms, and how far it pushes the forget set's likelihood down")
    return save_figure(fig, png_path, dpi)


def plot_tradeoff(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    rows = read_csv(csv_path)
    fig, ax = new_figure((5.6, 4.4))
    for r in rows:
        x, y = num(r["benchmark_retention"]), num(r["hsr_recovery"])
        x = x if x is not None else 0.0
        y = y if y is not None else 0.0
        ax.scatter([x], [y])
        ax.annotate(r["method"], (x, y), fontsize=8)
    ax.axhline(1.0, ls="--", c="grey", lw=0.8)
    ax.axvline(1.0, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("share of SynthQA's benchmark gain kept\n(1 = all of it; higher = better)")
    ax.set_ylabel("share of the learnable-tier instruction-following loss recovered\n(1 = back to natural; "
                  "higher = better)", fontsize=8)
    ax.set_title("Unlearning, per method: instruction following recovered\nvs SynthQA's knowledge kept", fontsize=10)
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
        label = labels.metric("HSR")
        ax.set_xlabel("constraints per prompt (level)")
        ax.set_ylabel(f"instructions fully followed\n({label.unit}; {label.better})", fontsize=8)
        ax.set_title(f"{labels.TIERS.get(tier, tier)}:\nprompts whose every constraint is met, by level", fontsize=9)
        ax.legend(fontsize=6)
    nulls = any(r["model"].startswith(NULL_PREFIX) for r in rows)
    fig.suptitle("Instruction following by number of constraints per prompt, per model"
                 + (" (dashed: null replies)" if nulls else ""), fontsize=10)
    return save_figure(fig, png_path, dpi)


# The SFT curve's panels (the compliance margin's null is drawn dashed in its panel).
CURVE_PANELS = ("learnable_hard_satisfaction_rate", "compliance_margin", "template_pull")


def plot_sft_curve(csv_path, png_path, dpi: int = 120) -> str:
    """Each model's learnable-tier measurements along SFT (one run): HSR, compliance margin (its null dashed),
    template pull, against the fraction of the SFT budget."""
    return _plot_curve(read_csv(csv_path, required=("model", "fraction", "metric", "mean")), png_path, dpi,
                       "along SFT")


def plot_sft_curve_ci(csv_path, png_path, dpi: int = 120) -> str:
    """The same across seeds: the mean with its CI shaded."""
    return _plot_curve(read_csv(csv_path, required=("model", "fraction", "metric", "mean", "low", "high")), png_path,
                       dpi, "along SFT, mean and 95% interval over seeds")


def _plot_curve(rows: list[dict], png_path, dpi: int, title: str) -> str:
    fig, axes = new_figure((4.4 * len(CURVE_PANELS), 3.6), cols=len(CURVE_PANELS))
    for ax, metric in zip(axes[0], CURVE_PANELS):
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
        label = labels.metric(metric)
        ax.set_xlabel("fraction of the SFT budget")
        ax.set_ylabel(f"{label.unit}\n({label.better})", fontsize=8)
        ax.set_title(textwrap.fill(label.words, 40), fontsize=8)
    fig.legend(handles=axes[0][0].get_lines(), loc="outside right upper", fontsize=7)  # one legend, off the curves
    fig.suptitle(f"Learnable-tier instruction following and template pull {title}; dashed: the compliance margin's "
                 "null", fontsize=10)
    return save_figure(fig, png_path, dpi)
