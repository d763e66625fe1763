"""Run folders: ``runs/<run_id>/<NN_stage>[/<variant>]/`` with config.json, meta.json, result.json and done.json.

A step is done when ``done.json`` holds a valid marker; it is written last and atomically, so a killed step never
looks finished. Opening a done step with the same configuration skips it; with a different one it is refused unless
overwrite is asked for. A step folder left by a killed run keeps its checkpoints, so training resumes from them.

Provenance: ``done.json`` records a digest of the step's own products (:func:`product_digests`) and the digest of
every upstream step the stage read through :meth:`Step.upstream` (or :meth:`Step.read_step`, :meth:`Step.read`,
:meth:`Step.read_run`). A finished step is *stale* when its products no longer match their digest (edited, cut,
deleted) or an upstream's digest no longer matches what it read (the upstream ran again); :class:`Freshness` says
which steps are stale and why.

The rooms: :mod:`~synthflaw.runs.folders` (run ids, run and sweep folders, the lock), :mod:`~synthflaw.runs.markers`
(a step's configuration and fingerprint, the digests of its products, its done.json), :mod:`~synthflaw.runs.step`
(:class:`Step`, what it reads, its provenance), :mod:`~synthflaw.runs.staleness` (:class:`Freshness`) and
:mod:`~synthflaw.runs.lifecycle` (the one decision to skip, run, resume, reset or refuse a step). Their
names are imported here: callers say ``from synthflaw.runs import Step``.
"""

from __future__ import annotations

from synthflaw.runs.folders import (
    BrokenRunFile,
    LOCK_NAME,
    PID_NAME,
    KINDS,
    RUN_ID_MAX_BYTES,
    RunLocked,
    SEEDS_RECORD,
    STUDY,
    STUDY_FIX,
    SWEEP_MANIFEST,
    check_run_id,
    die_with_parent,
    end_with_parent,
    folder_kind,
    held_lock_fds,
    inside,
    lock_holder,
    note_kernel,
    read_run_json,
    refuse_other_kind,
    run_folder,
    run_lock,
    write_json_atomic,
)
from synthflaw.runs.markers import (
    DONE_KEYS,
    LARGE_FILE_BYTES,
    UNHASHED_DIRS,
    UNHASHED_FILES,
    combined_digest,
    describe_changes,
    file_digest,
    fingerprint,
    is_step_name,
    load_marker,
    product_digests,
    product_files,
    step_config,
)
from synthflaw.runs.step import (
    BrokenStepFile,
    PACKAGES,
    Step,
    StepConfigChanged,
    StepFolderRefused,
    StepStale,
    UpstreamMissing,
    config_difference,
    environment,
    finished_steps,
    step_named,
)
from synthflaw.runs.seed_record import (
    SeedsIncomplete,
    batch_seeds,
    listed_seeds,
    read_seed_record,
    record_seeds,
    require_every_seed,
    seeds_status,
    study_of,
)
from synthflaw.runs.staleness import (
    Cause,
    Freshness,
    upstream_causes,
)
from synthflaw.runs.lifecycle import Decision, decide

__all__ = [
    "KINDS",
    "SEEDS_RECORD",
    "SeedsIncomplete",
    "batch_seeds",
    "listed_seeds",
    "read_seed_record",
    "record_seeds",
    "require_every_seed",
    "seeds_status",
    "study_of",
    "Decision",
    "decide",
    "BrokenRunFile",
    "BrokenStepFile",
    "Cause",
    "DONE_KEYS",
    "Freshness",
    "LARGE_FILE_BYTES",
    "LOCK_NAME",
    "PACKAGES",
    "PID_NAME",
    "RUN_ID_MAX_BYTES",
    "RunLocked",
    "STUDY",
    "STUDY_FIX",
    "SWEEP_MANIFEST",
    "Step",
    "StepConfigChanged",
    "StepFolderRefused",
    "StepStale",
    "UNHASHED_DIRS",
    "UNHASHED_FILES",
    "UpstreamMissing",
    "check_run_id",
    "combined_digest",
    "config_difference",
    "describe_changes",
    "die_with_parent",
    "end_with_parent",
    "environment",
    "file_digest",
    "fingerprint",
    "finished_steps",
    "folder_kind",
    "held_lock_fds",
    "inside",
    "is_step_name",
    "load_marker",
    "lock_holder",
    "note_kernel",
    "product_digests",
    "product_files",
    "read_run_json",
    "refuse_other_kind",
    "run_folder",
    "run_lock",
    "step_config",
    "step_named",
    "upstream_causes",
    "write_json_atomic",
]
