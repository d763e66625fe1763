"""Standard benchmarks (MMLU, IFEval, ...) through EleutherAI's lm-evaluation-harness, on the in-memory model.

The paper preset reports the harness's numbers beside the study's own metrics, since they are what researchers
compare against. The harness is an optional extra (`pip install 'synthflaw[harness]'`) and downloads its data sets
from the Hugging Face hub, so the embedded default never calls it; its own tasks (a YAML file under `include_path`)
run offline.

Writes, like the harness's own CLI: `harness.json` (results, task configs, versions, sample counts, the harness's
environment record) and one `harness_samples_<task>.jsonl` of per-example outputs per task.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from synthflaw.records import write_json, write_jsonl

INSTALL_HINT = "pip install 'synthflaw[harness]'"

# Keys of simple_evaluate's result kept in harness.json; "samples" goes to the JSONL files instead.
_RESULT_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                "n-samples", "config", "git_hash", "date", "pretty_env_info", "transformers_version",
                "lm_eval_version", "upper_git_hash", "tokenizer_pad_token", "tokenizer_eos_token",
                "tokenizer_bos_token", "eot_token_id", "max_length")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"lm-evaluation-harness is not installed (needed for harness tasks): {INSTALL_HINT}"
                          ) from error
    return lm_eval, HFLM, TaskManager


def to_jsonable(obj):
    """`obj` with every value JSON can hold: numpy scalars become numbers, NaN/inf become None (strict JSON has no
    NaN), tuples and sets become lists, and anything else (functions in task configs, tensors) its string."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return to_jsonable(item())
    tolist = getattr(obj, "tolist", None)  # numpy arrays and tensors
    if callable(tolist):
        return to_jsonable(tolist())
    return str(obj)


def headline_metrics(results: dict) -> dict[str, float]:
    """Flat {"<task>/<metric>": value} of the top-level tasks: the requested tasks and groups, not the subtasks a
    group (like MMLU's 57 subjects) aggregates. A metric under a filter other than the harness's default "none"
    keeps it as a suffix: "gsm8k/exact_match/strict-match". Standard errors are left to harness.json."""
    subtasks = {name for members in results.get("group_subtasks", {}).values() for name in members}
    flat = {}
    for task, metrics in results["results"].items():
        if task in subtasks:
            continue
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            flat[f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"] = float(value)
    return flat


def _sample_file_name(task: str) -> str:
    return "harness_samples_" + re.sub(r"[^A-Za-z0-9_.-]", "_", task) + ".jsonl"


def run_harness(model, tokenizer, tasks: Sequence[str], out_dir: str | Path, *, batch_size: int,
                limit: int | float | None = None, num_fewshot: int | None = None,
                apply_chat_template: bool | None = None, seed: int = 0, log_samples: bool = True,
                include_path: str | Path | None = None, include_defaults: bool = True) -> dict[str, float]:
    """Evaluate an in-memory Hugging Face causal LM on lm-evaluation-harness tasks; write harness.json and the
    per-sample JSONL files to `out_dir`; return the headline numbers, e.g. {"mmlu/acc": ..,
    "ifeval/prompt_level_strict_acc": ..}.

    `tasks` are harness task or group names ("mmlu", "ifeval") or names of tasks defined under `include_path` (a
    YAML file or folder of them). `limit` caps the examples per task (a float below 1: a fraction). `num_fewshot`
    None keeps each task's default. `apply_chat_template` None applies it when the tokenizer carries one, as the
    study's SFT models do. `include_defaults=False` loads only the tasks under `include_path`, which skips indexing
    the harness's ~15k built-in task configs (slow). `seed` seeds the harness's sampling and few-shot choice (the
    harness reseeds Python's, NumPy's and torch's global RNGs with it).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of harness task names such as ['mmlu', 'ifeval'], "
                         f"got {tasks!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if include_path is not None and not Path(include_path).exists():
        raise FileNotFoundError(f"include_path {include_path} does not exist; pass a YAML task file or a folder "
                                f"of them")
    if not include_defaults and include_path is None:
        raise ValueError("include_defaults=False leaves no tasks to run unless include_path names some")
    if apply_chat_template is None:
        apply_chat_template = bool(getattr(tokenizer, "chat_template", None))

    task_manager = TaskManager(include_path=None if include_path is None else str(include_path),
                               include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown harness tasks {unknown}; check the names (`lm_eval ls tasks`) or the YAML files "
                         f"under include_path={include_path}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, log_samples=log_samples, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # only a non-zero rank of a distributed run gets None; rank 0 writes the files
        return {}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if log_samples:
        for task, samples in results.get("samples", {}).items():
            write_jsonl(out_dir / _sample_file_name(task), to_jsonable(samples))
    record = {key: results[key] for key in _RESULT_KEYS if key in results}
    record["synthflaw"] = {"model": getattr(model, "name_or_path", ""), "device": str(model.device),
                           "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                           "apply_chat_template": apply_chat_template, "seed": seed,
                           "include_path": None if include_path is None else str(include_path)}
    record = to_jsonable(record)
    headline = headline_metrics(record)
    record["headline"] = headline
    write_json(out_dir / "harness.json", record)
    return headline
