"""Run a training stage's job in this process, or on several processes under `accelerate launch`.

Stages 03, 04 and 06 describe their training as a plain JSON job (`synthflaw.training.jobs.run_job`: the task, the
model folder, the data as JSONL paths, the hyperparameters). With `compute.num_processes = 1` the job runs here, in
the notebook's or the runner's process. With more, it is written to ``<step>/job.json`` and run by

    python -m accelerate.commands.launch --config_file accelerate/ddp.yaml --num_processes N \\
        --main_process_port PORT -m synthflaw.training.jobs <step>/job.json

as a subprocess whose output is shown as it comes and kept in ``<step>/launch.log``; the stage waits for it and
reads the summary the main process wrote (``train_summary.json``). The accelerate file picks DDP, FSDP or DeepSpeed;
the number of processes always comes from the config, so one file serves any GPU count.

The job's `batch_size` is the stage's global batch (sequences per optimizer step); `per_device_batch_size` splits it
over processes and accumulation micro-steps, so the optimizer sees the same examples per step on any hardware.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from synthflaw.records import write_json
from synthflaw.runs import die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO_ROOT / "accelerate"
DEFAULT_ACCELERATE_CONFIG = ACCELERATE_CONFIGS / "ddp.yaml"
LOG_TAIL_LINES = 40


class LaunchFailed(RuntimeError):
    """The `accelerate launch` subprocess exited with an error; the message holds the end of its log."""


def per_device_batch_size(batch_size: int, compute, num_processes: int | None = None) -> int:
    """Sequences per process and micro-step: `batch_size / (processes * compute.gradient_accumulation_steps)`."""
    processes = compute.num_processes if num_processes is None else num_processes
    share = processes * compute.gradient_accumulation_steps
    if batch_size % share:
        raise ValueError(f"batch_size={batch_size} is not divisible by {processes} processes x "
                         f"{compute.gradient_accumulation_steps} accumulation steps: change one of them")
    return batch_size // share


def accelerate_config_path(name: str) -> Path:
    """The accelerate config file `name` (empty: the shipped ddp.yaml), as given or relative to the repository."""
    if not name:
        return DEFAULT_ACCELERATE_CONFIG
    for candidate in (Path(name).expanduser(), REPO_ROOT / name):
        if candidate.is_file():
            return candidate.resolve()
    shipped = ", ".join(str(p.relative_to(REPO_ROOT)) for p in sorted(ACCELERATE_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"compute.accelerate_config={name!r} is not a file; the shipped ones: {shipped}")


def _free_port() -> int:
    """A free TCP port for the processes' rendezvous, so two launches on one host do not collide on 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command(job_path: str | Path, num_processes: int, config_file: str | Path,
                       port: int | None = None) -> list[str]:
    """The `accelerate launch` command line that runs `job_path` on `num_processes` processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(num_processes), "--main_process_port", str(port or _free_port()),
            "-m", "synthflaw.training.jobs", str(job_path)]


def launch_job(job: dict, work_dir: str | Path, *, num_processes: int, config_file: str | Path = "",
               env: dict | None = None, echo=print) -> dict:
    """Write `job` to ``<work_dir>/job.json``, run it under `accelerate launch` on `num_processes` processes, wait,
    and return the summary the job wrote to ``<job out_dir>/train_summary.json``.

    Every output line is passed to `echo` and written to ``<work_dir>/launch.log``. A non-zero exit raises
    LaunchFailed with the log's last lines. `env` adds variables to this process's environment for the launch.
    """
    if num_processes < 2:
        raise ValueError(f"num_processes={num_processes}: launch_job is for 2 or more processes; run the job in "
                         "this process with synthflaw.training.jobs.run_job")
    _check_devices(num_processes)
    _release_cached_gpu_memory()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    job_path = work_dir / "job.json"
    write_json(job_path, job)
    command = accelerate_command(job_path, num_processes, accelerate_config_path(str(config_file)))
    # The package must be importable in the children however this process found it (installed or from the repo).
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    child_env = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    log_path = work_dir / "launch.log"
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        # it writes into the run: it ends with this process (its workers end with it, synthflaw.training.jobs)
        process = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, preexec_fn=die_with_parent())
        for line in process.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            echo(line.rstrip("\n"))
        code = process.wait()
    if code != 0:
        raise LaunchFailed(f"`accelerate launch` of {job_path} on {num_processes} processes exited with code {code}; "
                           f"full log: {log_path}. Last lines:\n" + "\n".join(tail))
    summary_path = Path(job["out_dir"]) / "train_summary.json"
    return json.loads(summary_path.read_text())


def _check_devices(num_processes: int) -> None:
    """One process per GPU: more processes than GPUs would fail in each child with an invalid device ordinal."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise ValueError(f"compute.num_processes={num_processes} but this machine has {torch.cuda.device_count()} "
                         f"GPU(s): set compute.num_processes to at most {torch.cuda.device_count()}")


def _release_cached_gpu_memory() -> None:
    """Hand this process's cached CUDA blocks back (an earlier in-process stage, e.g. unlearning, may hold many GB
    on GPU 0), so the launched process on that GPU gets the memory."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def run_training(job: dict, compute, work_dir: str | Path, *, echo=print) -> dict:
    """Run a training job (see `synthflaw.training.jobs.run_job`) as the `compute` config section says.

    `job["batch_size"]` is the global batch: it becomes the per-device batch here, and the job gets the section's
    gradient accumulation and checkpointing. One process: the job runs in this process. More: under
    `accelerate launch` with `compute.accelerate_config` (see `launch_job`; its output lines go to `echo`).
    Returns the job's summary.
    """
    from synthflaw.training.jobs import run_job  # the job's modules import torch and transformers

    job = {**job, "batch_size": per_device_batch_size(job["batch_size"], compute),
           "gradient_accumulation_steps": compute.gradient_accumulation_steps,
           "gradient_checkpointing": compute.gradient_checkpointing, "bf16": compute.precision}
    if compute.num_processes == 1:
        return run_job(job)
    return launch_job(job, work_dir, num_processes=compute.num_processes, config_file=compute.accelerate_config,
                      echo=echo)
