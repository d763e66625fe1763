"""The evaluation's likelihood endpoints on a run's real models, by the plain scorer (every reply after its own pass
over the prompt) and by the shared scorer (each shared prefix computed once): the largest difference per endpoint,
and the seconds of each path, interleaved, median of `--repeats`. `--before CHECKOUT` times that checkout's shared
scorer (its synthflaw/models/scoring.py) beside them, on the same models and load.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/eval_paths.py runs/<run>/ [--models natural synthetic] \
        [--before /tmp/before]

`run` is a finished run folder (stage 06's models and stage 01's data on disk, so not an exported run). The numbers
it prints are what the shared path must keep: a difference of float rounding (~1e-5 nats), never a changed item.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from synthflaw.metrics import likelihood
from synthflaw.metrics.evaluation import load_eval_data
from synthflaw.models import scoring
from synthflaw.models.build import load_model, model_device
from synthflaw.models.tokenizer import load_tokenizer
from synthflaw.training.precision import autocast


def endpoints(model, pre_sft, tokenizer, data, template, batch_size) -> dict[str, np.ndarray]:
    learnable = data["learnable_suite"]
    margins = likelihood.compliance_margins(model, tokenizer, learnable, batch_size)
    return {"compliance_margin": np.array(margins["margin"]),
            "compliance_margin_null": np.array(margins["margin_null"]),
            "template_pull": np.array(likelihood.template_pull(model, tokenizer, learnable, template, batch_size)),
            "pre_sft_template_pull": np.array(likelihood.template_pull(pre_sft, tokenizer, learnable, template,
                                                                       batch_size, chat=False)),
            "chat_preference": np.array(likelihood.chat_preference(model, tokenizer, data["chat"], batch_size))}


def timed(scorer, *args) -> tuple[dict, tuple[float, float]]:
    """The endpoints by `scorer`, with the wall and this process's CPU seconds (on shared cores the CPU seconds
    are the steadier measure of the work done)."""
    likelihood.shared_context_logprobs = scorer  # the one scorer the endpoints call
    wall, cpu = time.perf_counter(), time.process_time()
    out = endpoints(*args)
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def scorer_of(checkout: Path):
    """`shared_context_logprobs` of another checkout's scoring module (its imports resolve to this package)."""
    spec = importlib.util.spec_from_file_location("before_scoring", checkout / "synthflaw" / "models" / "scoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shared_context_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", nargs="+", default=["natural"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--before", type=Path, help="a checkout whose shared scorer is timed too")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: under autocast, as stage 07 scores where the SFT step chose bf16")
    args = parser.parse_args()
    scorers = {"plain": scoring.continuation_logprobs, "shared": scoring.shared_context_logprobs}
    if args.before:
        scorers["before"] = scorer_of(args.before)
    data = load_eval_data(args.run / "01_generate_data" / "data")
    templates = json.loads((args.run / "01_generate_data" / "data" / "synthqa_templates.json").read_text())
    template = templates["templates"][0]
    report = {"torch_threads": torch.get_num_threads(), "precision": args.precision}
    for name in args.models:
        sft = args.run / "06_sft" / name
        model, tokenizer = load_model(sft / "model"), load_tokenizer(sft / "model")
        pre_sft = load_model(args.run / json.loads((sft / "result.json").read_text())["started_from"])
        model.eval(), pre_sft.eval()
        times = {f"{k}{suffix}": [] for k in scorers for suffix in ("", "_cpu")}
        scores = {}
        for _ in range(args.repeats):  # interleaved, so every path sees the same machine load
            for key, scorer in scorers.items():
                with autocast(args.precision, model_device(model)):
                    scores[key], (wall, cpu) = timed(scorer, model, pre_sft, tokenizer, data, template,
                                                     args.batch_size)
                times[key].append(wall), times[f"{key}_cpu"].append(cpu)
        medians = {k: statistics.median(v) for k, v in times.items()}
        plain = scores["plain"]
        report[name] = {"max_abs_difference": {key: {k: float(np.max(np.abs(plain[k] - scores[key][k])))
                                                      for k in plain} for key in scorers if key != "plain"},
                        "items": {k: len(v) for k, v in plain.items()},
                        "seconds_median": medians,
                        "speedup": {key: medians["plain"] / medians[key] for key in scorers},
                        "speedup_cpu": {key: medians["plain_cpu"] / medians[f"{key}_cpu"] for key in scorers}}
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
