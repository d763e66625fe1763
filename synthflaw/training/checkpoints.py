"""Which checkpoint a training run resumes from: the newest complete one.

The Trainer writes a checkpoint file by file (weights, optimizer, scheduler, RNG state, then trainer_state.json),
so a kill during a save leaves a folder it cannot resume from, and its own `get_last_checkpoint` would pick it
anyway. `resume_checkpoint` checks every `checkpoint-N` folder (`checkpoint_problem`) and sets incomplete ones aside.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")  # the Trainer's folder for the checkpoint of step N
INCOMPLETE = "incomplete"  # checkpoints/incomplete/: folders a kill left half-written, kept for a look, never resumed
TRAINER_STATE = "trainer_state.json"
# What `Trainer._save_checkpoint` writes before trainer_state.json (which comes last), as (what, names): one whole
# file or folder of each group is needed to resume. The Trainer itself skips a missing optimizer or scheduler file
# silently (the run would go on with a fresh AdamW state), so this list is the check. The weights are whatever
# save_pretrained wrote (one file or an index of shards), or FSDP's; the optimizer state is optimizer.pt (one
# process, DDP), optimizer.bin or an optimizer_* folder (FSDP, through accelerate) or a global_step* folder
# (DeepSpeed); one RNG file per process.
RESUME_FILES = (
    ("model weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "pytorch_model_fsdp*")),
    ("optimizer state", ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*")),
    ("scheduler state", ("scheduler.pt",)),
    ("RNG state", ("rng_state.pth", "rng_state_*.pth")),
)


def checkpoint_folders(checkpoint_dir: str | Path) -> list[Path]:
    """The Trainer's `checkpoint-N` folders in `checkpoint_dir`, oldest step first (none if it does not exist)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := CHECKPOINT_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why the Trainer could not resume from the checkpoint `folder` (`checkpoint-N`), or None if it is complete.

    Complete: trainer_state.json (written last) parses and is for step N, and one whole file of each `RESUME_FILES`
    group is there. "Whole" is checked where it is cheap: a safetensors file as long as its header says, a
    torch.save archive with its closing directory, an index whose shards are all there; folders (FSDP, DeepSpeed)
    count by being there. A kill mid-save leaves a file cut short or missing; so does a kill while the Trainer
    deletes an old checkpoint, and, in a multi-process run, one process's RNG file can still be being written when
    the main process writes trainer_state.json.
    """
    folder = Path(folder)
    match = CHECKPOINT_FOLDER.fullmatch(folder.name)
    if match is None:
        return f"{folder.name} is not named checkpoint-<step>"
    try:
        problems = [_trainer_state_problem(folder / TRAINER_STATE, int(match.group(1)))]
        for what, names in RESUME_FILES:
            present = sorted({path for name in names for path in folder.glob(name)})
            if not present:
                problems.append(f"no {what} ({' or '.join(names)})")
            problems += [f"{path.name} {problem}" for path in present if (problem := _file_problem(path))]
    except OSError as error:  # the folder went away or cannot be read while being checked
        return f"unreadable ({error})"
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else None


def _trainer_state_problem(path: Path, step: int) -> str | None:
    if not path.is_file():
        return f"no {TRAINER_STATE}"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is not valid JSON (cut short)"
    if not isinstance(state, dict) or state.get("global_step") != step:
        found = state.get("global_step") if isinstance(state, dict) else None
        return f"{TRAINER_STATE} is for step {found!r}, not {step}"
    return None


def _file_problem(path: Path) -> str | None:
    """Why a file of a checkpoint is not whole (None if it is, or if there is no cheap way to tell)."""
    if path.is_dir():
        return None
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    if path.name.endswith(".safetensors"):
        # 8 bytes of header length, the JSON header, then the tensors up to the largest end offset
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            try:
                header = json.loads(handle.read(min(length, size)))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
                return "is cut short (its safetensors header does not parse)"
        return None if size == 8 + length + end else f"is cut short ({size} of {8 + length + end} bytes)"
    if path.name.endswith(".index.json"):
        try:
            shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return "is not a valid weights index (cut short)"
        for shard in sorted(shards):
            problem = _file_problem(path.parent / shard) if (path.parent / shard).is_file() else "is missing"
            if problem:
                return f"names the shard {shard}, which {problem}"
        return None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:  # torch.save writes a zip archive whose directory comes last: a file cut short has none
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, EOFError, ValueError):
            return "is cut short (not a whole torch.save archive)"
    return None


def last_complete_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest complete checkpoint in `checkpoint_dir` (see `checkpoint_problem`), or None. Changes nothing."""
    for folder in reversed(checkpoint_folders(checkpoint_dir)):
        if checkpoint_problem(folder) is None:
            return str(folder)
    return None


def resume_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The checkpoint a re-run resumes from: the newest complete one in `checkpoint_dir`, or None (start over).

    An incomplete `checkpoint-N` folder (a kill during a save, or during the deletion of an old checkpoint) is moved
    to `checkpoint_dir/incomplete/`, with a log line saying why: left in place, the Trainer would count it among the
    checkpoints it keeps (and delete a good one instead), and a later save of step N would write into it. Moved, not
    deleted, so a folder this check wrongly rejects is not lost. Only the main process moves; every process picks
    the same checkpoint, since a folder being moved is incomplete whether it is seen before or after the move.
    """
    main_process = int(os.environ.get("RANK", "0")) == 0
    resume_from = None
    for folder in reversed(checkpoint_folders(checkpoint_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            resume_from = resume_from or str(folder)
        elif main_process:
            _set_aside(folder, problem)
    return resume_from


def _set_aside(folder: Path, problem: str) -> None:
    target = folder.parent / INCOMPLETE / folder.name
    if target.exists():  # left by an earlier kill at the same step: the newer one is the one to look at
        shutil.rmtree(target)
    target.parent.mkdir(exist_ok=True)
    os.replace(folder, target)
    logger.warning(f"{folder} is incomplete ({problem}), probably cut by a kill during a save: moved to {target}; "
                   "training resumes from the last complete checkpoint")


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step of a `checkpoint-N` folder."""
    return int(CHECKPOINT_FOLDER.fullmatch(Path(checkpoint).name).group(1))
