"""Run folders: ``runs/<run_id>/<NN_stage>[/<variant>]/`` with config.json, meta.json, result.json and done.json.

A step is done when ``done.json`` exists; it is written last and atomically, so a killed step never looks finished.
Opening a done step with the same configuration skips it; with a different one it is refused unless overwrite is
asked for. A step folder left by a killed run keeps its checkpoints, so training resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from synthflaw.config import StudyConfig, from_dict
from synthflaw.records import write_json
from synthflaw.registry import Stage, stage as find_stage

PACKAGES = ("synthflaw", "torch", "transformers", "tokenizers", "datasets", "accelerate", "papermill")


class StepConfigChanged(RuntimeError):
    """A finished (or started) step was opened with a configuration that differs from the one it ran with."""


class UpstreamMissing(FileNotFoundError):
    """A step needs a product of an upstream step that has not finished."""


def write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj, sort_keys=True)


def step_config(cfg: StudyConfig, stage: str | Stage, variant: str | None) -> dict:
    """The part of the study configuration a step depends on, plus the seed and the variant."""
    full = cfg.to_dict()
    return {"seed": cfg.seed, "variant": variant, **{s: full[s] for s in find_stage(stage).sections_for(variant)}}


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


@dataclass
class Step:
    """One step of a run: a stage, optionally a variant (a branch, an unlearning method, a model)."""

    run_dir: Path
    stage: Stage
    variant: str | None = None
    cfg: StudyConfig | None = None
    _started: float = field(default=0.0, repr=False)

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

    @property
    def done(self) -> bool:
        return (self.path / "done.json").exists()

    def status(self, cfg: StudyConfig) -> str:
        """'todo', 'done' (same config) or 'changed' (a different config ran or started here)."""
        saved = self.path / "config.json"
        if not saved.exists():
            return "todo"
        old = json.loads(saved.read_text())["fingerprint"]
        if old != fingerprint(step_config(cfg, self.stage, self.variant)):
            return "changed"
        return "done" if self.done else "todo"

    def open(self, cfg: StudyConfig, overwrite: bool = False) -> "Step":
        """Prepare the folder for `cfg`: refuse a changed config unless `overwrite`, which deletes the old step."""
        self.cfg = cfg
        state = self.status(cfg)
        if state == "changed":
            if not overwrite:
                raise StepConfigChanged(
                    f"{self.path} ran with a different configuration; use another run id, or overwrite=True "
                    f"(--overwrite) to delete it and run again")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.json").exists():
            sc = step_config(cfg, self.stage, self.variant)
            write_json_atomic(self.path / "config.json",
                              {"fingerprint": fingerprint(sc), "step": self.name, "study": cfg.to_dict()})
        self._started = time.time()
        return self

    def run(self, fn) -> dict:
        """``fn(cfg, step) -> dict`` unless the step is done, in which case its saved result is returned."""
        if self.cfg is None:
            raise RuntimeError("open the step with step.open(cfg) before running it")
        if self.done:
            return self.result()
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
        """Write meta.json and then, last and atomically, done.json."""
        if self.done:
            return json.loads((self.path / "done.json").read_text())
        if not (self.path / "result.json").exists():
            raise RuntimeError(f"step {self.name} has no result.json; run it before completing it")
        finished = time.time()
        meta = {**environment(), "step": self.name, "seed": self.cfg.seed if self.cfg else None,
                "started": self._started, "finished": finished,
                "wall_s": round(finished - self._started, 2) if self._started else None,
                "result_wall_s": self.result().get("wall_s")}
        write_json_atomic(self.path / "meta.json", meta)
        marker = {"fingerprint": json.loads((self.path / "config.json").read_text())["fingerprint"],
                  "finished": finished}
        write_json_atomic(self.path / "done.json", marker)
        return marker

    def upstream(self, stage: str | Stage, variant: str | None = None) -> Path:
        """The folder of a finished upstream step of the same run (named explicitly, never 'latest')."""
        other = Step(self.run_dir, stage, variant)
        if not other.done:
            raise UpstreamMissing(f"step {self.name} needs {other.name}, which has not finished in {self.run_dir}: "
                                  f"run it first (synthflaw run runs every step in order)")
        return other.path


def open_step(run_dir: str | Path, stage: str | Stage, variant: str | None, cfg: StudyConfig,
              overwrite: bool = False) -> Step:
    """The notebooks' entry point: the step's folder, prepared for `cfg`."""
    return Step(Path(run_dir), stage, variant or None).open(cfg, overwrite=overwrite)


def load_config(step_path: Path) -> StudyConfig:
    """The resolved study configuration a finished step ran with (downstream stages read it from disk)."""
    return from_dict(json.loads((Path(step_path) / "config.json").read_text())["study"])
