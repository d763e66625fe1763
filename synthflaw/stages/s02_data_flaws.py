"""Stage 02: the data's flaws. SynthQA against NonSynth (and the rewritten set): embeddings and t-SNE, the
token-frequency KDE, template concentration, distinct-n, compression, lengths."""

from __future__ import annotations

from synthflaw.data.schema import load_data
from synthflaw.metrics.data_patterns import analyse
from synthflaw.records import write_csv, write_json
from synthflaw.registry import GENERATE_DATA
from synthflaw.reporting.data_plots import plot_data_figures

ENCODERS = ("minilm",)


def check(cfg) -> list[str]:
    if cfg.flaws.encoder not in ENCODERS:
        return [f"flaws.encoder={cfg.flaws.encoder!r} is not known; the one encoder is 'minilm'"]
    return []


def run(cfg, step) -> dict:
    """Analyse stage 01's NonSynth, SynthQA (and rewritten set, when there is one) into the step folder, draw the
    figures, return the metrics."""
    problems = check(cfg)
    if problems:
        raise ValueError(problems[0])
    data = load_data(step.upstream(GENERATE_DATA) / "data")
    texts = {"NonSynth": [r["text"] for r in data["nonsynth"]], "SynthQA": [r["text"] for r in data["synthqa"]]}
    if data["rewritten"]:
        texts["Rewritten"] = [r["text"] for r in data["rewritten"]]
    metrics, tables = analyse(texts, cfg.seed, cfg.flaws.max_texts)
    for name, rows in tables.items():  # everything is computed before the first file is written
        write_csv(step.path / name, rows)
    write_json(step.path / "metrics.json", metrics, sort_keys=True)
    plot_data_figures(step.path)
    return metrics
