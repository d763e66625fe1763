"""Stage 08: every figure and table of a run, from its JSON and CSV files only (never from checkpoints).

Each figure is written as PNG beside the CSV it plots, so a figure can be re-drawn, or checked, from the CSV alone.
Only what the finished stages allow is drawn; the result lists what was made and what was missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from synthflaw import flaws  # noqa: E402
from synthflaw.records import read_csv, write_csv  # noqa: E402
from synthflaw.runs import Step  # noqa: E402

TRAINING_STAGES = ("03_base_model", "04_continued_pretraining", "05_unlearning", "06_sft")
# The headline table's columns: metrics.json key (dotted for nested) -> column name. `benchmark*` is base capability,
# measured on the checkpoint before SFT (CPT branch or unlearned model), as knowledge benchmarks are in the paper;
# `sft_benchmark*` is the same benchmark after SFT.
HEADLINE = {"pre_sft_benchmark_accuracy": "benchmark",
            "pre_sft_benchmark_accuracy_by_split.stated": "benchmark_stated",
            "pre_sft_benchmark_accuracy_by_split.synthqa_only": "benchmark_synthqa_only",
            "benchmark_accuracy": "sft_benchmark",
            "benchmark_accuracy_by_split.synthqa_only": "sft_benchmark_synthqa_only",
            "hard_satisfaction_rate": "HSR", "soft_satisfaction_rate": "SSR",
            "ifeval_prompt_strict": "ifeval_prompt_strict", "chat_score": "chat_score",
            "perplexity.mean": "ppl_mean", "perplexity.std": "ppl_std", "template_leakage_rate": "leakage",
            "next_token_kl": "kl_from_natural",
            # the checkpoint SFT started from (CPT or unlearned): SFT can erase the shift the CPT model shows
            "pre_sft_perplexity.mean": "pre_sft_ppl_mean", "pre_sft_perplexity.std": "pre_sft_ppl_std",
            "pre_sft_template_leakage_rate": "pre_sft_leakage"}


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dig(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _done_variants(run_dir: Path, stage: str) -> list[tuple[str, Path]]:
    root = run_dir / stage
    if not root.is_dir():
        return []
    order = ("natural", "synthetic", "rewritten", "more_natural")  # the control first, then the branches, then methods
    done = [p for p in root.iterdir() if (p / "done.json").exists()]
    done.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    return [(p.name, p) for p in done]


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def loss_curves(run_dir: Path, out: Path, dpi: int) -> list[str]:
    """Training loss per step for every training stage and variant (one panel per stage)."""
    rows = []
    for stage in TRAINING_STAGES:
        sources = _done_variants(run_dir, stage) if stage != "03_base_model" else (
            [("base", run_dir / stage)] if (run_dir / stage / "done.json").exists() else [])
        for variant, path in sources:
            if (path / "loss.csv").exists():
                for r in read_csv(path / "loss.csv"):
                    rows.append({"stage": stage, "variant": variant, "step": r.get("step"), "loss": r.get("loss")})
    if not rows:
        return []
    write_csv(out / "loss_curves.csv", rows)
    return [plot_loss_curves(out / "loss_curves.csv", out / "loss_curves.png", dpi)]


def plot_loss_curves(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    rows = read_csv(csv_path)
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["stage"] == stage):
            pts = [(_num(r["step"]), _num(r["loss"])) for r in rows
                   if r["stage"] == stage and r["variant"] == variant and _num(r["loss"]) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant, lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    _save(fig, png_path, dpi)
    return png_path.name


def plot_loss_csv(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """One step's loss.csv: every numeric loss column against the step (one training or unlearning run)."""
    rows = read_csv(csv_path)
    skip = {"step", "lr", "learning_rate", "elapsed_s", "tokens_seen", "grad_norm", "epoch"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [_num(r["step"]) for r in rows]
    for col in [c for c in rows[0] if c not in skip] if rows else []:
        vals = [_num(r[col]) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(steps, vals, lw=1.2, label=col)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    _save(fig, png_path, dpi)
    return png_path.name


def headline_table(run_dir: Path, out: Path) -> list[dict]:
    """The paper's headline table: benchmark vs instruction following vs chat quality, one row per model."""
    rows = []
    for model, path in _done_variants(run_dir, "07_evaluate"):
        metrics = json.loads((path / "metrics.json").read_text())
        rows.append({"model": model, **{col: _dig(metrics, key) for key, col in HEADLINE.items()}})
    if rows:
        tables = out / "tables"
        tables.mkdir(exist_ok=True)
        write_csv(tables / "headline.csv", rows)
        (tables / "headline.md").write_text(markdown_table(rows) + "\n", encoding="utf-8")
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_headline(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """Benchmark accuracy, HSR and chat score (/10) side by side per model."""
    rows = read_csv(csv_path)
    metrics = [("benchmark", "benchmark acc"), ("HSR", "HSR"), ("chat_score", "chat score / 10")]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 3.6))
    width = 0.8 / len(metrics)
    for k, (col, label) in enumerate(metrics):
        vals = [(_num(r[col]) or 0.0) / (10 if col == "chat_score" else 1) for r in rows]
        ax.bar([i + k * width for i in range(len(rows))], vals, width, label=label)
    ax.set_xticks([i + width for i in range(len(rows))], [r["model"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.set_title("Benchmark vs instruction following vs chat quality")
    _save(fig, png_path, dpi)
    return png_path.name


def hsr_by_level(run_dir: Path, out: Path, dpi: int) -> list[str]:
    rows = []
    for model, path in _done_variants(run_dir, "07_evaluate"):
        by_level = json.loads((path / "metrics.json").read_text()).get("hsr_by_level") or {}
        rows += [{"model": model, "level": int(level), "hsr": value} for level, value in sorted(by_level.items())]
    if not rows:
        return []
    write_csv(out / "hsr_by_level.csv", rows)
    return [plot_hsr_by_level(out / "hsr_by_level.csv", out / "hsr_by_level.png", dpi)]


def plot_hsr_by_level(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    rows = read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = [(int(r["level"]), _num(r["hsr"])) for r in rows if r["model"] == model]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
    ax.set_xlabel("constraints per instruction (level)")
    ax.set_ylabel("hard satisfaction rate")
    ax.set_title("Instruction following by level (FollowBench-style)")
    ax.legend(fontsize=7)
    _save(fig, png_path, dpi)
    return png_path.name


def perplexity_distributions(run_dir: Path, out: Path, dpi: int) -> list[str]:
    rows = []
    for model, path in _done_variants(run_dir, "07_evaluate"):
        if (path / "perplexities.csv").exists():
            rows += [{"model": model, **r} for r in read_csv(path / "perplexities.csv")]
    if not rows:
        return []
    write_csv(out / "perplexity_distributions.csv", rows)
    return [plot_perplexity_distributions(out / "perplexity_distributions.csv",
                                          out / "perplexity_distributions.png", dpi)]


def plot_perplexity_distributions(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """Per-sample log-perplexity, one violin per model and text set: the paper reports the SynthQA model's
    distribution shifted and narrower (lower variance) than the natural model's."""
    import math
    rows = read_csv(csv_path)
    sets = list(dict.fromkeys(r.get("set", "heldout_nonsynth") for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(sets), 1, figsize=(max(6, 0.9 * len(models) + 2), 3.2 * len(sets)), squeeze=False)
    for ax, name in zip(axes[:, 0], sets):
        data = [[math.log(v) for r in rows if r["model"] == model and r.get("set", "heldout_nonsynth") == name
                 and (v := _num(r["perplexity"])) and v > 0] for model in models]
        keep = [i for i, d in enumerate(data) if d]
        ax.violinplot([data[i] for i in keep], positions=keep, showmedians=True)
        ax.set_xticks(range(len(models)), models, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("log perplexity per sample")
        ax.set_title(name)
    _save(fig, png_path, dpi)
    return png_path.name


def unlearning_figures(run_dir: Path, out: Path, dpi: int, headline: list[dict]) -> list[str]:
    """Loss terms per method; forget NLL over steps; instruction-following recovery vs benchmark retention."""
    made = []
    rows = []
    for method, path in _done_variants(run_dir, "05_unlearning"):
        if (path / "loss.csv").exists():
            tau = json.loads((path / "result.json").read_text()).get("hyperparameters", {}).get("tau")
            rows += [{"method": method, **r, "tau": tau} for r in read_csv(path / "loss.csv")]
    if rows:
        write_csv(out / "unlearning_losses.csv", rows)
        made.append(plot_unlearning_losses(out / "unlearning_losses.csv", out / "unlearning_losses.png", dpi))
    by_model = {r["model"]: r for r in headline}
    if "natural" in by_model and "synthetic" in by_model:
        nat, syn = by_model["natural"], by_model["synthetic"]
        trade = []
        for model, r in by_model.items():
            if model.startswith("unlearn-"):
                trade.append({"method": model[len("unlearn-"):], **recovery_and_retention(r, nat, syn)})
        if trade:
            write_csv(out / "unlearning_tradeoff.csv", trade)
            made.append(plot_tradeoff(out / "unlearning_tradeoff.csv", out / "unlearning_tradeoff.png", dpi))
    return made


def recovery_and_retention(model: dict, natural: dict, synthetic: dict) -> dict:
    """HSR recovery = (HSR_m - HSR_syn) / (HSR_nat - HSR_syn); benchmark retention = (acc_m - acc_nat) / (acc_syn -
    acc_nat), i.e. the share of SynthQA's benchmark gain kept. Either is None when its denominator is ~0 (no loss to
    recover, or no gain to keep), rather than a meaningless ratio."""
    def ratio(num, den):
        return None if num is None or den is None or abs(den) < 1e-9 else num / den
    hsr = [_num(x.get("HSR")) for x in (model, natural, synthetic)]
    acc = [_num(x.get("benchmark")) for x in (model, natural, synthetic)]
    rec = ratio(None if None in hsr else hsr[0] - hsr[2], None if None in hsr else hsr[1] - hsr[2])
    ret = ratio(None if None in acc else acc[0] - acc[1], None if None in acc else acc[2] - acc[1])
    return {"hsr": hsr[0], "benchmark": acc[0], "hsr_recovery": rec, "benchmark_retention": ret}


def plot_unlearning_losses(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    """One panel per method with its logged loss terms, and a last panel with every method's forget-set NLL over
    steps: unbounded gradient ascent keeps pushing it up, the lower-bounded method stops near its tau (dashed)."""
    rows = read_csv(csv_path)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    skip = {"method", "step", "lr", "learning_rate", "elapsed_s", "forget_nll", "replay_nll", "grad_norm", "tau"}
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(3.2 * (len(methods) + 1), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in rows if r["method"] == method]
        steps = [_num(r["step"]) for r in mine]
        for term in [k for k in mine[0] if k not in skip and _num(mine[0][k]) is not None]:
            ax.plot(steps, [_num(r[term]) for r in mine], lw=1.1, label=term)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("loss term")
    last = axes[0][-1]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if "forget_nll" in mine[0]:
            line, = last.plot([_num(r["step"]) for r in mine], [_num(r["forget_nll"]) for r in mine], lw=1.2,
                              label=method)
            tau = _num(mine[0].get("tau"))
            if tau is not None:
                last.axhline(tau, ls="--", lw=0.9, color=line.get_color(), label=f"tau ({method})")
    last.set_title("forget-set NLL per token", fontsize=9)
    last.set_xlabel("step")
    last.legend(fontsize=6)
    _save(fig, png_path, dpi)
    return png_path.name


def plot_tradeoff(csv_path: Path, png_path: Path, dpi: int = 120) -> str:
    rows = read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        x, y = _num(r["benchmark_retention"]), _num(r["hsr_recovery"])
        x = x if x is not None else 0.0
        y = y if y is not None else 0.0
        ax.scatter([x], [y])
        ax.annotate(r["method"], (x, y), fontsize=8)
    ax.axhline(1.0, ls="--", c="grey", lw=0.8)
    ax.axvline(1.0, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("benchmark gain kept (1 = all of SynthQA's gain)")
    ax.set_ylabel("HSR recovered (1 = back to natural)")
    ax.set_title("Unlearning: recovery vs retention")
    _save(fig, png_path, dpi)
    return png_path.name


def data_flaw_figures(run_dir: Path, out: Path, dpi: int) -> list[str]:
    """Re-draw stage 02's figures from its CSVs."""
    src = run_dir / "02_data_flaws"
    if not (src / "done.json").exists():
        return []
    made = []
    for csv_name, plot in (("tsne.csv", flaws.plot_tsne), ("token_frequency.csv", flaws.plot_token_kde),
                           ("lengths.csv", flaws.plot_lengths)):
        if (src / csv_name).exists():
            shutil.copyfile(src / csv_name, out / csv_name)
            png = out / csv_name.replace(".csv", ".png").replace("token_frequency", "token_kde")
            plot(out / csv_name, png)
            made.append(png.name)
    return made


def run(cfg, step) -> dict:
    """Stage 08 entry point: every figure and table the run's finished steps allow."""
    run_dir, out, dpi = Path(step.run_dir), step.path, cfg.figures.dpi
    made = data_flaw_figures(run_dir, out, dpi) + loss_curves(run_dir, out, dpi)
    headline = headline_table(run_dir, out)
    if headline:
        made.append(plot_headline(out / "tables" / "headline.csv", out / "headline.png", dpi))
    made += hsr_by_level(run_dir, out, dpi) + perplexity_distributions(run_dir, out, dpi)
    made += unlearning_figures(run_dir, out, dpi, headline)
    return {"figures": made, "models": [r["model"] for r in headline]}


def show(path: Path):
    """Display every figure of a finished 08 step in a notebook."""
    from IPython.display import Image, Markdown, display
    path = Path(path)
    table = path / "tables" / "headline.md"
    if table.exists():
        display(Markdown(table.read_text()))
    for png in sorted(path.glob("*.png")):
        display(Markdown(f"**{png.name}**"), Image(filename=str(png)))


def regenerate(run_id: str, runs_root: str | Path = "runs", engine: str = "papermill") -> Path:
    """Re-make stage 08 of a finished run from its files (no training): `synthflaw figures --run-id ID`.

    On a multi-seed run (``runs/ID/seed-<k>/``) it re-makes every seed's figures and the cross-seed tables, intervals
    and findings in ``runs/ID/seeds/``."""
    from synthflaw.runner import run_study
    run_dir = Path(runs_root) / run_id
    study = run_dir / "study.json"
    seed_dirs = sorted(p for p in run_dir.glob("seed-*") if (p / "study.json").exists())
    if not study.exists() and seed_dirs:  # a multi-seed run: each seed's figures, then the intervals across seeds
        from synthflaw import seeds
        for seed_dir in seed_dirs:
            regenerate(seed_dir.name, runs_root=run_dir, engine=engine)
        seeds.summarize(run_dir)
        return run_dir
    if not study.exists():
        raise ValueError(f"{run_dir} is not a run folder (no study.json); runs: "
                         f"{', '.join(sorted(p.name for p in Path(runs_root).glob('*'))) or 'none'}")
    saved = json.loads(study.read_text())
    step = Step(run_dir, "08_figures")
    if step.path.exists():
        shutil.rmtree(step.path)
    return run_study(saved["preset"], run_id, saved["overrides"], runs_root=runs_root, engine=engine,
                     stages=["08_figures"])
