"""Stage 07: evaluate every SFT model (a CPT branch or an unlearned model) the way the paper does, and more:
benchmark, instruction following, chat quality, output-distribution shift (:mod:`synthflaw.metrics.evaluation`)."""

from __future__ import annotations

import json

from synthflaw.data.schema import read_markers
from synthflaw.hub import hub_offline, model_name_problem
from synthflaw.metrics.chat import make_judge
from synthflaw.metrics.evaluation import (
    ENDPOINTS,
    curve_point,
    curve_point_from_items,
    evaluate_model,
    load_eval_data,
)
from synthflaw.models.build import load_model, model_device
from synthflaw.models.tokenizer import load_tokenizer
from synthflaw.progress import Endpoints
from synthflaw.records import write_csv, write_json, write_jsonl
from synthflaw.registry import EVALUATE, GENERATE_DATA, SFT
from synthflaw.training.precision import autocast

# What the step's result.json (and the runner's summary) keeps of the metrics.
SUMMARY_KEYS = ("pre_sft_benchmark_accuracy", "learnable_hard_satisfaction_rate", "learnable_hsr_above_null",
                "compliance_margin", "compliance_margin_null", "template_pull", "pre_sft_template_pull",
                "hard_satisfaction_rate", "chat_score", "chat_preference", "pre_sft_template_leakage_rate",
                "next_token_kl")


def check(cfg) -> list[str]:
    """Before any step: lm-evaluation-harness tasks download their data sets, refused while the hub is off; a local
    judge model (no judge endpoint) that cannot be found."""
    problems = []
    if cfg.evaluate.harness_tasks and hub_offline():
        problems.append(f"evaluate.harness_tasks={','.join(cfg.evaluate.harness_tasks)} downloads the tasks' data "
                        "from the Hugging Face hub, which is off (HF_HUB_OFFLINE=1): run with HF_HUB_OFFLINE=0, or "
                        "set evaluate.harness_tasks= (empty)")
    if not cfg.evaluate.judge_endpoint:
        problems.append(model_name_problem("evaluate.judge", cfg.evaluate.judge))
    return [p for p in problems if p]


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
    sft_result = json.loads((model_dir.parent / "result.json").read_text())
    pre_sft = load_model(step.read(sft_result["started_from"]))
    reference = None
    natural = step.read_step(SFT, "natural")
    if natural:
        reference = load_model(natural / "model")
    ev = cfg.evaluate
    templates = json.loads((data_dir / "synthqa_templates.json").read_text())["templates"]
    endpoints = Endpoints(len(ENDPOINTS) + 1, step.variant)  # the step's one bar, naming what it measures
    # The likelihood passes run in the precision the model was trained in (compute.precision, as the SFT step
    # chose it: bf16 autocast only where it measured faster); greedy generation stays fp32 (`generate_ids`).
    scoring = sft_result.get("precision", {}).get("precision", "fp32")
    data = load_eval_data(data_dir, ev.limit or None)
    with autocast(scoring, model_device(model)):
        evaluation = evaluate_model(model, tokenizer, data,
                                    reference_model=reference, markers=read_markers(data_dir), template=templates[0],
                                    max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                                    judge=make_judge(ev), speed_prompts=ev.speed_prompts, pre_sft_model=pre_sft,
                                    progress=endpoints)
        metrics = evaluation.metrics
        metrics["settings"].update(limit=ev.limit or None, scoring_precision=scoring)
        with endpoints.measuring("sft_curve"):
            metrics["sft_curve"] = sft_curve(model_dir, sft_result, tokenizer, evaluation, templates[0], ev,
                                             data["learnable_suite"])
    endpoints.close()
    write_jsonl(step.path / "samples.jsonl", evaluation.samples)
    write_csv(step.path / "perplexities.csv", evaluation.perplexities)
    write_csv(step.path / "items.csv", evaluation.items)
    write_json(step.path / "metrics.json", metrics)  # last: its presence means the other two are complete
    summary = {"model": step.variant, **{k: metrics.get(k) for k in SUMMARY_KEYS}}
    if ev.harness_tasks:  # after evaluate_model: the harness reseeds the global RNGs
        from synthflaw.metrics.harness import run_harness
        summary.update(run_harness(model, tokenizer, ev.harness_tasks, step.path, batch_size=ev.batch_size,
                                   limit=ev.limit or None,
                                   num_fewshot=None if ev.harness_num_fewshot < 0 else ev.harness_num_fewshot,
                                   seed=cfg.seed))
    return summary


def sft_curve(model_dir, sft_result, tokenizer, evaluation, template, ev, learnable) -> list[dict]:
    """The learnable tier's measurements along SFT: at each saved point (``06_sft/<model>/curve/step-<N>``) and of
    the final model, on the same first `evaluate.curve_items` of the `learnable` items evaluated. `sft_result`: the
    SFT step's result.json."""
    steps = sft_result.get("curve_steps") or [sft_result["steps"]]
    items = learnable[:ev.curve_items or None]
    points = []
    for n in steps[:-1]:
        snapshot = load_model(model_dir.parent / "curve" / f"step-{n}")
        points.append({"step": n, **curve_point(snapshot, tokenizer, items, template=template,
                                                max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)})
    final = curve_point_from_items(evaluation.items, {item["id"] for item in items})
    points.append({"step": steps[-1], **final})
    for point in points:
        point["fraction"] = round(point["step"] / steps[-1], 4)
        point["items"] = len(items)
    return points
