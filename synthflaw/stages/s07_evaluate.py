"""Stage 07: evaluate every SFT model (a CPT branch or an unlearned model) the way the paper does, and more:
benchmark, instruction following, chat quality, output-distribution shift (:mod:`synthflaw.metrics.evaluation`)."""

from __future__ import annotations

import json

from synthflaw.data.schema import read_markers
from synthflaw.hub import hub_offline
from synthflaw.metrics.chat import make_judge
from synthflaw.metrics.evaluation import evaluate_model, load_eval_data
from synthflaw.models.build import load_model
from synthflaw.models.tokenizer import load_tokenizer
from synthflaw.records import write_csv, write_json, write_jsonl
from synthflaw.registry import EVALUATE, GENERATE_DATA, SFT
from synthflaw.runs import Step

# What the step's result.json (and the runner's summary) keeps of the metrics.
SUMMARY_KEYS = ("benchmark_accuracy", "pre_sft_benchmark_accuracy", "hard_satisfaction_rate",
                "soft_satisfaction_rate", "chat_score", "template_leakage_rate", "pre_sft_template_leakage_rate",
                "next_token_kl")


def check(cfg) -> list[str]:
    """lm-evaluation-harness tasks download their data sets: refuse them while the hub is off, before any step."""
    if cfg.evaluate.harness_tasks and hub_offline():
        return [f"evaluate.harness_tasks={','.join(cfg.evaluate.harness_tasks)} downloads the tasks' data from the "
                "Hugging Face hub, which is off (HF_HUB_OFFLINE=1): run with HF_HUB_OFFLINE=0, or set "
                "evaluate.harness_tasks= (empty)"]
    return []


def run(cfg, step) -> dict:
    """Evaluate the SFT model named by the step's variant; write metrics.json (last), samples.jsonl and
    perplexities.csv.

    The `natural` SFT model, when it has finished, is the reference of the next-token KL (the shift is measured
    from the control). The checkpoint SFT started from (same tokenizer) is scored too: its benchmark score is the
    pre-SFT base capability.
    """
    if not step.variant:
        raise ValueError(f"{EVALUATE.name} needs a variant: the model to evaluate (a CPT branch or unlearn-<method>)")
    data_dir = step.upstream(GENERATE_DATA) / "data"
    model_dir = step.upstream(SFT, step.variant) / "model"
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    pre_sft = load_model(step.run_dir / json.loads((model_dir.parent / "result.json").read_text())["started_from"])
    reference = None
    natural = Step(step.run_dir, SFT, "natural")
    if natural.done:
        reference = load_model(natural.path / "model")
    ev = cfg.evaluate
    evaluation = evaluate_model(model, tokenizer, load_eval_data(data_dir, ev.limit or None),
                                reference_model=reference, markers=read_markers(data_dir),
                                max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, judge=make_judge(ev),
                                speed_prompts=ev.speed_prompts, pre_sft_model=pre_sft)
    metrics = evaluation.metrics
    metrics["settings"]["limit"] = ev.limit or None
    write_jsonl(step.path / "samples.jsonl", evaluation.samples)
    write_csv(step.path / "perplexities.csv", evaluation.perplexities)
    write_json(step.path / "metrics.json", metrics)  # last: its presence means the other two are complete
    summary = {"model": step.variant, **{k: metrics.get(k) for k in SUMMARY_KEYS}}
    if ev.harness_tasks:  # after evaluate_model: the harness reseeds the global RNGs
        from synthflaw.metrics.harness import run_harness
        summary.update(run_harness(model, tokenizer, ev.harness_tasks, step.path, batch_size=ev.batch_size,
                                   limit=ev.limit or None,
                                   num_fewshot=None if ev.harness_num_fewshot < 0 else ev.harness_num_fewshot,
                                   seed=cfg.seed))
    return summary
