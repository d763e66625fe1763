"""The index of a figure folder (`README.md` beside the PNGs): per figure, what it shows, which finding it speaks to,
and the file it was drawn from, so that a reader who opens `08_figures/`, `seeds/` or a sweep's `figures/` knows
which picture answers which question without the repository's README.

Written from the list of figures a folder's maker drew, never by globbing: a stale PNG left by an older version is
not indexed as if it were current.
"""

from __future__ import annotations

from pathlib import Path

from synthflaw.records import write_text_atomic
from synthflaw.reporting import labels

# The findings (findings.md) a metric's checks belong to, by the metric's prefix: what a figure of it speaks to.
METRIC_FINDINGS = (("pre_sft_", "3b"), ("benchmark_synthqa_only", "1"), ("benchmark", "1, 4, 6"),
                   ("sft_benchmark", "1 (reported)"), ("learnable_HSR", "2, 4, 5, 6"), ("learnable_SSR", "2"),
                   ("compliance_margin", "2, 4"), ("HSR", "2 (reported)"), ("SSR", "2 (reported)"),
                   ("ifeval_prompt_strict", "2 (reported)"), ("chat_preference", "2c, 4"), ("chat_", "2c"),
                   ("template_pull", "3"), ("kl_from_natural", "3"), ("leakage", "3 (reported)"),
                   ("ppl_", "3 (reported)"))

# The figures of one run (stage 08) and of its cross-seed summary: name -> (what it shows, findings, drawn from).
RUN_FIGURES = {
    "tsne.png": ("sentence embeddings of each text set (t-SNE): SynthQA's texts cluster apart", "the data (stage 02)",
                 "tsne.csv (from 02_data_flaws/)"),
    "token_kde.png": ("token-frequency density per text set: a template's structural tokens show as sharp peaks",
                      "the data (stage 02)", "token_frequency.csv (from 02_data_flaws/)"),
    "lengths.png": ("text lengths in words per set", "the data (stage 02)", "lengths.csv (from 02_data_flaws/)"),
    "loss_curves.png": ("training loss per step of every training stage and model", "none: that training ran",
                        "loss_curves.csv (each step's loss.csv)"),
    "headline.png": ("per model: benchmark accuracy, learnable-tier instructions followed, compliance margin, chat "
                     "preference and chat score, each in its own unit, with the best null reply",
                     "1, 2, 2c, 4, 5, 6", "tables/headline.csv (07_evaluate/*/metrics.json)"),
    "hsr_by_level.png": ("instructions fully followed by number of constraints, both tiers, with the nulls", "2",
                         "hsr_by_level.csv (07_evaluate/*/metrics.json)"),
    "sft_curve.png": ("learnable-tier instruction following, compliance margin and template pull along SFT", "2, 3",
                      "sft_curve.csv (07_evaluate/*/metrics.json, sft_curve)"),
    "perplexity_distributions.png": ("per-text log perplexity per model, before and after SFT", "3, 3b",
                                     "perplexity_distributions.csv (07_evaluate/*/perplexities.csv)"),
    "unlearning_losses.png": ("each unlearning method's loss terms and forget-set likelihood", "4",
                              "unlearning_losses.csv (05_unlearning/*/loss.csv)"),
    "unlearning_tradeoff.png": ("per unlearning method: instruction following recovered vs benchmark gain kept",
                                "4", "unlearning_tradeoff.csv (tables/headline.csv)"),
    "findings_forest.png": ("every check of every finding: its contrast with the 95% interval against 0, the "
                            "paper-sized effect and the non-inferiority margin, and its verdict",
                            "all (findings.md)", "findings_forest.csv (findings.json)"),
    "headline_ci.png": ("the headline endpoints per model, mean and 95% interval over seeds, each in its own unit",
                        "1, 2, 2c, 4, 5, 6", "tables/headline_ci.csv (every seed's 07_evaluate/*/metrics.json)"),
    "hsr_by_level_ci.png": ("instructions fully followed by number of constraints, mean and interval over seeds",
                            "2", "hsr_by_level_ci.csv"),
    "sft_curve_ci.png": ("the SFT curve, mean and interval over seeds", "2, 3", "sft_curve_ci.csv"),
}


def metric_findings(metric: str) -> str:
    """The findings a metric speaks to (`METRIC_FINDINGS`, first matching prefix)."""
    return next((ids for prefix, ids in METRIC_FINDINGS if metric.startswith(prefix)), "none")


def write_index(folder, rows: list[tuple[str, str, str, str]], title: str, note: str = "") -> str:
    """`README.md` in `folder`: a table of (figure, what it shows, finding, drawn from) rows; returns its name."""
    lines = [f"# {title}", "", "Generated with the figures; each PNG is drawn from the CSV named beside it alone."]
    if note:
        lines += ["", note]
    lines += ["", "| figure | what it shows | finding (findings.md) | drawn from |", "|---|---|---|---|"]
    lines += [f"| [{name}]({name}) | {what} | {finding} | {source} |" for name, what, finding, source in rows]
    write_text_atomic(Path(folder) / "README.md", "\n".join(lines) + "\n")
    return "README.md"


def run_index(folder, figures: list[str], title: str, note: str = "") -> str:
    """The index of a run's figure folder (stage 08, or the cross-seed `seeds/`), for the figures it drew."""
    return write_index(folder, [(name, *RUN_FIGURES[name]) for name in figures], title, note)


def sweep_row(png: str, csv: str, metric: str, key: str, contrast: str) -> tuple[str, str, str, str]:
    """A sweep figure's index row."""
    what = (f"{labels.metric(metric).words} ({labels.metric(metric).unit}) against the {labels.key(key).words}; "
            f"beside it {contrast}")
    return png, what, metric_findings(metric), csv
