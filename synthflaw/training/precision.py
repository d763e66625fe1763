"""`compute.precision`: train (and score) in fp32, or under bf16 autocast with fp32 master weights, and `auto`,
which times both on this machine and keeps bf16 only where it is clearly faster.

Why measured and not a constant: CPUs differ. Without AVX512-BF16 or AMX, bf16 matmuls are emulated and bf16 autocast
runs several times slower than fp32; with AMX it runs 1.4-2.6x faster, with AVX512-BF16 alone (an AMD EPYC) the
default model's step ran 1.45x faster. A CUDA GPU is timed the same way (a small model can be bound by kernel
launches, where bf16 gains nothing); one without bf16 support keeps fp32 untimed.

The timing: a few forward-backward-optimizer steps of the model being trained, at its batch shape, on random
tokens, in both precisions, interleaved, the median step of each. It is cached per machine (CPU or GPU model, torch
version, model shape) in `cache_dir()`, so the stages of a run, and the runs after it, make the same choice; a
choice differing between two stages of one run would break its bit-reproducibility.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
# bf16 is kept only at least this much faster per step: on shared cores two timings of the same path differ by
# ~5-10%, and a choice made on noise would flip between machines that are the same.
BF16_SPEEDUP_NEEDED = 1.15
TIMED_STEPS = 3  # per precision, after one warm-up step each
CACHE_ENV = "SYNTHFLAW_CACHE"  # where the measured choices are kept (default: ~/.cache/synthflaw)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"compute.precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "synthflaw")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_seconds(model, batch_size: int, seq_len: int, bf16: bool, steps: int = TIMED_STEPS) -> list[float]:
    """Seconds of each of `steps` forward-backward-AdamW steps of `model` on random tokens (one warm-up step not
    counted), in fp32 or under bf16 autocast. The model's weights stay fp32 and are put back afterwards."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    was_training = model.training
    model.train()
    times = []
    try:
        for _ in range(steps + 1):
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    finally:
        model.load_state_dict(state)
        model.train(was_training)
    return times[1:]


def measure(model, batch_size: int, seq_len: int, steps: int = TIMED_STEPS) -> dict:
    """Median step seconds in fp32 and in bf16 autocast, the two interleaved so both see the same machine load."""
    times = {"fp32": [], "bf16": []}
    for _ in range(steps):
        for name in times:
            times[name] += step_seconds(model, batch_size, seq_len, name == "bf16", steps=1)
    return {f"{name}_step_s": round(statistics.median(values), 5) for name, values in times.items()}


def _cache_key(model, device: torch.device) -> str:
    c = model.config
    shape = (f"{c.model_type}-h{c.hidden_size}-i{getattr(c, 'intermediate_size', 0)}-l{c.num_hidden_layers}"
             f"-a{c.num_attention_heads}-v{c.vocab_size}")
    # Not the thread count nor the batch shape: the stages of a run train one model shape at different batch shapes
    # and thread counts, and must all make the same choice. The first stage to ask times its own batch shape.
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return f"{chip}|torch {torch.__version__}|{shape}"


def choose(precision: str, model, batch_size: int, seq_len: int) -> dict:
    """The precision to train `model` in at this batch shape: {"precision": "fp32" | "bf16", "setting": precision,
    "reason": ..., and for a CPU's `auto` the two step timings}. `fp32` and `bf16` are taken as set."""
    check_precision(precision)
    if precision != "auto":
        return {"precision": precision, "setting": precision, "reason": "set"}
    device = next(model.parameters()).device
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return {"precision": "fp32", "setting": "auto", "reason": "CUDA GPU without bf16 support"}
    path, key = cache_dir() / "precision.json", _cache_key(model, device)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cached:
        timings = measure(model, batch_size, seq_len)
        faster = timings["fp32_step_s"] / timings["bf16_step_s"]
        cached[key] = {**timings, "bf16_speedup": round(faster, 3), "timed_batch": [batch_size, seq_len],
                       "precision": "bf16" if faster >= BF16_SPEEDUP_NEEDED else "fp32"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: two processes measuring at once leave one whole file
    entry = cached[key]
    return {**entry, "setting": "auto", "machine": key,
            "reason": f"measured: bf16 autocast {entry['bf16_speedup']}x fp32's speed, bf16 needs "
                      f">= {BF16_SPEEDUP_NEEDED}x"}


def autocast(precision: str, device: torch.device | str):
    """The context for a forward pass in `precision` (`choose`'s "fp32" or "bf16"), weights untouched."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
