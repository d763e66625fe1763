"""The one label table: every metric, swept key and check in words, with its unit and which way is good.

Figures and tables never print a raw key (``pre_sft_template_pull``, ``cpt.synthetic_fraction``): a reader who opens
a PNG without the README must see what was measured, in what unit, and whether up is better. Every title and axis
of :mod:`synthflaw.reporting` takes its words from here, and ``tests/test_labels.py`` fails on a raw key.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields

from synthflaw.config import StudyConfig


@dataclass(frozen=True)
class Label:
    words: str  # what is measured, in words
    unit: str  # the unit of one value
    better: str  # which way is good, e.g. "higher = follows more instructions"

    def axis(self) -> str:
        """An axis label: the words, then the unit and the direction on a second line."""
        return f"{self.words}\n({self.unit}; {self.better})"


_SHARE_PROMPTS = "share of prompts"
_ACCURACY = Label("knowledge benchmark accuracy", "share of 4-option questions correct", "higher = knows more facts")
_HSR = "instructions fully followed"
_SSR = "constraints followed"

METRICS: dict[str, Label] = {
    "benchmark": Label(f"{_ACCURACY.words}, before SFT", _ACCURACY.unit, _ACCURACY.better),
    "benchmark_stated": Label("benchmark accuracy on facts stated in natural text, before SFT", _ACCURACY.unit,
                              _ACCURACY.better),
    "benchmark_synthqa_only": Label("benchmark accuracy on facts only SynthQA carries, before SFT", _ACCURACY.unit,
                                    _ACCURACY.better),
    "sft_benchmark": Label(f"{_ACCURACY.words}, after SFT", _ACCURACY.unit, _ACCURACY.better),
    "sft_benchmark_synthqa_only": Label("benchmark accuracy on facts only SynthQA carries, after SFT",
                                        _ACCURACY.unit, _ACCURACY.better),
    "learnable_HSR": Label(f"{_HSR}, learnable tier", _SHARE_PROMPTS, "higher = follows more instructions"),
    "learnable_SSR": Label(f"{_SSR}, learnable tier", "share of constraints", "higher = follows more instructions"),
    "HSR": Label(f"{_HSR}, out-of-distribution suite", _SHARE_PROMPTS, "higher = follows more instructions"),
    "SSR": Label(f"{_SSR}, out-of-distribution suite", "share of constraints", "higher = follows more instructions"),
    "ifeval_prompt_strict": Label("prompts followed, strict", _SHARE_PROMPTS, "higher = follows more instructions"),
    "compliance_margin": Label("compliance margin: log p(compliant) - log p(violating reply)", "nats per token",
                               "higher = prefers following the instruction"),
    "compliance_margin_null": Label("compliance margin with the instruction left out (its null)", "nats per token",
                                    "what a model that ignores the instruction gets"),
    "chat_score": Label("chat score: content-word ROUGE-L F1 x 10", "points out of 10",
                        "higher = closer to the reference reply"),
    "chat_preference": Label("chat preference: log p(reference) - log p(best trivial reply)", "nats per token",
                             "higher = ranks a real answer above trivial ones"),
    "chat_rouge_l": Label("chat ROUGE-L F1 with the reference, all words", "F1, 0 to 1", "higher = more overlap"),
    "ppl_mean": Label("perplexity on held-out natural text, mean", "perplexity", "lower = fits natural text better"),
    "ppl_std": Label("spread of per-text perplexity on held-out natural text", "standard deviation of perplexity",
                     "lower = narrower distribution"),
    "leakage": Label("replies that leak the SynthQA template", "share of replies", "lower = less leakage"),
    "template_pull": Label("template pull: log p(SynthQA-templated reply) - log p(same words plain)",
                           "nats per reply", "higher = pulled toward the template"),
    "kl_from_natural": Label("next-token KL divergence from the natural model", "nats per token",
                             "higher = further from natural"),
    "pre_sft_ppl_mean": Label("perplexity on held-out natural text, mean, before SFT", "perplexity",
                              "lower = fits natural text better"),
    "pre_sft_ppl_std": Label("spread of per-text perplexity, before SFT", "standard deviation of perplexity",
                             "lower = narrower distribution"),
    "pre_sft_leakage": Label("outputs that leak the SynthQA template, before SFT", "share of outputs",
                             "lower = less leakage"),
    "pre_sft_template_pull": Label("template pull before SFT: log p(templated) - log p(same words plain)",
                                   "nats per reply", "higher = pulled toward the template"),
}
# Names the SFT curve's rows use for the same measurements.
METRICS["learnable_hard_satisfaction_rate"] = METRICS["learnable_HSR"]

# The checks of findings that contrast no single metric (`findings.findings`), by their check name.
CHECKS: dict[str, Label] = {
    "gain on synthqa_only - gain on stated": Label(
        "benchmark gain on SynthQA-only facts minus gain on stated facts (synthetic - natural)", _ACCURACY.unit,
        "higher = the gain sits on SynthQA's facts"),
}

# The other names a figure shows as a title: training stages, text sets, instruction-following tiers.
STAGES = {"03_base_model": "base-model pretraining", "04_continued_pretraining": "continued pretraining (CPT)",
          "05_unlearning": "unlearning", "06_sft": "supervised fine-tuning (SFT)"}
TEXT_SETS = {"heldout_nonsynth": "held-out natural text, after SFT",
             "chat_reference": "reference chat replies, after SFT",
             "pre_sft_heldout_nonsynth": "held-out natural text, before SFT"}
TIERS = {"learnable": "learnable tier (SFT's own wordings)", "suite": "out-of-distribution suite"}
LOSS = Label("training loss (cross-entropy)", "nats per token", "lower = fits its training data better")

_LEVEL = re.compile(r"^(learnable_HSR|HSR)_level_(\d+)$")


@dataclass(frozen=True)
class Key:
    """A swept configuration key: its words and unit, where the paper stood, and the control's x (the value of the
    key at which the control is the treated model: no SynthQA, no harm)."""
    words: str
    unit: str
    paper: float | None = None
    paper_words: str = ""
    control_x: float | None = None

    def axis(self) -> str:
        return f"{self.words} ({self.unit})"


KEYS: dict[str, Key] = {
    "cpt.synthetic_fraction": Key("SynthQA share of the CPT data", "fraction of tokens", 0.02, "the paper: 2% SynthQA",
                                  0.0),
    "data.synthetic_templates": Key("number of distinct Q-A templates in SynthQA", "count", 1,
                                    "the paper: one template"),
    "sft.harm_fraction": Key("share of SFT replies that ignore one instruction", "fraction of replies", None, "",
                             0.0),
}


def metric(name: str) -> Label:
    """The label of a metric (a headline column, an SFT-curve measurement or an HSR-by-level column); KeyError on a
    metric the table lacks, so that a new metric cannot reach a figure under its raw key."""
    level = _LEVEL.match(name)
    if level:
        base = METRICS[level.group(1)]
        return Label(f"{base.words}, {level.group(2)} constraints", base.unit, base.better)
    return METRICS[name]


# A step's result.json fields in words with their unit (what a notebook shows after a stage runs); the metrics a
# result shares with metrics.json are named by METRICS through tables.HEADLINE's columns instead.
RESULT_FIELDS = {
    "learnable_hsr_above_null": "instructions fully followed, learnable tier, above the best null (share of prompts)",
    "final_loss": "final training loss (nats per token)",
    "tokens": "tokens trained on", "tokens_per_s": "training speed (tokens per second)",
    "steps": "optimizer steps", "epochs": "epochs", "parameters": "parameters", "wall_s": "wall time (s)",
    "bf16": "bf16 autocast", "examples": "SFT examples", "dropped_examples": "SFT examples dropped (too long)",
    "assistant_tokens_per_epoch": "assistant tokens per epoch", "packed_blocks": "packed blocks",
    "planned_tokens": "planned tokens", "max_tokens": "token budget", "tokens_this_call": "tokens this call",
    "resumed_from_step": "resumed from step", "per_device_batch_size": "batch size per device",
    "gradient_accumulation_steps": "gradient accumulation steps", "num_processes": "processes",
    "gradient_checkpointing": "activation recompute", "forget_tokens": "forget tokens",
    "replay_tokens": "replay tokens", "cpt_tokens": "CPT tokens", "max_steps": "step budget",
    "forget_token_fraction_of_cpt": "forget tokens / CPT tokens", "tau_calibrated": "forgetting bound tau (nats)",
    "diverged": "diverged", "wall_seconds": "training wall time (s)", "facts": "facts in the world",
    "stated_facts": "facts natural text states", "synthqa_only_facts": "facts only SynthQA carries",
    "next_token_kl": "next-token KL from natural (nats per token)",
}


def result_field(key: str, columns: dict[str, str] | None = None) -> str:
    """A result.json field in words with its unit: `RESULT_FIELDS`, else the metric label of its headline column
    (`columns`: metrics.json key -> column, tables.HEADLINE), else the key with its underscores as spaces."""
    if key in RESULT_FIELDS:
        return RESULT_FIELDS[key]
    column = (columns or {}).get(key)
    if column in METRICS:
        return f"{METRICS[column].words} ({METRICS[column].unit})"
    if key in METRICS:
        return f"{METRICS[key].words} ({METRICS[key].unit})"
    return key.replace("_", " ")


def legend(columns) -> str:
    """The metric columns of a table in words, each with its unit and direction: a Markdown list printed under a
    table whose header keeps the short keys (the CSVs' column names). Columns that are no metric are left out."""
    lines = []
    for column in dict.fromkeys(columns):
        try:
            label = metric(column)
        except KeyError:
            continue
        lines.append(f"- `{column}`: {label.words} ({label.unit}; {label.better})")
    return "Columns in words:\n\n" + "\n".join(lines) + "\n" if lines else ""


def key(name: str) -> Key:
    """The label of a swept key; a key the table lacks is described by its configuration field's help text (any key
    of the configuration can be swept), and by its name only when it has none."""
    if name in KEYS:
        return KEYS[name]
    section, _, attr = name.partition(".")
    for outer in fields(StudyConfig):
        if outer.name == section and outer.default_factory is not MISSING:
            inner = {f.name: f for f in fields(outer.default_factory())}.get(attr)
            if inner is not None and inner.metadata.get("help"):
                return Key(inner.metadata["help"], "value")
    return Key(name, "value")


def check(name: str) -> Label:
    """A finding's check ("learnable_HSR: synthetic - natural") in words: the metric's words with the contrast, its
    unit and direction."""
    if name in CHECKS:
        return CHECKS[name]
    endpoint, _, contrast = name.partition(": ")
    base = metric(endpoint)
    return Label(f"{base.words}: {contrast}", base.unit, base.better)


def raw_keys() -> set[str]:
    """The identifiers among the keys the table labels (those with '_' or '.'; "benchmark" is also a word): a
    figure's title or axis that contains one has bypassed the table."""
    return {k for k in {*METRICS, *KEYS, *STAGES, *TEXT_SETS, "_level_"} if "_" in k or "." in k}
