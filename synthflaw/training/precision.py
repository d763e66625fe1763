"""`compute.precision`: train (and score) in fp32, or under bf16 autocast with fp32 master weights, and `auto`,
which times both on this machine and keeps bf16 only where it is clearly faster.

Why measured and not a constant: CPUs differ. Without AVX512-BF16 or AMX, bf16 matmuls are emulated and bf16 autocast
runs several times slower than fp32; with AMX it runs 1.4-2.6x faster, with AVX512-BF16 alone (an AMD EPYC) the
default model's step ran 1.45x faster. A CUDA GPU is timed the same way (a small model can be bound by kernel
launches, where bf16 gains nothing); one without bf16 support keeps fp32 untimed.

The timing: a few forward-backward-optimizer steps of the model being trained, at its batch shape, on random
tokens, in both precisions, interleaved, the median step of each. It stops as soon as bf16 is clearly slower
(`CLEARLY_SLOWER`), cutting off the bf16 step that shows it: on a CPU that emulates bf16, timing six bf16 steps of
13.6 s each cost a fresh machine's first stage ~90 s; cut off at twice fp32's step (~1.4 s there), the probe ends
after two fp32 steps and the first bf16 forward pass, ~7 s. It is cached
per machine (the GPU's model; the CPU's model and the instruction sets that decide bf16's speed, since one model name
covers CPUs with and without AVX512-BF16; torch version, model shape) in `cache_dir()`, so the stages of a run, and
the runs after it, make the same choice; a choice differing between two stages of one run would break its
bit-reproducibility.
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
# bf16 whose step costs this many times fp32's median is not timed further: far past the noise (~5-10%) and the
# margin, so the choice (fp32) is made. Its step is cut off there too (`step_seconds`' give_up_s).
CLEARLY_SLOWER = 2.0
# /proc/cpuinfo flags that decide bf16 autocast's speed on a CPU: native bf16 dot products (AVX512-BF16), the AMX
# tiles, and the vector widths oneDNN falls back to when bf16 is emulated.
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
CACHE_ENV = "SYNTHFLAW_CACHE"  # where the measured choices are kept (default: ~/.cache/synthflaw)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"compute.precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "synthflaw")


def _cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none: not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line's value in /proc/cpuinfo, or None."""
    for line in _cpuinfo().splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == name:
            return value.strip()
    return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_features() -> str | None:
    """The CPU's `BF16_FLAGS` it has, e.g. "avx2 avx512f avx512_bf16" ("none" for none of them); None where
    /proc/cpuinfo lists no flags (not Linux)."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return None
    present = set(flags.split())
    return " ".join(f for f in BF16_FLAGS if f in present) or "none"


def cpu_key() -> str:
    """The CPU as the choice's cache knows it: its model name and, where known, its bf16 features ("AMD EPYC
    [avx2 avx512f avx512_bf16]"): one model name covers CPUs with and without native bf16, which choose differently.
    The model name alone elsewhere."""
    features = cpu_features()
    return cpu_name() if features is None else f"{cpu_name()} [{features}]"


def _since(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the kernels queued so far are part of the time
    return time.perf_counter() - started


def _cut_off(started: float, device: torch.device, give_up_s: float | None, times: list[float]) -> bool:
    """Whether a step started at `started` has run longer than `give_up_s` (never without one); if so, its time so
    far is appended to `times`."""
    if give_up_s is None:
        return False
    elapsed = _since(started, device)
    if elapsed <= give_up_s:
        return False
    times.append(elapsed)
    return True


def step_seconds(model, batch_size: int, seq_len: int, bf16: bool, steps: int = TIMED_STEPS,
                 give_up_s: float | None = None) -> list[float]:
    """Seconds of each of `steps` forward-backward-AdamW steps of `model` on random tokens (one warm-up step not
    counted), in fp32 or under bf16 autocast. The model's weights stay fp32 and are put back afterwards.

    `give_up_s`: a step (the warm-up too) that has taken longer when its forward or its backward pass ends is cut
    off there and ends the timing; its time so far is the last entry (a lower bound of its cost, all a precision
    that much slower needs to be known by). A warm-up's one-time costs count: where they decide, a step takes
    milliseconds and the speed at stake is as small."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    was_training = model.training
    model.train()
    times: list[float] = []
    try:
        for _ in range(steps + 1):
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=tokens, labels=tokens).loss
            if _cut_off(started, device, give_up_s, times):
                break
            loss.backward()
            if _cut_off(started, device, give_up_s, times):
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(_since(started, device))
    finally:
        model.load_state_dict(state)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)  # a cut-off step leaves its gradients on the model
    return times[1:] or times  # a warm-up that was cut off stands for the step


def measure(model, batch_size: int, seq_len: int, steps: int = TIMED_STEPS) -> dict:
    """Median step seconds in fp32 and in bf16 autocast, the two interleaved so both see the same machine load.

    bf16 is timed no further once its median step costs `CLEARLY_SLOWER` times fp32's (`clearly_slower`: "bf16"):
    each bf16 step is cut off at that time (`step_seconds`' give_up_s), which then stands for it. Only bf16 is cut
    off: stopping early can only keep fp32, the choice that holds without timing; a bf16 choice rests on every step.
    """
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(steps):
        times["fp32"] += step_seconds(model, batch_size, seq_len, False, steps=1)
        give_up = CLEARLY_SLOWER * statistics.median(times["fp32"])
        times["bf16"] += step_seconds(model, batch_size, seq_len, True, steps=1, give_up_s=give_up)
        if statistics.median(times["bf16"]) >= give_up:
            return {**_medians(times), "clearly_slower": "bf16"}
    return _medians(times)


def _medians(times: dict[str, list[float]]) -> dict:
    return {f"{name}_step_s": round(statistics.median(values), 5) for name, values in times.items()}


def _cache_key(model, device: torch.device) -> str:
    c = model.config
    shape = (f"{c.model_type}-h{c.hidden_size}-i{getattr(c, 'intermediate_size', 0)}-l{c.num_hidden_layers}"
             f"-a{c.num_attention_heads}-v{c.vocab_size}")
    # Not the thread count nor the batch shape: the stages of a run train one model shape at different batch shapes
    # and thread counts, and must all make the same choice. The first stage to ask times its own batch shape.
    # A CPU by its name and bf16 features (a key of the name alone, as before, is not looked up: it is timed again)
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_key()
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
    cut = (f" (timing stopped once {entry['clearly_slower']} was clearly slower)"
           if entry.get("clearly_slower") else "")
    return {**entry, "setting": "auto", "machine": key,
            "reason": f"measured: bf16 autocast {entry['bf16_speedup']}x fp32's speed{cut}, bf16 needs "
                      f">= {BF16_SPEEDUP_NEEDED}x"}


def autocast(precision: str, device: torch.device | str):
    """The context for a forward pass in `precision` (`choose`'s "fp32" or "bf16"), weights untouched."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
