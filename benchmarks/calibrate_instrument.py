"""Calibrate the instrument's two free settings on the natural branch and the nulls only (issue 13):

- `data.instruction_doc_share`: the share of NonSynth documents that are request-and-reply texts, which lets
  pre-training teach a little instruction following, as web corpora do;
- the SFT budget: `data.sft_examples` x `sft.epochs` at `sft.learning_rate`.

Rule, fixed before the grid ran: the default is the smallest SFT budget (in optimizer steps), and at that budget the
smallest share, at which the natural model's hard satisfaction rate on the learnable tier is >= 0.40 and >= 0.25
above the best null reply (constant, prompt echoed, plain answer), on seed 0. No synthetic branch is trained: the
thresholds and budgets cannot be tuned on the difference the study tests.

Each grid point runs stages 01, 03 and 04 (natural only) once per share through the package's runner, then SFT from
that CPT checkpoint with the library's `supervised_finetune` and scores the learnable tier with the package's
checkers. Writes a JSON with every point and the chosen one.

    PYTHONPATH=. python benchmarks/calibrate_instrument.py --out benchmarks/results/calibration_instrument.json   # ~15 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from synthflaw.metrics.instruction_following import instruction_following, null_replies  # noqa: E402
from synthflaw.models.build import load_model  # noqa: E402
from synthflaw.models.generation import generate_responses  # noqa: E402
from synthflaw.models.tokenizer import load_tokenizer  # noqa: E402
from synthflaw.records import read_jsonl  # noqa: E402
from synthflaw.runner import run_study  # noqa: E402
from synthflaw.training.sft import supervised_finetune  # noqa: E402

HSR_FLOOR, ABOVE_NULL = 0.40, 0.25
SHARES = (0.0, 0.1, 0.3, 0.5)
# (examples, epochs, learning rate): budgets on the share grid's middle value, then the shares at the chosen budget
BUDGETS = ((1000, 2.0, 5e-4), (1000, 2.0, 1e-3), (1000, 6.0, 5e-4), (3000, 1.0, 1e-3), (3000, 1.0, 2e-3),
           (3000, 2.0, 1e-3), (3000, 2.0, 2e-3), (5000, 1.0, 2e-3))
BUDGET_SHARE = 0.3


def prepare(root: Path, share: float, examples: int, seed: int) -> Path:
    """Stages 01, 03, 04 (natural) with this share and SFT set size; 01 only is redone for another size."""
    run_id = f"share{share}-sft{examples}"
    overrides = {"cpt.branches": ["natural"], "unlearn.methods": [], "data.instruction_doc_share": share,
                 "data.sft_examples": examples, "seed": seed}
    stages = ["01", "03", "04"]
    base = root / f"share{share}-sft1000"
    if examples != 1000 and base.exists():  # same world, base and CPT: only the SFT set differs
        stages = ["01"]
    run_study("default", run_id, overrides, runs_root=root, engine="inprocess", only=stages, log=lambda _: None)
    return root / run_id


def point(run: Path, cpt_run: Path, epochs: float, lr: float, seed: int, work: Path) -> dict:
    cpt = cpt_run / "04_continued_pretraining" / "natural" / "model"
    data = run / "01_generate_data" / "data"
    model, tokenizer = load_model(cpt), load_tokenizer(cpt)
    records, items = read_jsonl(data / "sft.jsonl"), read_jsonl(data / "learnable_suite.jsonl")
    out = work / "sft"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = supervised_finetune(model, tokenizer, records, out, max_length=256, epochs=epochs, batch_size=16,
                                  learning_rate=lr, warmup_steps=10, seed=seed, save_steps=10**6)
    seconds = time.perf_counter() - started
    model.eval()
    responses = generate_responses(model, tokenizer, [r["prompt"] for r in items], 96, 32)
    following, _ = instruction_following(items, responses)
    nulls = {k: instruction_following(items, r)[0]["hard_satisfaction_rate"] for k, r in null_replies(items).items()}
    hsr = following["hard_satisfaction_rate"]
    return {"steps": summary["steps"], "sft_seconds": round(seconds, 1), "sft_tokens": summary["tokens"],
            "hsr": hsr, "hsr_by_level": following["hsr_by_level"], "nulls": nulls,
            "above_best_null": hsr - max(nulls.values()), "items": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {(s, 1000): prepare(root, s, 1000, args.seed) for s in SHARES}
        cpt_tokens = json.loads((runs[(BUDGET_SHARE, 1000)] / "04_continued_pretraining" / "natural"
                                 / "result.json").read_text())["tokens"]
        grid = [(BUDGET_SHARE, *b) for b in BUDGETS]
        for share, examples, epochs, lr in grid:
            run = runs.get((share, examples)) or prepare(root, share, examples, args.seed)
            runs[(share, examples)] = run
            rows.append({"share": share, "sft_examples": examples, "epochs": epochs, "learning_rate": lr,
                         **point(run, runs[(share, 1000)], epochs, lr, args.seed, root)})
            print(json.dumps(rows[-1]), flush=True)
        passing = [r for r in rows if r["hsr"] >= HSR_FLOOR and r["above_best_null"] >= ABOVE_NULL]
        chosen = min(passing, key=lambda r: (r["steps"], -r["hsr"])) if passing else None
        if chosen:
            for share in SHARES:
                if share == BUDGET_SHARE:
                    continue
                run = prepare(root, share, chosen["sft_examples"], args.seed)
                rows.append({"share": share, "sft_examples": chosen["sft_examples"], "epochs": chosen["epochs"],
                             "learning_rate": chosen["learning_rate"],
                             **point(run, runs[(share, 1000)], chosen["epochs"], chosen["learning_rate"], args.seed,
                                     root)})
                print(json.dumps(rows[-1]), flush=True)
            at_budget = [r for r in rows if (r["sft_examples"], r["epochs"], r["learning_rate"])
                         == (chosen["sft_examples"], chosen["epochs"], chosen["learning_rate"])]
            ok = [r for r in at_budget if r["hsr"] >= HSR_FLOOR and r["above_best_null"] >= ABOVE_NULL]
            chosen = min(ok, key=lambda r: r["share"])
    result = {"rule": f"smallest SFT budget (steps), then smallest share, with natural learnable HSR >= {HSR_FLOOR} "
                      f"and >= {ABOVE_NULL} above the best null; natural branch only, seed {args.seed}",
              "cpt_tokens": cpt_tokens, "threads": args.threads, "grid": rows, "chosen": chosen,
              "sft_to_cpt_tokens": chosen["sft_tokens"] / cpt_tokens if chosen else None}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("chosen:", json.dumps(chosen))


if __name__ == "__main__":
    main()
