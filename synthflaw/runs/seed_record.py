"""The record of a multi-seed run's seeds: ``<run>/seeds.json``, written before its first seed runs, lists the seeds
the study was asked for (with its preset, overrides and whether it is the registered study). Every reader of the
cross-seed results checks against it: a listed seed that is missing or unfinished is named, never silently dropped,
and an aggregate over other seeds than the listed ones is refused.

A folder with this record (or with ``seed-<k>/`` runs) is a multi-seed run; a folder with ``study.json`` at its top
is a single run. The two layouts refuse each other (:func:`synthflaw.runs.folders.refuse_other_kind`).
"""

from __future__ import annotations

import json
from pathlib import Path

from synthflaw.runs.folders import SEEDS_RECORD, read_run_json, write_json_atomic

AGGREGATE = Path("seeds") / "aggregate.json"  # the cross-seed summary, which names the seeds it was made from
RECORD_FIX = ("restore it from the run's copy (an export keeps it), or run the study again into a new --run-id, "
              "which writes it")


class SeedsIncomplete(ValueError):
    """A multi-seed run's listed seeds have not all evaluated: no cross-seed result may be read or made yet."""


def read_seed_record(run_dir: str | Path) -> dict | None:
    """The run's seeds.json (its "seeds" as ints), or None where it has none (a single run, a legacy run)."""
    path = Path(run_dir) / SEEDS_RECORD
    if not path.exists():
        return None
    record = read_run_json(path, ("seeds",), RECORD_FIX)
    seeds = record["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: 'seeds' must be a non-empty list of distinct integers, found {seeds!r}; "
                         f"{RECORD_FIX}")
    return record


def record_seeds(run_dir: str | Path, seeds, batch=None, **about) -> dict:
    """Write the record of the seeds `run_dir`'s study is asked for (first time), or check that a run already
    holding one is asked for the same seeds: ValueError naming both and the fix otherwise. `batch`: the seeds this
    folder runs, when a study longer than one job runs its seeds in batches (a subset of `seeds`; the record keeps
    the union of the batches run here under "batch"; without, the folder is to hold every seed). `about`: what else
    describes the study (preset, overrides, registered), written the first time only."""
    seeds = [int(s) for s in seeds]
    batch = None if batch is None else [int(s) for s in batch]
    if batch is not None and (not batch or not set(batch) <= set(seeds) or len(set(batch)) != len(batch)):
        raise ValueError(f"the batch {' '.join(map(str, batch or []))} must be distinct seeds among the study's "
                         f"seeds {' '.join(map(str, seeds))}")
    existing = read_seed_record(run_dir)
    if existing is None:
        # a folder without a record may hold the seeds of an earlier study (an export made before records): a new
        # study's seeds beside them would be refused only at its end, when its findings are made
        held = set(listed_seeds(run_dir) or []) | {p.name.removeprefix("seed-") for p in Path(run_dir).glob("seed-*")
                                                    if p.is_dir()}
        others = sorted(held - {str(s) for s in seeds}, key=lambda s: (len(s), s))
        if others:
            raise ValueError(f"{run_dir} holds seeds {' '.join(others)} of another study, and no {SEEDS_RECORD}: "
                             "pick another --run-id (an exported reference is committed; git keeps it), or remove "
                             "that study")
        record = {"seeds": seeds, **({"batch": batch} if batch is not None else {}), **about}
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(run_dir) / SEEDS_RECORD, record)
        return record
    if existing["seeds"] != seeds:
        listed = " ".join(map(str, existing["seeds"]))
        raise ValueError(f"{run_dir} is the study of seeds {listed} ({SEEDS_RECORD}); this asks for seeds "
                         f"{' '.join(map(str, seeds))}. Continue it with the same seeds (--seeds {listed}), or pick "
                         "another --run-id for other seeds")
    if batch is not None and "batch" in existing and not set(batch) <= set(existing["batch"]):
        existing = {**existing, "batch": sorted(set(existing["batch"]) | set(batch), key=seeds.index)}
        write_json_atomic(Path(run_dir) / SEEDS_RECORD, existing)
    return existing


def study_of(record: dict) -> dict:
    """What makes a record's study (its seeds, preset, overrides, registered): the record without the batches a
    folder holds, which two folders of one study may differ in."""
    return {k: v for k, v in record.items() if k != "batch"}


def batch_seeds(record: dict | None) -> list[str] | None:
    """The seeds a folder holds (or is to hold) of its study, as labels: its batches' union, else every seed."""
    if record is None:
        return None
    return [str(s) for s in record.get("batch", record["seeds"])]


def listed_seeds(run_dir: str | Path) -> list[str] | None:
    """The seeds a multi-seed run is of, as labels ("0", "7"): its record's; for a run made before records existed,
    those its cross-seed aggregate was made from; None when neither exists."""
    record = read_seed_record(run_dir)
    if record is not None:
        return [str(s) for s in record["seeds"]]
    aggregate = Path(run_dir) / AGGREGATE
    if aggregate.exists():
        try:
            seeds = json.loads(aggregate.read_text())["seeds"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{aggregate} cannot be read, and it is the only record of the run's seeds; "
                             f"{RECORD_FIX}") from None
        return [str(s) for s in seeds]
    return None


def seeds_status(run_dir: str | Path, finished: list[str]) -> dict:
    """{"listed", "here", "finished", "missing", "missing_here", "extra"} of a multi-seed run, given the labels of
    its seeds that have evaluated (`finished`): "missing" are listed seeds not finished (their folder absent or
    unfinished), "missing_here" those of the seeds this folder is to hold (its batches; all without) and "extra"
    finished seeds the record does not list."""
    listed = listed_seeds(run_dir)
    if listed is None:
        return {"listed": None, "here": None, "finished": finished, "missing": [], "missing_here": [], "extra": []}
    here = batch_seeds(read_seed_record(run_dir)) or listed  # a run made before records: every listed seed here
    return {"listed": listed, "here": here, "finished": finished, "missing": [s for s in listed if s not in finished],
            "missing_here": [s for s in here if s not in finished], "extra": [s for s in finished if s not in listed]}


def require_every_seed(run_dir: str | Path, finished: list[str]) -> list[str]:
    """The listed seeds when each has evaluated and no other has; SeedsIncomplete (a ValueError) saying "k of K"
    and which are missing or extra otherwise. Cross-seed tables and findings are made only from a complete study: an
    interim verdict would need a rule of its own."""
    status = seeds_status(run_dir, finished)
    if status["listed"] is None:
        return finished
    problems = []
    if status["missing"]:
        absent = [s for s in status["missing"] if not (Path(run_dir) / f"seed-{s}").is_dir()]
        unfinished = [s for s in status["missing"] if s not in absent]
        if absent:
            problems.append(f"seed-{', seed-'.join(absent)} {'is' if len(absent) == 1 else 'are'} missing")
        if unfinished:
            problems.append(f"seed-{', seed-'.join(unfinished)} {'has' if len(unfinished) == 1 else 'have'} not "
                            "finished 07_evaluate")
    if status["extra"]:
        problems.append(f"seed-{', seed-'.join(status['extra'])} {'is' if len(status['extra']) == 1 else 'are'} "
                        "not among them")
    if problems:
        done = len([s for s in status["listed"] if s in finished])
        raise SeedsIncomplete(
            f"{run_dir} is the study of seeds {' '.join(status['listed'])}: {done} of {len(status['listed'])} have "
            f"evaluated, and {'; '.join(problems)}. Cross-seed results come only from every listed seed: run the "
            f"missing ones (synthflaw run --run-id {Path(run_dir).name} --seeds {' '.join(status['listed'])}, "
            "with --batch <some of them> for a study run in batches), add a batch exported elsewhere (synthflaw "
            "export --add), or restore them")
    return status["listed"]
