"""One step of a run (:class:`Step`): its folder, its configuration, its run and completion, and what it reads of
the steps before it. A step folder left by a killed run keeps its checkpoints, so training resumes from them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from synthflaw.config import StudyConfig
from synthflaw.registry import STAGES, Stage
from synthflaw.registry import stage as find_stage
from synthflaw.runs.folders import inside, write_json_atomic
from synthflaw.runs.provenance import code_state
from synthflaw.runs.markers import combined_digest, fingerprint, load_marker, product_digests, step_config

PACKAGES = ("synthflaw", "torch", "transformers", "tokenizers", "datasets", "accelerate", "papermill")


class StepRefusal:
    """What a refusal of steps says without its fix (`what`) and the step folders it names (`folders`): the message
    gives `synthflaw run`'s fix (--overwrite), and a command without that option (a sweep's point) gives its own."""

    def __init__(self, message: str, *, what: str | None = None, folders=()):
        super().__init__(message)
        self.what, self.folders = what or message, [str(f) for f in folders]


class StepConfigChanged(StepRefusal, RuntimeError):
    """A finished (or started) step was opened with a configuration that differs from the one it ran with."""


class StepStale(StepConfigChanged):
    """A finished step's products, or an upstream step it read, changed since it finished."""


class UpstreamMissing(FileNotFoundError):
    """A step needs a product of an upstream step that has not finished."""


class BrokenStepFile(StepRefusal, ValueError):
    """A step's config.json cannot be read, so neither can what the step ran with."""


class StepFolderRefused(ValueError):
    """A step folder that is a symbolic link or resolves outside its run folder: what a run reads, writes, deletes
    and exports of the step would be another folder's."""


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

    def check_folder(self) -> Path:
        """The step's folder, after checking that it (and its stage's folder, for a variant) is no symbolic link and
        resolves inside the run folder, as :func:`synthflaw.runs.run_folder` checks a run id; StepFolderRefused
        naming it and the fix otherwise. Whatever opens a step (its configuration, its marker) comes here first: a
        link would make a run trust, overwrite or delete another folder's files and an export leave the step out."""
        base = self.run_dir / self.stage.name
        for folder in (base, self.path) if self.variant else (base,):
            if folder.is_symlink():
                raise StepFolderRefused(
                    f"step folder {folder} is a symbolic link (to {os.readlink(folder)}); a step's files must lie in "
                    f"its run folder {self.run_dir}: remove the link (rm {folder}; what it points to is kept) and "
                    "run again, which runs the step there")
        if not inside(self.path, self.run_dir):  # a variant named with '..', or a link above the run's folders
            raise StepFolderRefused(
                f"step folder {self.path} resolves to {self.path.resolve()}, outside its run folder {self.run_dir}: "
                "remove the link that leads there and run again, which runs the step in the run folder")
        return self.path

    def marker(self) -> dict | None:
        """The step's valid done.json marker, or None."""
        return load_marker(self.check_folder())[0]

    @property
    def done(self) -> bool:
        return self.marker() is not None

    def marker_problem(self) -> str | None:
        """Why a done.json that exists is not a valid marker (None when there is none or it is valid)."""
        return load_marker(self.check_folder())[1]

    def saved_fingerprint(self) -> str | None:
        """The fingerprint in the step's config.json (None without one); BrokenStepFile naming the file and the fix
        when it cannot be read; StepFolderRefused for a folder that is a link (:meth:`check_folder`)."""
        saved = self.check_folder() / "config.json"
        if not saved.exists():
            return None
        try:
            value = json.loads(saved.read_text())["fingerprint"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise self._broken(f"{saved} cannot be read ({type(error).__name__}: {error}), so what step {self.name} "
                               "ran with is unknown") from None
        if not isinstance(value, str):
            raise self._broken(f"{saved} has no valid 'fingerprint'")
        return value

    def _broken(self, what: str) -> BrokenStepFile:
        return BrokenStepFile(f"{what}: delete the folder {self.path} to run the step again, or run with --overwrite "
                              "(overwrite=True), which deletes it", what=what, folders=[self.path])

    def status(self, cfg: StudyConfig) -> str:
        """'todo', 'done' (same config) or 'changed' (a different config ran or started here); BrokenStepFile for an
        unreadable config.json."""
        old = self.saved_fingerprint()
        if old is None:
            return "todo"
        if old != fingerprint(step_config(cfg, self.stage, self.variant)):
            return "changed"
        return "done" if self.done else "todo"

    def open(self, cfg: StudyConfig) -> "Step":
        """Prepare the folder for `cfg`. A folder that holds another configuration is refused (StepConfigChanged;
        BrokenStepFile for an unreadable config.json): whether to reset it is the lifecycle's decision
        (:func:`synthflaw.runs.decide`), made before."""
        self.cfg = cfg
        code_state()  # taken when the process opens its first step (a notebook's kernel too), then kept
        if self.status(cfg) == "changed":
            raise self.changed_error()
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.json").exists():
            sc = step_config(cfg, self.stage, self.variant)
            write_json_atomic(self.path / "config.json",
                              {"fingerprint": fingerprint(sc), "step": self.name, "study": cfg.to_dict()})
        self._started = time.time()
        return self

    def changed_message(self) -> str:
        return (f"{self.path} ran with a different configuration; use another run id, or overwrite=True "
                "(--overwrite) to delete it and run again")

    def changed_error(self) -> StepConfigChanged:
        return StepConfigChanged(self.changed_message(), what=f"{self.path} ran with a different configuration",
                                 folders=[self.path])

    def reset(self) -> None:
        """Delete the step's folder (products, checkpoints, marker): it runs from scratch when opened again. A folder
        that is a link is refused, not followed (:meth:`check_folder`)."""
        if self.check_folder().exists():
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
        marker, problem = load_marker(other.check_folder())
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


def environment() -> dict:
    """What a result needs to be traced: the code that ran (commit, clean or dirty and which files, the package's
    source digest: :func:`synthflaw.runs.provenance.code_state`), package versions, Python, device. No secrets, no
    environment dump."""
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
    return {**code_state(), "packages": versions, "python": platform.python_version(),
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
