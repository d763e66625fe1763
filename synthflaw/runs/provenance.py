"""The code that ran: the git commit of the checkout the package was imported from, whether its tree was clean
(and which files were not), and a digest of the package's own source files. Every step's meta.json records it, so a
committed result names its code without trusting a clock or the checkout's HEAD at some later moment.

It is taken once per process, at the first call (:func:`code_state`): a commit made or a file edited while a long
run goes on does not change what that run's steps record, since the code they run is the code imported then. A
registered study (:func:`require_clean`) refuses to start from a tree that is dirty or has no git.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the imported synthflaw package
# What counts as the package's sources: code and the data it ships (the world's phrasebook, the notebooks' helpers);
# bytecode caches are derived and differ by interpreter.
_SKIPPED_PARTS = ("__pycache__",)
_SKIPPED_SUFFIXES = (".pyc", ".pyo")


class DirtyCheckout(RuntimeError):
    """A registered study was asked for from a tree whose code is not one clean commit."""


def source_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the package's files (relative path and bytes, in sorted order): the same for two imports of the
    same code, wherever they lie, and different after any edit, committed or not."""
    digest = hashlib.sha256()
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and not any(part in _SKIPPED_PARTS for part in
                                                                                p.parts)
                   and p.suffix not in _SKIPPED_SUFFIXES)
    for path in files:
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


# The checkout's folder of results: what runs write (and the committed exports), never code. A change there does
# not make the code dirty: regenerating a committed reference's figures edits it.
RESULTS = "runs/"


def git_state(where: Path = PACKAGE_DIR) -> dict:
    """The checkout `where` lies in: {"git_commit", "git_dirty", "dirty_files"}; all None outside a git checkout
    (an installed wheel) or without git. Dirty means a tracked file outside `RESULTS` differs from the commit or a
    file git does not ignore is untracked there: the code, notebooks and configuration, not the run folders."""
    commit = _git(["rev-parse", "HEAD"], where)
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "dirty_files": None}
    status = _git(["status", "--porcelain", "--untracked-files=all"], where)
    if status is None:
        return {"git_commit": commit.strip(), "git_dirty": None, "dirty_files": None}
    files = sorted(path for path in (line[3:] for line in status.splitlines() if line.strip())
                   if not path.strip('"').startswith(RESULTS))
    return {"git_commit": commit.strip(), "git_dirty": bool(files), "dirty_files": files}


@functools.cache
def code_state() -> dict:
    """This process's code, taken at the first call and kept: the git state of the package's checkout and the digest
    of the package's sources (:func:`source_digest`)."""
    return {**git_state(), "source_digest": source_digest()}


def require_clean(state: dict | None = None, what: str = "a registered study") -> dict:
    """`state` (default: this process's :func:`code_state`) when it is one clean commit; DirtyCheckout otherwise,
    saying what is wrong and how to fix it."""
    state = code_state() if state is None else state
    if state["git_commit"] is None:
        raise DirtyCheckout(
            f"{what} records the commit its code came from, and the synthflaw package imported from {PACKAGE_DIR} "
            "is not in a git checkout (or git is not installed): clone the repository, install it with "
            "`pip install -e .` from there, and run again")
    if state["git_dirty"] is None:
        raise DirtyCheckout(f"{what} needs to know that its checkout is clean, and `git status` failed in "
                            f"{PACKAGE_DIR}: check that git works there, and run again")
    if state["git_dirty"]:
        shown = ", ".join(state["dirty_files"][:5]) + (f" and {len(state['dirty_files']) - 5} more"
                                                       if len(state["dirty_files"]) > 5 else "")
        raise DirtyCheckout(
            f"{what} runs from one clean commit, and the checkout at {state['git_commit'][:12]} has changes: "
            f"{shown}. Commit them (or `git stash -u`), or run from a fresh clone of the commit you mean to run; "
            "nothing was written")
    return state
