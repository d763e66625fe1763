"""The whole evaluation of one model (stage 07): every measurement family on a stage-01 data folder.

1. Knowledge benchmark (:mod:`~synthflaw.metrics.benchmark`), after SFT and on the checkpoint SFT started from.
2. Instruction following (:mod:`~synthflaw.metrics.instruction_following`) on greedy responses: the learnable
   tier first (`learnable_*`, the primary one), the out-of-distribution suite second (`hard_satisfaction_rate`,
   ...); the compliance margin on the learnable tier (:mod:`~synthflaw.metrics.likelihood`).
3. Chat quality (:mod:`~synthflaw.metrics.chat`): the content score, plain ROUGE-L, the chat preference
   (likelihood), and an optional judge.
4. Output-distribution shift (:mod:`~synthflaw.metrics.shift`): perplexities, template leakage, template pull,
   length, distinct-n, the next-token KL from a reference (the `natural`) model; for the checkpoint SFT started
   from, the perplexities, the template pull and the leakage of its plain-text continuations (SFT can erase a
   shift the CPT model shows).

Every instruction-following and chat measure is reported beside its nulls (`metrics["nulls"]`: a constant reply,
the prompt echoed, the plain answer), scored by the same code on the same items. `evaluate_model` returns the
metrics, the per-item samples, the per-sample perplexities and the per-item values of the endpoints the
cross-seed analysis pairs across models (`items`); stage 07 writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthflaw.metrics.benchmark import (
    benchmark_metrics,
    predicted_choice,
    score_choices,
)
from synthflaw.metrics.chat import content_chat_scores, reference_chat_scores
from synthflaw.metrics.instruction_following import instruction_following, null_replies
from synthflaw.metrics.likelihood import (
    chat_preference,
    compliance_margins,
    template_pull,
)
from synthflaw.metrics.shift import (
    PROBE_NEW_TOKENS,
    mean_response_words,
    next_token_kl,
    perplexities,
    perplexity_summary,
    plain_prompt_probes,
    template_leakage_rate,
)
from synthflaw.metrics.text import distinct_n, words
from synthflaw.models.generation import (
    generate_continuations,
    generate_responses,
    generation_speed,
)
from synthflaw.progress import Endpoints
from synthflaw.records import read_jsonl

# The stage-01 files an evaluation reads, and the fields each of their records needs.
EVAL_SETS = {"benchmark": ("id", "prompt", "choices", "answer", "split"),
             "learnable_suite": ("id", "prompt", "level", "constraints", "base_prompt", "instructions", "plain",
                                 "reference", "undone"),
             "instruction_suite": ("id", "prompt", "level", "constraints"),
             "chat": ("id", "prompt", "reference"),
             "heldout_nonsynth": ("id", "text")}


# What evaluate_model measures, in order: one tick each of its progress bar, and its timings' keys (`<name>_s`).
ENDPOINTS = ("benchmark", "learnable", "generation", "chat", "distribution_shift")


def load_eval_data(data_dir, limit: int | None = None) -> dict[str, list[dict]]:
    """The evaluation sets of a stage-01 data folder, the first `limit` records of each (None or 0: all), checked."""
    data_dir = Path(data_dir)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative integer, got {limit!r}")
    missing = [f"{name}.jsonl" for name in EVAL_SETS if not (data_dir / f"{name}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {missing}; point data_dir at stage 01's output folder")
    data = {name: read_jsonl(data_dir / f"{name}.jsonl")[:limit or None] for name in EVAL_SETS}
    for name, keys in EVAL_SETS.items():
        if not data[name]:
            raise ValueError(f"{name}.jsonl is empty; regenerate the data (stage 01) with items in every suite")
        for record in data[name]:
            absent = [k for k in keys if k not in record]
            if absent:
                raise ValueError(f"{name}.jsonl: record {record.get('id')!r} lacks {absent}; regenerate the data "
                                 "(stage 01)")
    return data


@dataclass
class Evaluation:
    """What `evaluate_model` measured: the metrics, one sample per item, one row per scored perplexity, and one row
    per (set, item, metric) of the endpoints the cross-seed analysis pairs across models."""

    metrics: dict
    samples: list[dict]
    perplexities: list[dict]
    items: list[dict]


def _has_marker(text: str, markers: Sequence[str]) -> bool:
    return any(m in text for m in markers)


def _benchmark(model, pre_sft_model, tokenizer, items, batch_size):
    prompts, choices = [r["prompt"] for r in items], [r["choices"] for r in items]
    scores = score_choices(model, tokenizer, prompts, choices, batch_size)
    bench = benchmark_metrics(items, scores)
    pre_sft = pre_scores = None
    if pre_sft_model is not None:
        pre_scores = score_choices(pre_sft_model, tokenizer, prompts, choices, batch_size)
        pre_sft = benchmark_metrics(items, pre_scores)
    metrics = {
        "benchmark_accuracy": bench["accuracy"],
        "benchmark_acc_norm": bench["acc_norm"],
        "benchmark_accuracy_by_split": {s: v["accuracy"] for s, v in bench["by_split"].items()},
        "benchmark_acc_norm_by_split": {s: v["acc_norm"] for s, v in bench["by_split"].items()},
        "benchmark_count_by_split": {s: v["count"] for s, v in bench["by_split"].items()},
        "pre_sft_benchmark_accuracy": pre_sft["accuracy"] if pre_sft else None,
        "pre_sft_benchmark_acc_norm": pre_sft["acc_norm"] if pre_sft else None,
        "pre_sft_benchmark_accuracy_by_split": (
            {s: v["accuracy"] for s, v in pre_sft["by_split"].items()} if pre_sft else None),
    }
    samples = [{"task": "benchmark", "id": r["id"], "prompt": r["prompt"], "choices": r["choices"],
                "split": r["split"], "answer": r["answer"], "predicted": predicted_choice(score, False),
                "predicted_norm": predicted_choice(score, True), "logprobs": [s[0] for s in score]}
               for r, score in zip(items, scores)]
    for sample, pre in zip(samples, pre_scores or []):
        sample["pre_sft_predicted"] = predicted_choice(pre, False)
    return metrics, samples


def _chat(items, responses, judge, markers):
    scores = content_chat_scores(responses, [r["reference"] for r in items], [r["prompt"] for r in items])
    rouge = reference_chat_scores(responses, [r["reference"] for r in items])
    judged = [None] * len(items)
    if judge is not None:
        judged = [judge(r["prompt"], r["reference"], response) for r, response in zip(items, responses)]
    rated = [s for s in judged if s is not None]
    metrics = {"chat_score": float(np.mean(scores)),
               "chat_score_method": "10 x ROUGE-L F1 on the content words (not function words, not in the prompt) "
                                    "of reply and reference",
               "chat_rouge_l": float(np.mean(rouge)),
               "chat_judge_score": float(np.mean(rated)) if rated else None,
               "chat_judge_unparseable": sum(s is None for s in judged) if judge is not None else None}
    samples = [{"task": "chat", "id": r["id"], "prompt": r["prompt"], "response": response,
                "reference": r["reference"], "chat_score": score, "rouge_l": rl, "judge_score": rating,
                "template_leak": _has_marker(response, markers)}
               for r, response, score, rl, rating in zip(items, responses, scores, rouge, judged)]
    return metrics, samples


def _nulls(learnable, suite, chat) -> dict:
    """Every instruction-following and chat measure of the null replies (`null_replies`), on the same items."""
    out = {}
    for name, replies in null_replies(learnable).items():
        following, _ = instruction_following(learnable, replies)
        out.setdefault(name, {}).update({f"learnable_{k}": following[k] for k in LEARNABLE_KEYS})
    for name, replies in null_replies(suite).items():
        following, _ = instruction_following(suite, replies)
        out.setdefault(name, {}).update({k: following[k] for k in ("hard_satisfaction_rate",
                                                                   "soft_satisfaction_rate", "hsr_by_level")})
    for name, replies in null_replies(chat).items():
        if name != "plain":  # a chat item's plain answer is its reference: the real answer, not a null
            prompts, references = [r["prompt"] for r in chat], [r["reference"] for r in chat]
            out[name]["chat_score"] = float(np.mean(content_chat_scores(replies, references, prompts)))
            out[name]["chat_rouge_l"] = float(np.mean(reference_chat_scores(replies, references)))
    return out


# The learnable tier's metrics kept in metrics.json (with the prefix learnable_) and in the nulls.
LEARNABLE_KEYS = ("hard_satisfaction_rate", "soft_satisfaction_rate", "hsr_by_level", "count_by_level",
                  "ifeval_instruction_strict")


def _learnable(model, tokenizer, items, template, max_new_tokens, batch_size, pre_sft_model):
    """The learnable tier: greedy responses checked, compliance margins, template pull (also before SFT)."""
    responses = generate_responses(model, tokenizer, [r["prompt"] for r in items], max_new_tokens, batch_size)
    following, verdicts = instruction_following(items, responses)
    margins = compliance_margins(model, tokenizer, items, batch_size)
    pull = template_pull(model, tokenizer, items, template, batch_size)
    pre_pull = (template_pull(pre_sft_model, tokenizer, items, template, batch_size, chat=False)
                if pre_sft_model is not None else None)
    metrics = {f"learnable_{k}": following[k] for k in LEARNABLE_KEYS}
    metrics.update({"compliance_margin": float(np.mean(margins["margin"])),
                    "compliance_margin_null": float(np.mean(margins["margin_null"])),
                    "template_pull": float(np.mean(pull)),
                    "pre_sft_template_pull": float(np.mean(pre_pull)) if pre_pull is not None else None})
    samples = [{"task": "learnable", "id": r["id"], "prompt": r["prompt"], "level": r["level"], "response": response,
                "constraints": r["constraints"], "verdicts": verdict["strict"], "all_followed": all(verdict["strict"]),
                "compliance_margin": margin, "compliance_margin_null": null, "template_pull": p}
               for r, response, verdict, margin, null, p in zip(items, responses, verdicts, margins["margin"],
                                                                margins["margin_null"], pull)]
    values = []
    for k, verdict in enumerate(verdicts):
        values.append({"followed": float(all(verdict["strict"])),
                       "soft": sum(verdict["strict"]) / len(verdict["strict"]),
                       "compliance_margin": margins["margin"][k], "compliance_margin_null": margins["margin_null"][k],
                       "template_pull": pull[k]})
        if pre_pull is not None:
            values[-1]["pre_sft_template_pull"] = pre_pull[k]
    return metrics, samples, learnable_rows(items, values)


def learnable_rows(items: list[dict], values: list[dict[str, float]]) -> list[dict]:
    """items.csv's rows of the learnable tier: one per item and metric (`values[k]`: metric -> value of items[k]),
    each naming its cluster, the item's base prompt (`base_id`): items on one base share a subject, so their
    standard errors are clustered by it (an item without a base is its own cluster)."""
    return [{"set": "learnable_suite", "id": r["id"], "metric": m, "value": v, "cluster": r.get("base_id", r["id"])}
            for r, by_metric in zip(items, values, strict=True) for m, v in by_metric.items()]


def evaluate_model(model, tokenizer, data: dict[str, list[dict]], *, reference_model=None, markers: Sequence[str],
                   template: dict, max_new_tokens: int, batch_size: int, judge=None, speed_prompts: int = 0,
                   pre_sft_model=None, progress: Endpoints | None = None) -> Evaluation:
    """Evaluate one model on the evaluation sets `data` (`load_eval_data`).

    `markers` are the SynthQA templates' structural strings and `template` the one the template pull writes replies
    in (template 0, the paper's uniform format). `reference_model` (the `natural` SFT model) enables
    `next_token_kl` (null without it). `judge` is any callable (question, reference, response) -> score in 1-10 or
    None when its output was unparseable (:class:`synthflaw.metrics.chat.RatingJudge`). `speed_prompts` > 0 also
    times batched against one-at-a-time generation on that many suite prompts. `pre_sft_model` (the CPT or
    unlearned checkpoint this model was fine-tuned from) is scored on the benchmark too: `pre_sft_benchmark_*` is
    base capability as the paper reports it (knowledge benchmarks measure the pre-trained model; SFT on a small
    model also erodes knowledge, which the post-SFT `benchmark_*` shows). The same checkpoint gets
    `pre_sft_perplexity` on the held-out NonSynth documents and `pre_sft_template_leakage_rate` on plain-text
    continuations of `plain_prompt_probes` (null without a pre-SFT model).

    `progress`: the bar that shows which of `ENDPOINTS` is being measured (default: one of its own, closed at the
    end); each one's seconds go into ``metrics["timings"]``, and so do those the caller measures on the same bar
    afterwards.
    """
    benchmark, learnable, suite, chat, heldout = (data[name] for name in EVAL_SETS)
    for m in (model, reference_model, pre_sft_model):
        if m is not None:
            m.eval()
    endpoints = progress or Endpoints(len(ENDPOINTS), "evaluate")
    with endpoints.measuring("benchmark"):
        bench_metrics, bench_samples = _benchmark(model, pre_sft_model, tokenizer, benchmark, batch_size)
    with endpoints.measuring("learnable"):
        learnable_metrics, learnable_samples, item_rows = _learnable(model, tokenizer, learnable, template,
                                                                     max_new_tokens, batch_size, pre_sft_model)
    with endpoints.measuring("generation"):
        suite_responses = generate_responses(model, tokenizer, [r["prompt"] for r in suite], max_new_tokens,
                                             batch_size)
        chat_responses = generate_responses(model, tokenizer, [r["prompt"] for r in chat], max_new_tokens, batch_size)
    following, verdicts = instruction_following(suite, suite_responses)
    with endpoints.measuring("chat"):
        chat_metrics, chat_samples = _chat(chat, chat_responses, judge, markers)
        preference = _chat_preference(model, tokenizer, chat, batch_size, chat_metrics)
    with endpoints.measuring("distribution_shift"):
        shift = _distribution_shift(model, tokenizer, data, reference_model, pre_sft_model, max_new_tokens,
                                    batch_size)
    if progress is None:  # a bar this call made; a caller's bar goes on to its own endpoints
        endpoints.close()

    nulls = _nulls(learnable, suite, chat)
    best_null = max(n["learnable_hard_satisfaction_rate"] for n in nulls.values())
    metrics = {
        **bench_metrics,
        **learnable_metrics,
        "learnable_hsr_above_null": learnable_metrics["learnable_hard_satisfaction_rate"] - best_null,
        **following,
        **chat_metrics,
        **_shift_metrics(shift, suite_responses, chat_responses, markers),
        "nulls": nulls,
        "counts": {"benchmark": len(benchmark), "learnable_suite": len(learnable), "instruction_suite": len(suite),
                   "chat": len(chat), "heldout_nonsynth": len(heldout),
                   "pre_sft_probes": len(shift.probe_responses)},
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "markers": list(markers), "judge": type(judge).__name__ if judge is not None else None},
    }
    if speed_prompts:
        metrics["generation_speed"] = generation_speed(model, tokenizer, [r["prompt"] for r in suite[:speed_prompts]],
                                                       max_new_tokens, batch_size)
    # the bar's own dict, not a copy: what a caller's bar goes on to measure (stage 07's SFT curve) is recorded too
    metrics["timings"] = endpoints.timings

    for sample, ppl, pref in zip(chat_samples, shift.reference, preference):
        sample["reference_perplexity"], sample["chat_preference"] = float(ppl), pref
    item_rows += _item_rows(benchmark, bench_samples, chat, chat_samples, shift.probe_responses, markers)
    samples = (bench_samples + learnable_samples + _suite_samples(suite, suite_responses, verdicts, markers)
               + chat_samples + [{"task": "pre_sft_continuation", "prompt": prompt, "response": response,
                                  "template_leak": _has_marker(response, markers)}
                                 for prompt, response in zip(shift.probes, shift.probe_responses)])
    return Evaluation(metrics, samples, _perplexity_rows(data, shift), item_rows)


def _suite_samples(suite, responses, verdicts, markers) -> list[dict]:
    return [{"task": "instruction", "id": r["id"], "prompt": r["prompt"], "level": r["level"], "response": response,
             "constraints": r["constraints"], "verdicts": verdict["strict"], "verdicts_loose": verdict["loose"],
             "all_followed": all(verdict["strict"]), "template_leak": _has_marker(response, markers)}
            for r, response, verdict in zip(suite, responses, verdicts)]


def _chat_preference(model, tokenizer, chat, batch_size, metrics: dict) -> list[float]:
    """The chat preference (likelihood) per item; its mean and rate go into `metrics`."""
    preference = chat_preference(model, tokenizer, chat, batch_size)
    metrics["chat_preference"] = float(np.mean(preference))
    metrics["chat_preference_rate"] = float(np.mean([p > 0 for p in preference]))
    return preference


@dataclass
class _Shift:
    """What the distribution-shift endpoint measured: perplexities per held-out document and per chat reference,
    the next-token KL, and the pre-SFT checkpoint's perplexities and plain-text continuations of the probes."""

    heldout: list[float]
    reference: list[float]
    kl: float | None
    pre_sft: list[float] | None
    probes: list[str]
    probe_responses: list[str]


def _distribution_shift(model, tokenizer, data, reference_model, pre_sft_model, max_new_tokens,
                        batch_size) -> _Shift:
    heldout, suite, chat = data["heldout_nonsynth"], data["instruction_suite"], data["chat"]
    ppl_heldout = perplexities(model, tokenizer, [r["text"] for r in heldout], batch_size)
    ppl_reference = perplexities(model, tokenizer, [r["reference"] for r in chat], batch_size,
                                 contexts=[r["prompt"] for r in chat])
    kl = None
    if reference_model is not None:
        kl = next_token_kl(model, reference_model, tokenizer, [r["prompt"] for r in suite], batch_size)
    # Before SFT: SFT on the same chats can erase the CPT model's shift (in the embedded study no SFT model leaks
    # the template), so the checkpoint SFT started from is measured too, on plain text (it has seen no chat
    # template).
    ppl_pre_sft, probes, probe_responses = None, plain_prompt_probes(suite, chat), []
    if pre_sft_model is not None:
        ppl_pre_sft = perplexities(pre_sft_model, tokenizer, [r["text"] for r in heldout], batch_size)
        probe_responses = generate_continuations(pre_sft_model, tokenizer, probes,
                                                 min(PROBE_NEW_TOKENS, max_new_tokens), batch_size, start=True)
    return _Shift(ppl_heldout, ppl_reference, kl, ppl_pre_sft, probes, probe_responses)


def _shift_metrics(shift: _Shift, suite_responses, chat_responses, markers) -> dict:
    responses = suite_responses + chat_responses
    return {
        "perplexity": perplexity_summary(shift.heldout),
        "perplexity_reference": perplexity_summary(shift.reference),
        "template_leakage_rate": template_leakage_rate(responses, markers),
        "template_leakage_rate_suite": template_leakage_rate(suite_responses, markers),
        "template_leakage_rate_chat": template_leakage_rate(chat_responses, markers),
        "response_words": mean_response_words(responses),
        "distinct_1": distinct_n(map(words, responses), 1),
        "distinct_2": distinct_n(map(words, responses), 2),
        "next_token_kl": shift.kl,
        "pre_sft_perplexity": perplexity_summary(shift.pre_sft) if shift.pre_sft is not None else None,
        "pre_sft_template_leakage_rate": (template_leakage_rate(shift.probe_responses, markers)
                                          if shift.probe_responses else None),
    }


def _item_rows(benchmark, bench_samples, chat, chat_samples, probe_responses, markers) -> list[dict]:
    """The per-item values of the chat, benchmark and probe endpoints the cross-seed analysis pairs across models."""
    rows = [{"set": "chat", "id": r["id"], "metric": m, "value": v}
            for r, sample in zip(chat, chat_samples)
            for m, v in (("chat_score", sample["chat_score"]), ("chat_preference", sample["chat_preference"]))]
    for r, sample in zip(benchmark, bench_samples):
        rows.append({"set": f"benchmark/{r['split']}", "id": r["id"], "metric": "correct",
                     "value": float(sample["predicted"] == sample["answer"])})
        if "pre_sft_predicted" in sample:
            rows.append({"set": f"benchmark/{r['split']}", "id": r["id"], "metric": "pre_sft_correct",
                         "value": float(sample["pre_sft_predicted"] == sample["answer"])})
    rows += [{"set": "probes", "id": str(k), "metric": "pre_sft_leak", "value": float(_has_marker(text, markers))}
             for k, text in enumerate(probe_responses)]
    return rows


def _perplexity_rows(data, shift: _Shift) -> list[dict]:
    heldout, chat = data["heldout_nonsynth"], data["chat"]
    rows = [{"set": "heldout_nonsynth", "id": r["id"], "perplexity": float(p)} for r, p in zip(heldout, shift.heldout)]
    rows += [{"set": "chat_reference", "id": r["id"], "perplexity": float(p)} for r, p in zip(chat, shift.reference)]
    if shift.pre_sft is not None:
        rows += [{"set": "pre_sft_heldout_nonsynth", "id": r["id"], "perplexity": float(p)}
                 for r, p in zip(heldout, shift.pre_sft)]
    return rows


# The SFT curve's measurements: the learnable tier's hard satisfaction rate, compliance margin (and its null) and
# template pull, on the first `curve_items` learnable items (the same items at every point).
CURVE_METRICS = ("learnable_hard_satisfaction_rate", "compliance_margin", "compliance_margin_null", "template_pull")


def curve_point(model, tokenizer, items: Sequence[dict], *, template: dict, max_new_tokens: int,
                batch_size: int) -> dict:
    """The SFT curve's measurements of a model saved part of the way through SFT."""
    model.eval()
    metrics, _, _ = _learnable(model, tokenizer, items, template, max_new_tokens, batch_size, None)
    return {k: metrics[k] for k in CURVE_METRICS}


def curve_point_from_items(item_rows: list[dict], ids: set[str]) -> dict:
    """The same measurements of the final model, from its per-item values on the curve's items (no new pass)."""
    values = {}
    for row in item_rows:
        if row["set"] == "learnable_suite" and row["id"] in ids:
            values.setdefault(row["metric"], []).append(row["value"])
    return {"learnable_hard_satisfaction_rate": float(np.mean(values["followed"])),
            **{k: float(np.mean(values[k])) for k in ("compliance_margin", "compliance_margin_null", "template_pull")}}
