"""Likelihood scoring in fp32 and under bf16 autocast, side by side on the SFT models of one finished run: how far
each scored endpoint moves, against its spread over items, and what each precision costs.

Stage 07 scores likelihoods in the precision its model was trained in (`compute.precision`; bf16 where `auto`
measured it faster). Rounding the activations and logits to bf16 moves every score a little; this says how much,
per model and per endpoint: the mean over items of (bf16 - fp32), the SD over items of that difference, and the SD
over items of the endpoint itself (what the item-level comparisons of the study average over). Times are the
scoring calls' seconds in each precision, interleaved so both see the same machine load.

    PYTHONPATH=. python benchmarks/scoring_precision.py RUN_DIR [--seed 5] [--models natural synthetic] \
        [--out benchmarks/results/scoring_precision.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from synthflaw.metrics.benchmark import predicted_choice, score_choices
from synthflaw.metrics.evaluation import load_eval_data
from synthflaw.metrics.likelihood import chat_preference, compliance_margins, template_pull
from synthflaw.metrics.shift import perplexities
from synthflaw.models.build import load_model, model_device
from synthflaw.models.tokenizer import load_tokenizer
from synthflaw.training.precision import autocast

BATCH_SIZE = 32  # evaluate.batch_size of the default preset


def endpoints(model, tokenizer, data, template) -> dict[str, list[float]]:
    """Every likelihood endpoint of stage 07, per item."""
    learnable, chat, bench = data["learnable_suite"], data["chat"], data["benchmark"]
    margins = compliance_margins(model, tokenizer, learnable, BATCH_SIZE)
    scores = score_choices(model, tokenizer, [r["prompt"] for r in bench], [r["choices"] for r in bench], BATCH_SIZE)
    return {"compliance_margin": margins["margin"], "compliance_margin_null": margins["margin_null"],
            "template_pull": template_pull(model, tokenizer, learnable, template, BATCH_SIZE),
            "chat_preference": chat_preference(model, tokenizer, chat, BATCH_SIZE),
            "benchmark_correct": [float(predicted_choice(score, False) == r["answer"])
                                  for r, score in zip(bench, scores)],
            "heldout_log_perplexity": np.log(perplexities(model, tokenizer,
                                                          [r["text"] for r in data["heldout_nonsynth"]],
                                                          BATCH_SIZE)).tolist()}


def compare(run: Path, seed: int, model_name: str, repeats: int) -> dict:
    seed_dir = run / f"seed-{seed}" if (run / f"seed-{seed}").is_dir() else run
    data_dir = seed_dir / "01_generate_data" / "data"
    model_dir = seed_dir / "06_sft" / model_name / "model"
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    data = load_eval_data(data_dir)
    template = json.loads((data_dir / "synthqa_templates.json").read_text())["templates"][0]
    values, seconds = {}, {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for precision in seconds:
            started = time.perf_counter()
            with autocast(precision, model_device(model)):
                values[precision] = endpoints(model, tokenizer, data, template)
            seconds[precision].append(time.perf_counter() - started)
    out = {"model": model_name, "scoring_s": {p: round(min(s), 2) for p, s in seconds.items()}, "endpoints": {}}
    for name, fp32 in values["fp32"].items():
        fp32, diff = np.asarray(fp32), np.asarray(values["bf16"][name]) - np.asarray(fp32)
        out["endpoints"][name] = {"fp32_mean": round(float(fp32.mean()), 5),
                                  "mean_diff": round(float(diff.mean()), 5),
                                  "sd_diff": round(float(diff.std(ddof=1)), 5),
                                  "max_abs_diff": round(float(np.abs(diff).max()), 5),
                                  "item_sd": round(float(fp32.std(ddof=1)), 5)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (runs/<run_id>)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["natural", "synthetic"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per precision (the fastest is kept)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [compare(args.run, args.seed, name, args.repeats) for name in args.models]
    for r in results:
        print(f"\n{r['model']}: scoring {r['scoring_s']['fp32']} s in fp32, {r['scoring_s']['bf16']} s in bf16")
        print("| endpoint | fp32 mean | mean bf16 - fp32 | SD of the difference | item SD |")
        print("|---|---:|---:|---:|---:|")
        for name, e in r["endpoints"].items():
            print(f"| {name} | {e['fp32_mean']} | {e['mean_diff']} | {e['sd_diff']} | {e['item_sd']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
