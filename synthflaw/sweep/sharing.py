"""Steps shared by content between the points of one seed (and taken from the finished points of other sweeps):
claims, donors and placing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from synthflaw.config import StudyConfig
from synthflaw.registry import StepSpec, selected_steps
from synthflaw.runs import UNHASHED_DIRS, Freshness, Step, finished_steps, step_named, write_json_atomic
from synthflaw.sweep.definition import Point, Sweep, read_manifest, step_fingerprint, update_manifest

CLAIMS = ".claims"
STAGING = ".placing"  # inside a seed's run folder: a step being placed is assembled here, then renamed into place
CLAIM_WAIT_S = -1  # claims wait for as long as the holder computes (an SFT can take hours)


@contextlib.contextmanager
def claims(root: Path, seed: int, keys: list[tuple[str, str]]):
    """Hold the claim of each (step, fingerprint) of `seed`, taken in one global order (no two processes can wait
    for each other); each is an OS file lock, released however the process ends."""
    from filelock import FileLock

    folder = Path(root) / CLAIMS / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for name, fp in sorted(set(keys)):
            lock = FileLock(str(folder / f"{name.replace('/', '__')}@{fp}.lock"), timeout=CLAIM_WAIT_S)
            stack.enter_context(lock)
        yield


def _fresh(run_dir: Path, name: str) -> bool:
    return not Freshness(run_dir).causes(name)


def find_donor(spec: StepSpec, fp: str, candidates: list[tuple[str, Path]], here: Path):
    """(label, step, marker) of a finished, current step with this fingerprint in one of the `candidates` (label,
    run folder), whose upstreams are placed in `here` with the digests it read; None when there is none. An
    exported step is never a donor: its digests were sealed again over files without the weights."""
    for label, run_dir in candidates:
        donor = Step(run_dir, spec.stage, spec.variant)
        if donor.run_dir == here:
            continue
        marker = donor.marker()
        if (marker is None or marker.get("fingerprint") != fp or "exported_from" in marker
                or not _fresh(donor.run_dir, spec.name)):
            continue
        upstream_ok = all((step_named(here, up).marker() or {}).get("digest") == digest
                          for up, digest in marker.get("upstream", {}).items())
        if marker.get("reads_run"):  # stage 08 reads every earlier step: this point must have the same ones
            upstream_ok = upstream_ok and ({s.name for s in finished_steps(here, before=spec.stage)}
                                           == set(marker.get("upstream", {})))
        if upstream_ok:
            return label, donor, marker
    return None


def _files_to_place(step_dir: Path) -> list[Path]:
    """The donor's files a reusing point gets: its products and figures, not its bookkeeping (written fresh), its
    notebook (a record of the donor's execution) or the folders it kept for resuming (checkpoints, init)."""
    found = []
    for top, dirs, files in os.walk(step_dir):
        at_top = Path(top) == step_dir
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (at_top and d in UNHASHED_DIRS))
        for name in sorted(files):
            if name.startswith(".") or (at_top and (name in ("done.json", "config.json", "meta.json")
                                                    or (name.startswith("notebook") and name.endswith(".ipynb")))):
                continue
            found.append(Path(top, name))
    return found


def place_step(donor: Step, marker: dict, target: Step, cfg: StudyConfig, source: str) -> dict:
    """Give `target` the donor step's files (hard links; copies where links fail), its own config.json (same
    fingerprint), meta.json saying where it came from, and the donor's done.json. Assembled beside the run and
    renamed into place, so a kill leaves no half-placed step."""
    staging = target.run_dir / STAGING / target.name.replace("/", "__")
    if staging.exists():
        shutil.rmtree(staging)
    linked = copied = size = 0
    for src in _files_to_place(donor.path):
        dst = staging / src.relative_to(donor.path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        size += src.stat().st_size
        try:
            os.link(src, dst)
            linked += 1
        except OSError:  # another file system, or one without hard links
            shutil.copy2(src, dst)  # keeps the modification time a large file's digest records
            copied += 1
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(staging / "config.json", {"fingerprint": marker["fingerprint"], "step": target.name,
                                                "study": cfg.to_dict()})
    meta_path = donor.path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    write_json_atomic(staging / "meta.json", {**meta, "reused_from": source})
    write_json_atomic(staging / "done.json", marker)
    if target.path.exists():  # an unfinished attempt of this step: the donor's finished one replaces it
        shutil.rmtree(target.path)
    target.path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target.path)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # the staging folder, when no other placement is under way
    return {"how": "copy" if copied and not linked else "hardlink" if not copied else "hardlink+copy",
            "files": linked + copied, "bytes": size}


def record_shared(root: Path, point: str, seed: int, step: str, record: dict) -> None:
    def change(manifest):
        manifest.setdefault("shared", {}).setdefault(point, {}).setdefault(f"seed-{seed}", {})[step] = record
    update_manifest(root, change)


def _place_from(sweep: Sweep, point: Point, seed: int, cfg, spec: StepSpec, fp: str, candidates, log) -> bool | None:
    """Place one step of this point and seed from the first donor among `candidates` ((label, run folder) pairs):
    True when placed, False when no donor has it, None when the step needs no placing (done, or it ran with another
    configuration, which the runner refuses, naming the fix)."""
    run_dir = sweep.run_dir(point, seed)
    step = Step(run_dir, spec.stage, spec.variant)
    saved = step.saved_fingerprint()
    if step.done or (saved is not None and saved != fp):
        return None
    found = find_donor(spec, fp, candidates, run_dir)
    if found is None:
        return False
    source, donor, marker = found
    placed = place_step(donor, marker, step, cfg, os.path.relpath(donor.path, sweep.root))
    record_shared(sweep.root, point.name, seed, spec.name, {"fingerprint": fp, "from": source, **placed})
    log(f"[sweep] {point.name} seed-{seed}: {spec.name} reused from {source} ({placed['how']}, "
        f"{placed['files']} files)")
    return True


def place_shared(sweep: Sweep, point: Point, seed: int, cfg, group, sharing, log) -> list:
    """Place every step of `group` (one stage's shared steps, their claims held) that another point has finished;
    returns those this point must compute."""
    return [(spec, fp) for spec, fp in group
            if _place_from(sweep, point, seed, cfg, spec, fp,
                           [(name, sweep.run_dir(name, seed)) for name in sharing[(spec.name, fp)]], log) is False]


def place_from_other_sweeps(sweep: Sweep, point: Point, seed: int, cfg, only, log) -> None:
    """Place, stage by stage, every step of this point and seed that a point of a `reuse_from` sweep finished with
    the same fingerprint and the same upstreams (the other sweep's files are only read: no claim is needed)."""
    if not sweep.reuse_from:
        return
    candidates = [(f"{other}:{p['name']}", sweep.root.parent / other / p["run"] / f"seed-{seed}")
                  for other in sweep.reuse_from for p in read_manifest(sweep.root.parent / other)["points"]]
    for spec in selected_steps(cfg, only):
        _place_from(sweep, point, seed, cfg, spec, step_fingerprint(cfg, spec), candidates, log)
