"""Run ids and run folders, the records that make a folder a run or a sweep, and the lock on a run folder: every
command goes through them before it writes anything. Also how the processes that write into a run (the notebook
kernel, `accelerate launch` and its workers) end with the process that started them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from synthflaw.records import write_json, write_text_atomic

RUN_ID_MAX_BYTES = 100  # of UTF-8; an export adds ".partial" to it, well within a name's 255
STUDY, SWEEP_MANIFEST = "study.json", "sweep.json"  # what makes a folder a run, a sweep
SEEDS_RECORD = "seeds.json"  # what makes a folder a multi-seed run: the seeds it was asked for
LOCK_NAME, PID_NAME = ".lock", ".lock.pid"  # in the run folder; dot-names: no stage, export or digest sees them


class BrokenRunFile(ValueError):
    """A run folder's record (study.json, a sweep's manifest) cannot be read; the message names it and the fix."""


class RunLocked(RuntimeError):
    """Another process holds the run folder."""


def write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj, sort_keys=True)


def check_run_id(run_id) -> str:
    """`run_id` if it is a plain folder name, else ValueError saying what is wrong. Every command checks it before it
    writes or deletes anything: a path in an id would write (or delete) outside the runs folder."""
    example = "e.g. --run-id study-2026-11-21"
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"the run id is empty: name the run folder ({example}), or leave --run-id out for a "
                         "generated name")
    shown = run_id if len(run_id) <= 40 else run_id[:40] + "..."
    if "/" in run_id or "\\" in run_id or (os.sep in run_id) or (os.altsep and os.altsep in run_id):
        raise ValueError(f"run id {shown!r} contains a path separator; it must be a plain folder name ({example}); "
                         "use --runs-root to choose where runs go")
    if not run_id.isprintable():
        raise ValueError(f"run id {shown!r} contains non-printable characters; use letters, digits, '-' and '_' "
                         f"({example})")
    if run_id.startswith("."):
        raise ValueError(f"run id {shown!r} starts with '.'; it must be a plain, visible folder name ({example})")
    if run_id != run_id.strip():
        raise ValueError(f"run id {shown!r} starts or ends with white space, which a shell or a script drops or "
                         f"splits; use letters, digits, '-' and '_' ({example})")
    if run_id.startswith("~"):
        raise ValueError(f"run id {shown!r} starts with '~', which a shell expands to a home folder ({example})")
    # file systems limit a name's bytes, not its characters (255 on most): 100 CJK characters are 300 bytes
    size = len(os.fsencode(run_id))
    if size > RUN_ID_MAX_BYTES:
        raise ValueError(f"run id {shown!r} is {size} bytes long in UTF-8 ({len(run_id)} characters); at most "
                         f"{RUN_ID_MAX_BYTES} bytes ({example})")
    return run_id


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path` resolves (symbolic links followed) strictly inside `root`."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path != root and path.is_relative_to(root)


def run_folder(runs_root: str | Path, run_id: str) -> Path:
    """``<runs_root>/<run_id>`` after checking the id, and that the folder resolves inside `runs_root` (a symbolic
    link named like a run could point anywhere). The path is returned as given, not resolved: runs record it."""
    run_dir = Path(runs_root) / check_run_id(run_id)
    if not inside(run_dir, runs_root):
        raise ValueError(f"{run_dir} resolves to {run_dir.resolve()}, outside the runs folder {runs_root}: pick "
                         "another --run-id, or remove the link")
    return run_dir


KINDS = {"run": "a single run", "seeds": "a multi-seed run", "sweep": "a sweep"}


def folder_kind(folder: str | Path) -> str | None:
    """What a folder under the runs root holds: "sweep" (a ``sweep.json``), "seeds" (a multi-seed run: a
    ``seeds.json`` or ``seed-<k>/study.json`` runs), "run" (a single run: a ``study.json`` at its top), or None
    (none of them, or no folder). A folder with marks of two kinds (a single run written into a multi-seed one by
    an older version) reads as the first of sweep, seeds, run."""
    folder = Path(folder)
    if (folder / SWEEP_MANIFEST).exists():
        return "sweep"
    if (folder / SEEDS_RECORD).exists() or any(folder.glob(f"seed-*/{STUDY}")):
        return "seeds"
    if (folder / STUDY).exists():
        return "run"
    return None


def refuse_other_kind(folder: str | Path, kind: str) -> None:
    """ValueError when `folder` holds another kind than `kind` ("run", "seeds" or "sweep"), or marks of two kinds:
    `synthflaw run` must not write a single run into a multi-seed run's folder (nor seeds into a single run's), nor
    a study into a sweep's folder, nor `synthflaw sweep` a manifest and points into a run's."""
    folder = Path(folder)
    found = folder_kind(folder)
    mixed = found == "seeds" and (folder / STUDY).exists()
    if found is None or (found == kind and not mixed):
        return
    how = {"sweep": f"synthflaw sweep --run-id {folder.name}",
           "seeds": f"synthflaw run --run-id {folder.name} --seeds <its seeds, listed in {SEEDS_RECORD}>",
           "run": f"synthflaw run --run-id {folder.name} without --seeds"}[found]
    if mixed:
        raise ValueError(f"{folder} holds both a multi-seed run (seed-<k>/ or {SEEDS_RECORD}) and a single run's "
                         f"{STUDY} at its top; remove the single run's files ({STUDY} and the NN_stage folders at "
                         f"the top) to keep the multi-seed run, or pick another --run-id")
    raise ValueError(f"{folder} holds {KINDS[found]}, not {KINDS[kind]}: continue it with {how}, or pick another "
                     f"--run-id for {KINDS[kind]}")


STUDY_FIX = ("restore it, or run the study again into this run id (synthflaw run with its preset and --set), which "
             "writes it")


def read_run_json(path: str | Path, keys=(), fix: str = "") -> dict:
    """A JSON object of a run folder (study.json, a manifest) with `keys`; ValueError naming the file, what is wrong
    with it and `fix` when it cannot be read as one (a run folder's file may be cut, emptied or edited)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BrokenRunFile(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise BrokenRunFile(f"{path} is not a JSON object; {fix}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise BrokenRunFile(f"{path} lacks {', '.join(map(repr, missing))}; {fix}")
    return value


_HELD: dict[Path, int] = {}  # run folder -> the descriptor of its lock, for the folders this process holds


def lock_holder(run_dir: str | Path) -> str:
    """Who holds a run folder's lock, from the pid file its holder writes: "1234", or "1234, its notebook kernel
    5678" while a papermill run's kernel holds it too ('unknown' if none is written yet)."""
    try:
        lines = (Path(run_dir) / PID_NAME).read_text().split()
    except OSError:
        return "unknown"
    return ", its notebook kernel ".join(lines) or "unknown"


def held_lock_fds() -> list[int]:
    """The lock descriptors of every run folder this process holds: a process it starts to write into those folders
    (the papermill kernel) inherits them, so the lock lasts as long as any process of the run lives."""
    return sorted(_HELD.values())


def note_kernel(pid: int | None) -> None:
    """Add a kernel's pid to the pid file of every run folder this process holds, or take it out (None): the message
    a second process gets names it, since the kernel may outlive a killed runner, holding the lock, for the moment
    it takes to die."""
    for run_dir in _HELD:
        write_text_atomic(run_dir / PID_NAME, f"{os.getpid()}\n" + (f"{pid}\n" if pid else ""))


def end_with_parent() -> None:
    """Have this process killed the moment the process that started it ends, however it ends (Linux's
    PR_SET_PDEATHSIG; nothing elsewhere). The processes that write into a run (the notebook kernel, `accelerate
    launch` and its workers) call it, each for itself or through :func:`die_with_parent`, so that a ``kill -9`` of
    the runner leaves none of them writing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def die_with_parent():
    """A `preexec_fn` for Popen that makes the child end with this process (:func:`end_with_parent`, which exec
    keeps), or None where there is no such call. If this process died between the fork and the call, the child
    kills itself at once."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc, parent = ctypes.CDLL(None, use_errno=True), os.getpid()  # loaded here: the child only calls it

    def set_death_signal():
        libc.prctl(1, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return set_death_signal


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold the run folder for this process, or fail at once (RunLocked) naming the pid of the process that holds it.

    The lock is the operating system's (flock on ``<run>/.lock``): it belongs to the open file, so it ends when the
    last process holding that file ends, and a run that was killed leaves nothing to delete. The runner hands the
    file to the notebook kernel it starts (:func:`held_lock_fds`): a kernel that outlives a killed runner keeps the
    run locked until it is gone, and no second process can start writing beside it. Released explicitly on leaving
    (which releases it for the kernel too: it is one lock). The holder writes its pid to ``<run>/.lock.pid`` after
    acquiring, for the message. Re-entrant within a process (figures of a multi-seed run lock the run and then each
    seed).
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _HELD:
        yield run_dir
        return
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = lock_holder(run_dir)
        raise RunLocked(f"{run_dir} is in use by another synthflaw process (pid {pid}); two processes on one run "
                        f"would redo and overwrite each other's steps. Wait for it to finish, or stop it (kill "
                        f"{pid.split(',')[0]}) and run again: the lock is the operating system's, a stopped process "
                        "leaves nothing to clean up") from None
    _HELD[key] = fd
    try:
        write_text_atomic(run_dir / PID_NAME, f"{os.getpid()}\n")
        yield run_dir
    finally:
        del _HELD[key]
        (run_dir / PID_NAME).unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
