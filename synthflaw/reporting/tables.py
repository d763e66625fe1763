"""The headline table's columns, and the small helpers every table and figure of a run shares."""

from __future__ import annotations

# The headline table's columns: metrics.json key (dotted for nested) -> column name. `benchmark*` is base capability,
# measured on the checkpoint before SFT (CPT branch or unlearned model), as knowledge benchmarks are in the paper;
# `sft_benchmark*` is the same benchmark after SFT. Instruction following: the learnable tier first (the primary
# one: `learnable_HSR`, and the compliance margin with its null), the out-of-distribution suite second (`HSR`).
HEADLINE = {"pre_sft_benchmark_accuracy": "benchmark",
            "pre_sft_benchmark_accuracy_by_split.stated": "benchmark_stated",
            "pre_sft_benchmark_accuracy_by_split.synthqa_only": "benchmark_synthqa_only",
            "benchmark_accuracy": "sft_benchmark",
            "benchmark_accuracy_by_split.synthqa_only": "sft_benchmark_synthqa_only",
            "learnable_hard_satisfaction_rate": "learnable_HSR", "learnable_soft_satisfaction_rate": "learnable_SSR",
            "compliance_margin": "compliance_margin", "compliance_margin_null": "compliance_margin_null",
            "hard_satisfaction_rate": "HSR", "soft_satisfaction_rate": "SSR",
            "ifeval_prompt_strict": "ifeval_prompt_strict", "chat_score": "chat_score",
            "chat_preference": "chat_preference", "chat_rouge_l": "chat_rouge_l",
            "perplexity.mean": "ppl_mean", "perplexity.std": "ppl_std", "template_leakage_rate": "leakage",
            "template_pull": "template_pull", "next_token_kl": "kl_from_natural",
            # the checkpoint SFT started from (CPT or unlearned): SFT can erase the shift the CPT model shows
            "pre_sft_perplexity.mean": "pre_sft_ppl_mean", "pre_sft_perplexity.std": "pre_sft_ppl_std",
            "pre_sft_template_leakage_rate": "pre_sft_leakage", "pre_sft_template_pull": "pre_sft_template_pull"}

# The nulls' columns (metrics.json "nulls" -> {kind: {key: value}}): what replies that read no instruction score on
# the same items, shown as rows "null:<kind>" beside the models.
NULL_COLUMNS = {"learnable_hard_satisfaction_rate": "learnable_HSR",
                "learnable_soft_satisfaction_rate": "learnable_SSR",
                "hard_satisfaction_rate": "HSR", "soft_satisfaction_rate": "SSR", "chat_score": "chat_score",
                "chat_rouge_l": "chat_rouge_l"}
NULL_PREFIX = "null:"


def num(value) -> float | None:
    """A CSV cell (or any value) as a float, None when it is empty or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def dig(d: dict, dotted: str):
    """The value at a dotted key of nested dicts ("perplexity.mean"), None when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def headline_values(metrics: dict) -> dict:
    """The headline columns of one metrics.json, None where a metric is missing."""
    return {column: dig(metrics, key) for key, column in HEADLINE.items()}


def null_rows(metrics: dict) -> list[dict]:
    """The headline rows of the nulls a metrics.json reports ("null:constant", ...), the other columns empty."""
    return [{"model": NULL_PREFIX + kind, **{column: None for column in HEADLINE.values()},
             **{column: values.get(key) for key, column in NULL_COLUMNS.items()}}
            for kind, values in (metrics.get("nulls") or {}).items()]


def markdown_table(rows: list[dict], columns: list[str] | None = None, fmt=None) -> str:
    """A Markdown table of `rows` (dicts) over `columns` (default: the first row's keys); floats get 3 decimals
    unless `fmt` (value -> str) says otherwise, None an empty cell."""
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if fmt is not None:
            return fmt(value)
        return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
