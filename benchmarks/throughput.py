"""Training throughput of a preset's model, side by side in one run: continued pre-training (packed blocks) and SFT
(the embedded chats, padded to the batch's longest or packed into rows), fp32 or bf16, with model FLOP utilisation
(MFU), on the CPU or a CUDA GPU.

Same model (seeded init, the preset's `base` shape) in every workload, the library's Trainer path
(`synthflaw.training.scaffold.train_causal_lm`), the preset's batch (`cpt.batch_size` blocks of `base.block_size`
tokens; `sft.batch_size` chats of the embedded SFT set at `sft.max_length`). Throughput is non-padding tokens per
second over the steady-state steps (after `--warmup` steps), counted by the Trainer. For reference, CPT and packed SFT
are also run through a plain PyTorch loop (what the Trainer costs on top). MFU = 6 * N * tokens/s / (FLOP/s of a large
matmul in the same precision, measured in the same run on the same device), N = parameters that do matmul work (every
nn.Linear, the output head included). The 6N rule (Kaplan et al. 2020) leaves out attention-score FLOPs, 12 * layers *
hidden * context per token, which is small here; for padded SFT it also counts no work on padding, which is the point:
padding is wasted compute.

    PYTHONPATH=. python benchmarks/throughput.py --out benchmarks/results/throughput_cpu.json [--threads 2] [--steps 12]
    PYTHONPATH=. python benchmarks/throughput.py --out wide.json --set base.hidden_size=768 \
        --set base.intermediate_size=2048   # the default model 4x wider
    PYTHONPATH=. python benchmarks/throughput.py --preset gpu --out runs/throughput_gpu.json --steps 20 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback, get_scheduler

from synthflaw import config as config_mod
from synthflaw.data.embedded import build_embedded
from synthflaw.data.schema import training_texts
from synthflaw.models.build import embedded_model_config
from synthflaw.models.tokenizer import train_tokenizer
from synthflaw.training.scaffold import CausalLMCollator, matmul_flops, matmul_parameters, train_causal_lm
from synthflaw.training.sft import PackedChatCollator, encode_chat

LEARNING_RATE = 1e-3


class Setup:
    """The preset's model shape, batch layouts, and the tokenizer and SFT chats of its embedded world (seed 0)."""

    def __init__(self, preset: str, sft_chats: int, overrides: dict | None = None):
        cfg = config_mod.resolve(preset, overrides)
        self.preset = preset
        self.cfg = cfg
        data = build_embedded(cfg.data, 0)
        self.tokenizer_dir = tempfile.mkdtemp()
        self.tokenizer = train_tokenizer(list(training_texts(data)), cfg.base.vocab_size, self.tokenizer_dir)
        self.model = {**embedded_model_config(cfg.base), "vocab_size": len(self.tokenizer)}
        self.block_size = cfg.base.block_size
        self.accumulation = cfg.compute.gradient_accumulation_steps
        self.gradient_checkpointing = cfg.compute.gradient_checkpointing
        self.sft = encode_chat(self.tokenizer, data["sft"][:sft_chats], cfg.sft.max_length)

    def make_model(self, seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(LlamaConfig(**self.model, pad_token_id=self.tokenizer.pad_token_id))

    def make_blocks(self, blocks: int, seed: int) -> datasets.Dataset:
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, self.model["vocab_size"], size=(blocks, self.block_size))
        ids[ids == self.tokenizer.pad_token_id] = self.tokenizer.eos_token_id  # no pad id inside packed text
        return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


class StepTimer(TrainerCallback):
    """Wall time and non-padding tokens between the end of step `warmup` and the end of step `warmup + steps`."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = self.tokens0 = self.tokens1 = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, self.warmup + self.steps) and torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
        if state.global_step == self.warmup + self.steps:
            self.t1, self.tokens1 = time.perf_counter(), state.num_input_tokens_seen

    def tokens_per_s(self) -> float:
        return (self.tokens1 - self.tokens0) / (self.t1 - self.t0)


def trainer_tokens_per_s(setup: Setup, dataset, batch_size: int, collator, *, bf16: bool, warmup: int,
                         steps: int) -> float:
    timer = StepTimer(warmup, steps)
    with tempfile.TemporaryDirectory() as out_dir:
        train_causal_lm(setup.make_model(0), setup.tokenizer, dataset, out_dir, max_steps=warmup + steps,
                        batch_size=batch_size // setup.accumulation, gradient_accumulation_steps=setup.accumulation,
                        gradient_checkpointing=setup.gradient_checkpointing, learning_rate=LEARNING_RATE,
                        warmup_steps=1, seed=0, save_steps=10_000, bf16=bf16, collator=collator, callbacks=(timer,))
    return timer.tokens_per_s()


def plain_loop_tokens_per_s(setup: Setup, dataset, batch_size: int, collator, *, bf16: bool, warmup: int,
                            steps: int) -> float:
    """The Trainer's workload through a bare loop (AdamW, cosine schedule, clipping): what the Trainer costs on top.
    Non-padding tokens per second, counted as the Trainer counts them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = setup.make_model(0).to(device)
    model.train()
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=warmup + steps)
    micro = batch_size // setup.accumulation
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, shuffle=True, drop_last=True,
                                         collate_fn=collator or CausalLMCollator(setup.tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(0),
                                         pin_memory=device.type == "cuda")
    batches = iter(loader)
    t0, tokens = None, 0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for _ in range(setup.accumulation):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            if step >= warmup:  # as the Trainer's "non_padding" count: the attention mask, else non-pad ids
                real = batch.get("attention_mask")
                if real is None:
                    real = batch["input_ids"] != setup.tokenizer.pad_token_id
                tokens += int(real.sum())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss / setup.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def workloads(setup: Setup, warmup: int, steps: int, repeats: int) -> dict:
    """name -> measure(bf16, warmup, steps) for every workload of one run."""
    cfg, pad = setup.cfg, setup.tokenizer.pad_token_id
    blocks = setup.make_blocks(cfg.cpt.batch_size * (warmup + steps) * (repeats + 1), seed=0)
    return {
        "cpt/trainer": lambda bf16: trainer_tokens_per_s(setup, blocks, cfg.cpt.batch_size, None, bf16=bf16,
                                                         warmup=warmup, steps=steps),
        "cpt/plain_loop": lambda bf16: plain_loop_tokens_per_s(setup, blocks, cfg.cpt.batch_size, None, bf16=bf16,
                                                               warmup=warmup, steps=steps),
        "sft-padded/trainer": lambda bf16: trainer_tokens_per_s(setup, setup.sft, cfg.sft.batch_size,
                                                                CausalLMCollator(pad), bf16=bf16, warmup=warmup,
                                                                steps=steps),
        "sft-packed/trainer": lambda bf16: trainer_tokens_per_s(setup, setup.sft, cfg.sft.batch_size,
                                                                PackedChatCollator(pad, cfg.sft.max_length),
                                                                bf16=bf16, warmup=warmup, steps=steps),
        "sft-packed/plain_loop": lambda bf16: plain_loop_tokens_per_s(setup, setup.sft, cfg.sft.batch_size,
                                                                      PackedChatCollator(pad, cfg.sft.max_length),
                                                                      bf16=bf16, warmup=warmup, steps=steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON result")
    parser.add_argument("--preset", default="default", help="whose model and batches to measure (default, gpu, ...)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all workloads (median reported)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated torch thread counts (CPU only)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32 and/or bf16 (autocast)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. --set base.hidden_size=768 --set base.intermediate_size=2048 "
                             "for the default model 4x wider")
    parser.add_argument("--sft-chats", type=int, default=1000, help="SFT chats of the embedded set to draw from")
    args = parser.parse_args()

    setup = Setup(args.preset, args.sft_chats, config_mod.parse_overrides(args.overrides))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = setup.make_model(0)
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_parameters(model)
    del model
    measures = workloads(setup, args.warmup, args.steps, args.repeats)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    sft_lengths = [len(ids) for ids in setup.sft["input_ids"]]
    rows = []
    for threads in ([torch.get_num_threads()] if cuda else [int(t) for t in args.threads.split(",")]):
        torch.set_num_threads(threads)
        peak = {"bf16": matmul_flops(torch.bfloat16, device), "fp32": matmul_flops(torch.float32, device)}
        samples: dict[tuple[str, str], list[float]] = {}
        memory: dict[tuple[str, str], float] = {}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every workload alike
            for name, measure in measures.items():
                for precision in precisions:
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    samples.setdefault((name, precision), []).append(measure(precision == "bf16"))
                    if cuda:
                        memory[(name, precision)] = torch.cuda.max_memory_allocated() / 2**30
        for (name, precision), values in samples.items():
            tps = statistics.median(values)
            rows.append({
                "threads": threads, "overrides": args.overrides, "workload": name,
                "precision": "bf16-autocast" if precision == "bf16" else "fp32",
                "tokens_per_s": round(tps, 1), "samples": [round(v, 1) for v in values],
                "mfu_vs_fp32_matmul": round(6 * n_matmul * tps / peak["fp32"], 4),
                "mfu_vs_bf16_matmul": round(6 * n_matmul * tps / peak["bf16"], 4),
                "fp32_matmul_tflops": round(peak["fp32"] / 1e12, 3), "bf16_matmul_tflops": round(peak["bf16"] / 1e12, 3),
                "peak_memory_gib": round(memory[(name, precision)], 2) if cuda else None,
            })
    cpt = {(r["threads"], r["precision"]): r["tokens_per_s"] for r in rows if r["workload"] == "cpt/trainer"}
    for r in rows:
        r["vs_cpt_trainer"] = round(r["tokens_per_s"] / cpt[(r["threads"], r["precision"])], 3)

    result = {
        "preset": args.preset, "model": setup.model, "block_size": setup.block_size,
        "cpt_batch_size": setup.cfg.cpt.batch_size, "sft_batch_size": setup.cfg.sft.batch_size,
        "sft_max_length": setup.cfg.sft.max_length, "sft_chats": len(sft_lengths),
        "sft_chat_tokens": {"mean": round(float(np.mean(sft_lengths)), 1), "max": int(max(sft_lengths))},
        "gradient_accumulation_steps": setup.accumulation, "gradient_checkpointing": setup.gradient_checkpointing,
        "parameters": n_total, "parameters_doing_matmuls": n_matmul,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset} model: {n_total / 1e6:.2f}M parameters ({n_matmul / 1e6:.2f}M in matmuls), {result['device']}; "
          f"SFT chats average {result['sft_chat_tokens']['mean']} tokens (max {result['sft_chat_tokens']['max']})")
    print(f"{'threads':>7} {'workload':>20} {'precision':>13} {'tokens/s':>9} {'vs CPT':>7} {'MFU(fp32 mm)':>12} "
          f"{'fp32 mm TF/s':>12}")
    for r in rows:
        print(f"{r['threads']:>7} {r['workload']:>20} {r['precision']:>13} {r['tokens_per_s']:>9.0f} "
              f"{r['vs_cpt_trainer']:>7.2f} {r['mfu_vs_fp32_matmul']:>12.1%} {r['fp32_matmul_tflops']:>12.3f}")


if __name__ == "__main__":
    main()
