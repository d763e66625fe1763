"""Training throughput of a preset's model: the library's Trainer path vs a plain PyTorch loop, fp32 vs bf16, with
model FLOP utilisation (MFU), on the CPU or a CUDA GPU.

Same model (seeded init, the preset's `base` shape), same packed data, same batch (the preset's `base.batch_size`
split into `compute.gradient_accumulation_steps` micro-batches), same optimizer (fused AdamW), schedule and gradient
clipping in both paths. Throughput is non-padding tokens per second over the steady-state steps (after `--warmup`
steps). MFU = 6 * N * tokens/s / (FLOP/s of a large matmul in the same precision family, measured in the same run on
the same device), N = parameters that do matmul work (every nn.Linear, the output head included). The 6N rule
(Kaplan et al. 2020, "Scaling Laws for Neural Language Models") leaves out attention-score FLOPs,
12 * layers * hidden * block per token (PaLM, Chowdhery et al. 2022, appendix B), reported separately.

On a CUDA machine the GPU is used (bf16 autocast where supported); on the CPU, each `--threads` count is measured.

    PYTHONPATH=. python benchmarks/throughput.py --out runs/throughput.json [--threads 1,2] [--steps 12]
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
from synthflaw.base_model import embedded_model_config
from synthflaw.training import CausalLMCollator, matmul_flops, matmul_parameters, train_causal_lm

LEARNING_RATE = 1e-3
PAD_ID = 1


class Setup:
    """The preset's model shape and batch layout."""

    def __init__(self, preset: str):
        cfg = config_mod.resolve(preset)
        self.preset = preset
        self.model = {**embedded_model_config(cfg.base), "vocab_size": cfg.base.vocab_size}
        self.block_size = cfg.base.block_size
        self.batch_size = cfg.base.batch_size
        self.accumulation = cfg.compute.gradient_accumulation_steps
        self.micro_batch = self.batch_size // self.accumulation
        self.gradient_checkpointing = cfg.compute.gradient_checkpointing

    def make_model(self, seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(LlamaConfig(**self.model, pad_token_id=PAD_ID))

    def make_data(self, blocks: int, seed: int) -> datasets.Dataset:
        rng = np.random.default_rng(seed)
        ids = rng.integers(2, self.model["vocab_size"], size=(blocks, self.block_size))
        return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


class _Tokenizer:
    """The least a Trainer needs from a processing class here: a pad id and save_pretrained."""

    pad_token_id = PAD_ID

    def save_pretrained(self, path, **kwargs):
        return ()


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.t0, self.t1 = warmup, steps, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, self.warmup + self.steps) and torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
        if state.global_step == self.warmup + self.steps:
            self.t1 = time.perf_counter()


def trainer_tokens_per_s(setup: Setup, dataset, *, bf16: bool, warmup: int, steps: int) -> float:
    timer = StepTimer(warmup, steps)
    with tempfile.TemporaryDirectory() as out_dir:
        train_causal_lm(setup.make_model(0), _Tokenizer(), dataset, out_dir, max_steps=warmup + steps,
                        batch_size=setup.micro_batch, gradient_accumulation_steps=setup.accumulation,
                        gradient_checkpointing=setup.gradient_checkpointing, learning_rate=LEARNING_RATE,
                        warmup_steps=1, seed=0, save_steps=10_000, bf16=bf16, callbacks=(timer,))
    return steps * setup.batch_size * setup.block_size / (timer.t1 - timer.t0)


def plain_loop_tokens_per_s(setup: Setup, dataset, *, bf16: bool, warmup: int, steps: int) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = setup.make_model(0).to(device)
    model.train()
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=warmup + steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=setup.micro_batch, shuffle=True, drop_last=True,
                                         collate_fn=CausalLMCollator(PAD_ID),
                                         generator=torch.Generator().manual_seed(0),
                                         pin_memory=device.type == "cuda")
    batches = iter(loader)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for _ in range(setup.accumulation):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss / setup.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * setup.batch_size * setup.block_size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON result")
    parser.add_argument("--preset", default="default", help="whose base model and batch to measure (default, gpu, ...)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all variants (median reported)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated torch thread counts (CPU only)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32 and/or bf16 (autocast)")
    args = parser.parse_args()

    setup = Setup(args.preset)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dataset = setup.make_data(setup.batch_size * (args.warmup + args.steps) * (args.repeats + 1), seed=0)
    model = setup.make_model(0)
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_parameters(model)
    attention_flops_per_token = 12 * setup.model["num_hidden_layers"] * setup.model["hidden_size"] * setup.block_size
    del model

    paths = {"trainer": trainer_tokens_per_s, "plain_loop": plain_loop_tokens_per_s}
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    rows = []
    for threads in ([torch.get_num_threads()] if cuda else [int(t) for t in args.threads.split(",")]):
        torch.set_num_threads(threads)
        peak = {"bf16": matmul_flops(torch.bfloat16, device), "fp32": matmul_flops(torch.float32, device)}
        samples: dict[tuple[str, str], list[float]] = {}
        memory: dict[tuple[str, str], float] = {}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every variant alike
            for path, measure in paths.items():
                for precision in precisions:
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    tps = measure(setup, dataset, bf16=precision == "bf16", warmup=args.warmup, steps=args.steps)
                    samples.setdefault((path, precision), []).append(tps)
                    if cuda:
                        memory[(path, precision)] = torch.cuda.max_memory_allocated() / 2**30
        for (path, precision), values in samples.items():
            tps = statistics.median(values)
            rows.append({
                "threads": threads, "path": path, "precision": "bf16-autocast" if precision == "bf16" else "fp32",
                "tokens_per_s": round(tps, 1), "samples": [round(v, 1) for v in values],
                "mfu_vs_bf16_matmul": round(6 * n_matmul * tps / peak["bf16"], 4),
                "mfu_vs_fp32_matmul": round(6 * n_matmul * tps / peak["fp32"], 4),
                "mfu_with_attention_vs_bf16_matmul": round(
                    (6 * n_matmul + attention_flops_per_token) * tps / peak["bf16"], 4),
                "bf16_matmul_tflops": round(peak["bf16"] / 1e12, 2), "fp32_matmul_tflops": round(peak["fp32"] / 1e12, 2),
                "peak_memory_gib": round(memory[(path, precision)], 2) if cuda else None,
            })

    result = {
        "preset": args.preset, "model": setup.model, "block_size": setup.block_size, "batch_size": setup.batch_size,
        "micro_batch_size": setup.micro_batch, "gradient_accumulation_steps": setup.accumulation,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "parameters": n_total, "parameters_doing_matmuls": n_matmul,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset} model: {n_total / 1e6:.2f}M parameters ({n_matmul / 1e6:.2f}M in matmuls), block "
          f"{setup.block_size}, batch {setup.batch_size} ({setup.accumulation} x {setup.micro_batch}), {result['device']}")
    print(f"{'threads':>7} {'path':>10} {'precision':>13} {'tokens/s':>9} {'MFU(bf16 mm)':>12} "
          f"{'MFU(fp32 mm)':>12} {'bf16 mm TF/s':>12} {'fp32 mm TF/s':>12} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['threads']:>7} {r['path']:>10} {r['precision']:>13} {r['tokens_per_s']:>9.0f} "
              f"{r['mfu_vs_bf16_matmul']:>12.1%} {r['mfu_vs_fp32_matmul']:>12.1%} "
              f"{r['bf16_matmul_tflops']:>12.2f} {r['fp32_matmul_tflops']:>12.2f} "
              f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-':>8}")


if __name__ == "__main__":
    main()
