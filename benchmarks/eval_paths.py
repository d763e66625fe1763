"""The evaluation's likelihood endpoints on a run's real models, by the plain scorer (every reply after its own pass
over the prompt) and by the shared-context scorer (each prompt encoded once, its KV cache reused for every reply):
the largest difference per endpoint, and the seconds of each path, interleaved, median of `--repeats`.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/eval_paths.py runs/<run>/ [--models natural synthetic]

`run` is a finished run folder (stage 06's models and stage 01's data on disk, so not an exported run). The numbers
it prints are what the shared path must keep: a difference of float rounding (~1e-5 nats), never a changed item.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from synthflaw.metrics import likelihood
from synthflaw.metrics.evaluation import load_eval_data
from synthflaw.models import scoring
from synthflaw.models.build import load_model
from synthflaw.models.tokenizer import load_tokenizer


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", nargs="+", default=["natural"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    shared = scoring.shared_context_logprobs
    data = load_eval_data(args.run / "01_generate_data" / "data")
    templates = json.loads((args.run / "01_generate_data" / "data" / "synthqa_templates.json").read_text())
    template = templates["templates"][0]
    report = {"torch_threads": torch.get_num_threads()}
    for name in args.models:
        sft = args.run / "06_sft" / name
        model, tokenizer = load_model(sft / "model"), load_tokenizer(sft / "model")
        pre_sft = load_model(args.run / json.loads((sft / "result.json").read_text())["started_from"])
        model.eval(), pre_sft.eval()
        times = {"plain": [], "shared": [], "plain_cpu": [], "shared_cpu": []}
        for _ in range(args.repeats):  # interleaved, so both paths see the same machine load
            plain, (wall, cpu) = timed(scoring.continuation_logprobs, model, pre_sft, tokenizer, data, template,
                                       args.batch_size)
            times["plain"].append(wall), times["plain_cpu"].append(cpu)
            new, (wall, cpu) = timed(shared, model, pre_sft, tokenizer, data, template, args.batch_size)
            times["shared"].append(wall), times["shared_cpu"].append(cpu)
        medians = {k: statistics.median(v) for k, v in times.items()}
        report[name] = {"max_abs_difference": {k: float(np.max(np.abs(plain[k] - new[k]))) for k in plain},
                        "items": {k: len(v) for k, v in new.items()},
                        "seconds_median": medians, "speedup": medians["plain"] / medians["shared"],
                        "speedup_cpu": medians["plain_cpu"] / medians["shared_cpu"]}
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
