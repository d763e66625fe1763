"""Run folders: ``runs/<run_id>/<NN_stage>[/<variant>]/`` with config.json, meta.json, result.json and done.json.

A step is done when ``done.json`` holds a valid marker; it is written last and atomically, so a killed step never
looks finished. Opening a done step with the same configuration skips it; with a different one it is refused unless
overwrite is asked for. A step folder left by a killed run keeps its checkpoints, so training resumes from them.

Provenance: ``done.json`` records a digest of the step's own products (:func:`product_digests`) and the digest of
every upstream step the stage read through :meth:`Step.upstream` (or :meth:`Step.read_step`, :meth:`Step.read`,
:meth:`Step.read_run`). A finished step is *stale* when its products no longer match their digest (edited, cut,
deleted) or an upstream's digest no longer matches what it read (the upstream ran again); :class:`Freshness` says
which steps are stale and why. The run id rules (:func:`run_folder`) and the lock on a run folder
(:func:`run_lock`) live here too: every command goes through them before it writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from synthflaw.config import StudyConfig, from_dict
from synthflaw.records import write_json, write_text_atomic
from synthflaw.registry import STAGES, Stage
from synthflaw.registry import stage as find_stage

PACKAGES = ("synthflaw", "torch", "transformers", "tokenizers", "datasets", "accelerate", "papermill")

RUN_ID_MAX_BYTES = 100  # of UTF-8; an export adds ".partial" to it, well within a name's 255
STUDY, SWEEP_MANIFEST = "study.json", "sweep.json"  # what makes a folder a run, a sweep
LOCK_NAME, PID_NAME = ".lock", ".lock.pid"  # in the run folder; dot-names: no stage, export or digest sees them

# What a step's product digest leaves out: the bookkeeping the runner writes around the products, the executed
# notebook and its PNGs (re-made by a re-execution, never read downstream), the accelerate log, and the folders a
# step keeps for itself while it runs (checkpoints to resume from, checkpoints rejected by unlearning, the seeded
# initialisation). Names starting with '.' are left out everywhere: the atomic writer's temporaries and the
# droppings of editors and JupyterLab (.ipynb_checkpoints/), none of them a product.
UNHASHED_FILES = frozenset({"done.json", "meta.json", "config.json", "launch.log"})
UNHASHED_DIRS = frozenset({"checkpoints", "rejected", "init"})
LARGE_FILE_BYTES = 64 * 2**20
DONE_KEYS = ("fingerprint", "finished", "digest", "products", "upstream")


class StepConfigChanged(RuntimeError):
    """A finished (or started) step was opened with a configuration that differs from the one it ran with."""


class StepStale(StepConfigChanged):
    """A finished step's products, or an upstream step it read, changed since it finished."""


class UpstreamMissing(FileNotFoundError):
    """A step needs a product of an upstream step that has not finished."""


class BrokenStepFile(ValueError):
    """A step's config.json cannot be read, so neither can what the step ran with."""


class BrokenRunFile(ValueError):
    """A run folder's record (study.json, a sweep's manifest) cannot be read; the message names it and the fix."""


class RunLocked(RuntimeError):
    """Another process holds the run folder."""


def write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj, sort_keys=True)


def step_config(cfg: StudyConfig, stage: str | Stage, variant: str | None) -> dict:
    """The part of the study configuration a step depends on, plus the seed and the variant. A key the step's model
    never reads (`registry.UNREAD_BY_BRANCH`) is taken at its library default, not left out, so that a run made at
    the default has the fingerprint it had before the key was known to be unread."""
    full, stage = cfg.to_dict(), find_stage(stage)
    unread = stage.unread_for(variant)
    defaults = StudyConfig().to_dict() if unread else {}
    for key in unread:
        section, name = key.split(".")
        full[section] = {**full[section], name: defaults[section][name]}
    return {"seed": cfg.seed, "variant": variant, **{s: full[s] for s in stage.sections_for(variant)}}


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Run ids, run folders, the lock
# --------------------------------------------------------------------------------------------------------------

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


def folder_kind(folder: str | Path) -> str | None:
    """What a folder under the runs root holds: "sweep" (a ``sweep.json``), "run" (a ``study.json``, or the
    ``seed-<k>/study.json`` of a multi-seed run), or None (neither, or no folder)."""
    folder = Path(folder)
    if (folder / SWEEP_MANIFEST).exists():
        return "sweep"
    if (folder / STUDY).exists() or any(folder.glob(f"seed-*/{STUDY}")):
        return "run"
    return None


def refuse_other_kind(folder: str | Path, kind: str) -> None:
    """ValueError when `folder` holds the other kind than `kind` ("run" or "sweep"): `synthflaw run` must not write
    a study into a sweep's folder, nor `synthflaw sweep` a manifest and points into a run's."""
    found = folder_kind(folder)
    if found is not None and found != kind:
        command = "sweep" if found == "sweep" else "run"
        raise ValueError(f"{folder} holds a {found}, not a {kind} (it has a "
                         f"{SWEEP_MANIFEST if found == 'sweep' else STUDY}): continue it with synthflaw {command} "
                         f"--run-id {Path(folder).name}, or pick another --run-id for the {kind}")


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


# --------------------------------------------------------------------------------------------------------------
# Digests of a step's products, and its done.json marker
# --------------------------------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    """sha256 of the file's content, read in 1 MiB chunks; for a file over 64 MiB its size and modification time.

    Why not hash large files: the check runs at every run start, and hashing the multi-GB weights of a GPU-scale
    study would cost minutes each time. Such files (model shards, large data sets) are replaced whole, never edited
    in place, and replacing a file changes its modification time. Copying a run with a tool that does not keep
    modification times (cp without -p) therefore makes its large files look changed.
    """
    stat = path.stat()
    if stat.st_size > LARGE_FILE_BYTES:
        return f"size:{stat.st_size}:mtime_ns:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def product_files(step_dir: str | Path) -> list[Path]:
    """The step's products: every file in its folder except what UNHASHED_* and the dot-names leave out, sorted."""
    step_dir = Path(step_dir)
    found = []
    for root, dirs, files in os.walk(step_dir):
        top = Path(root) == step_dir
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in UNHASHED_DIRS))
        for name in files:
            if name.startswith(".") or name.endswith(".png"):
                continue
            if top and (name in UNHASHED_FILES or (name.startswith("notebook") and name.endswith(".ipynb"))):
                continue
            found.append(Path(root, name).relative_to(step_dir))
    return sorted(found)


def product_digests(step_dir: str | Path) -> dict[str, str]:
    """{relative path: file digest} of the step's products."""
    step_dir = Path(step_dir)
    return {rel.as_posix(): file_digest(step_dir / rel) for rel in product_files(step_dir)}


def combined_digest(products: dict[str, str]) -> str:
    """One digest for a step's products: what a downstream step records of what it read."""
    return hashlib.sha256(json.dumps(products, sort_keys=True).encode()).hexdigest()


def describe_changes(step_dir: Path, recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """What differs between a step's recorded and current products, a deleted folder named as the folder."""
    def top(rel: str) -> str:
        return rel.split("/")[0] if "/" in rel else ""

    missing, added = sorted(set(recorded) - set(current)), sorted(set(current) - set(recorded))
    gone = sorted({top(rel) for rel in missing if top(rel) and not (step_dir / top(rel)).exists()})
    new = sorted({top(rel) for rel in added if top(rel) and not any(top(r) == top(rel) for r in recorded)})
    changes = [f"{folder}/ was deleted" for folder in gone]
    changes += [f"{rel} was deleted" for rel in missing if top(rel) not in gone]
    changes += [f"{rel} changed" for rel in sorted(recorded) if rel in current and current[rel] != recorded[rel]]
    changes += [f"{folder}/ was added" for folder in new]
    changes += [f"{rel} was added" for rel in added if top(rel) not in new]
    return changes


def load_marker(step_dir: str | Path) -> tuple[dict | None, str | None]:
    """(marker, None) for a valid done.json; (None, why) for a missing or unreadable one.

    Valid: JSON with every key of DONE_KEYS, a `digest` that is the digest of its `products` records, `upstream`
    records that name steps of the run (never a path), and the fingerprint of the step's config.json. Anything else
    (a disk filled up, a hand edit, a forged or copied marker) counts as not done: the step runs again rather than
    being trusted, and `why` names the file. Whether the products still match their records is
    :class:`Freshness`'s check (it hashes them).
    """
    path = Path(step_dir) / "done.json"
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path} is not valid JSON ({error})"
    if not isinstance(marker, dict) or any(k not in marker for k in DONE_KEYS):
        return None, f"{path} lacks the keys {', '.join(DONE_KEYS)}"
    products, upstream = marker["products"], marker["upstream"]
    if not (isinstance(products, dict) and all(isinstance(v, str) for v in products.values())
            and isinstance(upstream, dict) and all(v is None or isinstance(v, str) for v in upstream.values())):
        return None, f"{path} has malformed 'upstream' or 'products' records"
    if marker["digest"] != combined_digest(products):
        return None, f"{path}: its 'digest' is not the digest of its 'products' records (edited by hand?)"
    for name in upstream:
        if not is_step_name(name):
            return None, (f"{path}: its upstream record {name!r} is not a step of the run (<NN_stage>[/<variant>]); "
                          "the marker was edited")
    try:
        saved = json.loads((Path(step_dir) / "config.json").read_text()).get("fingerprint")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        saved = None
    if saved is None or saved != marker["fingerprint"]:
        return None, (f"{path} is not the marker of the configuration in {Path(step_dir) / 'config.json'} (missing, "
                      "unreadable or another fingerprint)")
    return marker, None


def is_step_name(name) -> bool:
    """Whether `name` names a step: ``NN_stage`` for a stage without variants, ``NN_stage/<variant>`` for one with."""
    if not isinstance(name, str):
        return False
    stage_name, _, variant = name.partition("/")
    found = next((s for s in STAGES if s.name == stage_name), None)
    if found is None or bool(variant) != bool(found.variants):
        return False
    try:
        return not variant or check_run_id(variant) == variant  # a variant is a plain folder name, as a run id
    except ValueError:
        return False


@dataclass
class Step:
    """One step of a run: a stage, optionally a variant (a branch, an unlearning method, a model)."""

    run_dir: Path
    stage: Stage
    variant: str | None = None
    cfg: StudyConfig | None = None
    _started: float = field(default=0.0, repr=False)
    _reads: dict = field(default_factory=dict, repr=False)  # {upstream step name: its digest} as read
    _reads_run: bool = field(default=False, repr=False)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.stage = find_stage(self.stage)

    @property
    def path(self) -> Path:
        base = self.run_dir / self.stage.name
        return base / self.variant if self.variant else base

    @property
    def name(self) -> str:
        return f"{self.stage.name}/{self.variant}" if self.variant else self.stage.name

    def marker(self) -> dict | None:
        """The step's valid done.json marker, or None."""
        return load_marker(self.path)[0]

    @property
    def done(self) -> bool:
        return self.marker() is not None

    def marker_problem(self) -> str | None:
        """Why a done.json that exists is not a valid marker (None when there is none or it is valid)."""
        return load_marker(self.path)[1]

    def saved_fingerprint(self) -> str | None:
        """The fingerprint in the step's config.json (None without one); BrokenStepFile naming the file and the fix
        when it cannot be read."""
        saved = self.path / "config.json"
        if not saved.exists():
            return None
        try:
            value = json.loads(saved.read_text())["fingerprint"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise BrokenStepFile(
                f"{saved} cannot be read ({type(error).__name__}: {error}), so what step {self.name} ran with is "
                f"unknown: delete the folder {self.path} to run the step again, or run with --overwrite "
                "(overwrite=True), which deletes it") from None
        if not isinstance(value, str):
            raise BrokenStepFile(f"{saved} has no valid 'fingerprint': delete the folder {self.path} to run the step "
                                 "again, or run with --overwrite (overwrite=True), which deletes it")
        return value

    def status(self, cfg: StudyConfig) -> str:
        """'todo', 'done' (same config) or 'changed' (a different config ran or started here); BrokenStepFile for an
        unreadable config.json."""
        old = self.saved_fingerprint()
        if old is None:
            return "todo"
        if old != fingerprint(step_config(cfg, self.stage, self.variant)):
            return "changed"
        return "done" if self.done else "todo"

    def open(self, cfg: StudyConfig, overwrite: bool = False) -> "Step":
        """Prepare the folder for `cfg`: refuse a changed config unless `overwrite`, which deletes the old step."""
        self.cfg = cfg
        try:
            state = self.status(cfg)
        except BrokenStepFile:
            if not overwrite:
                raise
            state = "changed"
        if state == "changed":
            if not overwrite:
                raise StepConfigChanged(
                    f"{self.path} ran with a different configuration; use another run id, or overwrite=True "
                    f"(--overwrite) to delete it and run again")
            self.reset()
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.json").exists():
            sc = step_config(cfg, self.stage, self.variant)
            write_json_atomic(self.path / "config.json",
                              {"fingerprint": fingerprint(sc), "step": self.name, "study": cfg.to_dict()})
        self._started = time.time()
        return self

    def reset(self) -> None:
        """Delete the step's folder (products, checkpoints, marker): it runs from scratch when opened again."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self._reads, self._reads_run = {}, False

    def run(self, fn) -> dict:
        """``fn(cfg, step) -> dict`` unless the step is done, in which case its saved result is returned."""
        if self.cfg is None:
            raise RuntimeError("open the step with step.open(cfg) before running it")
        if self.done:
            return self.result()
        self._reads, self._reads_run = {}, False  # this attempt records what it reads
        started = time.time()
        result = fn(self.cfg, self)
        result = {**result, "wall_s": round(time.time() - started, 2)}
        write_json_atomic(self.path / "result.json", result)
        return result

    def result(self) -> dict:
        path = self.path / "result.json"
        if not path.exists():
            raise UpstreamMissing(f"{self.path} has no result.json: run step {self.name} first")
        return json.loads(path.read_text())

    def complete(self) -> dict:
        """Write meta.json and then, last and atomically, done.json with the digests of the step's products and of
        the upstream steps it read."""
        marker = self.marker()
        if marker is not None:
            return marker
        if not (self.path / "result.json").exists():
            raise RuntimeError(f"step {self.name} has no result.json; run it before completing it")
        finished = time.time()
        meta = {**environment(), "step": self.name, "seed": self.cfg.seed if self.cfg else None,
                "started": self._started, "finished": finished,
                "wall_s": round(finished - self._started, 2) if self._started else None,
                "result_wall_s": self.result().get("wall_s")}
        if "precision" in self.result():  # a training step: fp32 or bf16, and for compute.precision=auto its timings
            meta["precision"] = self.result()["precision"]
        write_json_atomic(self.path / "meta.json", meta)
        products = product_digests(self.path)
        marker = {"fingerprint": self.saved_fingerprint(), "finished": finished,
                  "digest": combined_digest(products), "products": products,
                  "upstream": dict(sorted(self._reads.items()))}
        if self._reads_run:
            marker["reads_run"] = True
        write_json_atomic(self.path / "done.json", marker)
        return marker

    # What a stage reads of other steps. Each read records the upstream's digest, which done.json keeps: a later
    # change of that upstream makes this step stale.

    def upstream(self, stage: str | Stage, variant: str | None = None) -> Path:
        """The folder of a finished upstream step of the same run (named explicitly, never 'latest')."""
        other = Step(self.run_dir, stage, variant)
        marker, problem = load_marker(other.path)
        if marker is None:
            why = f"whose marker is broken ({problem})" if problem else f"which has not finished in {self.run_dir}"
            raise UpstreamMissing(f"step {self.name} needs {other.name}, {why}: run it first (synthflaw run runs "
                                  "every step in order)")
        self._reads[other.name] = marker.get("digest")
        return other.path

    def read_step(self, stage: str | Stage, variant: str | None = None) -> Path | None:
        """An upstream step the stage uses when it has finished (e.g. the `natural` model as a reference): its
        folder, recorded like :meth:`upstream`, or None."""
        try:
            return self.upstream(stage, variant)
        except UpstreamMissing:
            return None

    def read(self, relative: str | Path) -> Path:
        """A path inside an upstream step, given relative to the run folder as results record it (e.g. result.json's
        ``started_from``: ``04_continued_pretraining/natural/model``); recorded like :meth:`upstream`."""
        parts = Path(relative).parts
        try:
            stage = None if Path(relative).is_absolute() or not parts else find_stage(parts[0])
        except ValueError:
            stage = None
        if stage is None or (stage.variants and len(parts) < 2):
            raise ValueError(f"{relative!r} is not a path inside a step of the run (<NN_stage>[/<variant>]/...), "
                             f"relative to {self.run_dir}")
        variant = parts[1] if stage.variants else None
        return self.upstream(stage, variant).joinpath(*parts[2 if stage.variants else 1:])

    def read_run(self) -> list["Step"]:
        """Every finished step of the earlier stages (stage 08 reads them all), recorded; a step that finishes later
        makes this one stale."""
        steps = finished_steps(self.run_dir, before=self.stage)
        for other in steps:
            self._reads[other.name] = other.marker().get("digest")
        self._reads_run = True
        return steps


def step_named(run_dir: str | Path, name: str) -> Step:
    """The step ``NN_stage`` or ``NN_stage/variant`` of a run."""
    stage, _, variant = name.partition("/")
    return Step(Path(run_dir), stage, variant or None)


def finished_steps(run_dir: str | Path, before: Stage | None = None) -> list[Step]:
    """The run's finished steps (valid markers), in stage order, of the stages before `before` (all without)."""
    run_dir, found = Path(run_dir), []
    for s in STAGES:
        if before is not None and s.number >= find_stage(before).number:
            break
        root = run_dir / s.name
        candidates = ([Step(run_dir, s, p.name) for p in sorted(root.iterdir()) if p.is_dir()]
                      if s.variants and root.is_dir() else [] if s.variants else [Step(run_dir, s)])
        found += [step for step in candidates if step.done]
    return found


# --------------------------------------------------------------------------------------------------------------
# Staleness
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cause:
    """Why a finished step is stale. `kind`: "products" (its own files changed), "upstream changed" (an upstream ran
    again or changed), "upstream unfinished" (an upstream it read is no longer finished), "upstream stale" (an
    upstream it read is itself stale), "new steps" (a step that reads the whole run: steps finished after it)."""

    step: str
    kind: str
    upstream: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.step} is stale: {self.text}"


def upstream_causes(step: Step, marker: dict) -> list[Cause]:
    """The upstream records of a finished step checked against the upstreams' current markers (no hashing: cheap)."""
    causes = []
    for name, digest in marker.get("upstream", {}).items():
        other = step_named(step.run_dir, name)
        current, problem = load_marker(other.path)
        if current is None:
            causes.append(Cause(step.name, "upstream unfinished", name,
                                f"{name} was read but is no longer finished ({problem or 'no done.json'})"))
        elif current.get("digest") != digest:
            causes.append(Cause(step.name, "upstream changed", name, f"{name} ran again or changed since it was read"))
    if marker.get("reads_run"):
        new = [s.name for s in finished_steps(step.run_dir, before=step.stage) if s.name not in marker["upstream"]]
        if new:
            shown = ", ".join(new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
            causes.append(Cause(step.name, "new steps", None, f"{shown} finished after it ran"))
    return causes


class Freshness:
    """Whether a run's finished steps still hold what they finished with, and read what they read.

    Each step's products are hashed at most once per instance: make one at a run's start and ask about any step.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._own: dict[str, list[str]] = {}
        self._causes: dict[str, list[Cause]] = {}

    def product_changes(self, step: Step, marker: dict) -> list[str]:
        """What changed in the step's own products since it finished (nothing to check for a marker from before
        products were recorded)."""
        if step.name not in self._own:
            recorded = marker.get("products")
            self._own[step.name] = ([] if recorded is None
                                    else describe_changes(step.path, recorded, product_digests(step.path)))
        return self._own[step.name]

    def causes(self, name: str) -> list[Cause]:
        """Why the finished step `name` is stale (empty when it is not, or not finished): its own products, its
        upstream records, and the staleness of the upstreams it read."""
        if name in self._causes:
            return self._causes[name]
        self._causes[name] = []  # a cycle cannot occur (upstreams are earlier stages); this guards it anyway
        step = step_named(self.run_dir, name)
        marker = step.marker()
        if marker is None:
            return []
        causes = []
        changes = self.product_changes(step, marker)
        if changes:
            shown = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
            causes.append(Cause(name, "products", None, f"{shown} since it finished"))
        causes += upstream_causes(step, marker)
        flagged = {c.upstream for c in causes}
        for upstream in marker.get("upstream", {}):
            if upstream not in flagged and self.causes(upstream):
                causes.append(Cause(name, "upstream stale", upstream, f"it read {upstream}, which is stale"))
        self._causes[name] = causes
        return causes


def open_step(run_dir: str | Path, stage: str | Stage, variant: str | None, cfg: StudyConfig,
              overwrite: bool = False) -> Step:
    """The notebooks' entry point: the step's folder, prepared for `cfg`."""
    return Step(Path(run_dir), stage, variant or None).open(cfg, overwrite=overwrite)


def load_config(step_path: Path) -> StudyConfig:
    """The resolved study configuration a finished step ran with (downstream stages read it from disk)."""
    return from_dict(json.loads((Path(step_path) / "config.json").read_text())["study"])


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """What a result needs to be traced: commit, package versions, Python, device. No secrets, no environment dump."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        threads = None
    return {"git_commit": _git_commit(), "packages": versions, "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "cpu_count": os.cpu_count(), "torch_threads": threads}


def config_difference(step: Step, cfg: StudyConfig, limit: int = 3) -> str:
    """The settings a step's saved configuration and `cfg` disagree on, within the sections the step depends on,
    e.g. "sft.learning_rate: 0.0005 -> 0.001"."""
    try:
        saved = json.loads((step.path / "config.json").read_text())["study"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its config.json cannot be read"
    sections = step.stage.sections_for(step.variant)
    now = json.loads(json.dumps(cfg.to_dict(), default=str))  # tuples as lists, as the saved JSON has them
    old = _flatten({"seed": saved.get("seed"), **{s: saved.get(s, {}) for s in sections}})
    new = _flatten({"seed": now["seed"], **{s: now[s] for s in sections}})
    absent = object()
    unread = step.stage.unread_for(step.variant)
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent) and k not in unread]
    shown = [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys[:limit]]
    return "; ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "") or "the fingerprint"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix == "":
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat
