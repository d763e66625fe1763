"""Export a finished run's small outputs for committing (``runs/reference/``): `synthflaw export`.

What is kept is what the figures, tables and findings are made from, plus a readable record of the run:
``study.json``, and per step ``config.json``, ``meta.json``, ``result.json``, ``done.json``, the metrics JSON and
every CSV, PNG and Markdown file (PNGs of a multi-seed run: the first seed's and the cross-seed ones); the executed
notebooks as HTML (``notebooks/<stage>.html``, of the first seed of a multi-seed run). Left out: weights and
checkpoints (never committed), the generated data sets and per-item samples (megabytes per seed, regenerated exactly
by re-running with the same seed) and the ``.ipynb`` copies (the HTML is their readable form). ``08_figures`` and the cross-seed tables regenerate from the export alone:
``synthflaw figures --run-id reference`` (tested against the committed tables).

An export is a run of its own: paths are written relative to it (the machine's absolute path of the run is
rewritten in every copied text file), and each step's ``done.json`` is sealed again over the files the export keeps,
so a later edit of an exported file makes its step stale, as in any run. A run with unfinished or stale steps is
refused unless asked for (``--allow-unfinished``); such an export lists what was unfinished or stale in
``unfinished.json`` and leaves those steps' markers as they were, so they read as stale in the export too.

A sweep (a folder with ``sweep.json``) is exported as a set of such runs: every point's runs by the rules above
(``points/<point>/``, without its notebooks), the manifest and the sweep's figures and trend tests (``figures/``,
without the executed notebook). ``synthflaw sweep --run-id <export> --figures-only`` redraws the figures and every
point's cross-seed tables from the export alone (tested against the committed ones).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from synthflaw.config import from_dict
from synthflaw.registry import study_steps
from synthflaw.reporting.aggregate import evaluated_seeds, seed_runs
from synthflaw.reporting.sweep_figures import FOLDER as FIGURES
from synthflaw.runs import (
    SEEDS_RECORD,
    STUDY_FIX,
    Freshness,
    Step,
    check_run_id,
    combined_digest,
    folder_kind,
    inside,
    load_marker,
    product_digests,
    read_seed_record,
    run_lock,
    seeds_status,
    study_of,
    write_json_atomic,
)
from synthflaw.sweep.definition import MANIFEST, read_manifest

KEEP_SUFFIXES = (".json", ".csv", ".png", ".md")
TEXT_SUFFIXES = (".json", ".csv", ".md", ".html")
SKIP_DIRS = {"model", "checkpoints", "data", "generation", "harness"}
REPO_ROOT = Path(__file__).resolve().parent.parent
UNFINISHED = "unfinished.json"  # at the top of an --allow-unfinished export: what was unfinished or stale
SKIP_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "trainer_state.json"}


def _kept(path: Path, root: Path, first_seed: str | None) -> bool:
    rel = path.relative_to(root)
    if any(part in SKIP_DIRS or part.startswith("checkpoint-") for part in rel.parts[:-1]):
        return False
    if rel.name.startswith("."):  # the lock and the atomic writer's temporaries
        return False
    if path.suffix == ".png" and first_seed and rel.parts[0].startswith("seed-") and rel.parts[0] != first_seed:
        return False  # other seeds' figures: regenerated from their CSVs by `synthflaw figures`
    return path.suffix in KEEP_SUFFIXES and path.name not in SKIP_NAMES


def check_target(out_dir: str | Path, runs_root: str | Path) -> Path:
    """`out_dir` if an export may go there: inside the runs folder (an export is a run) and not existing yet."""
    out_dir = Path(out_dir)
    if not inside(out_dir, runs_root):
        raise ValueError(f"--to {out_dir} resolves to {out_dir.resolve()}, outside the runs folder {runs_root}: "
                         f"export into it, e.g. --to {Path(runs_root) / 'reference'}")
    if out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists; remove it first (git keeps the committed version) or pick another")
    return out_dir


def _check_out_dir(source: Path, out_dir: Path, runs_root, what: str) -> None:
    """An export's folder: new, inside the runs folder when one is given, and not inside what it copies; and its
    staging folder ``<out_dir>.partial`` new too. An existing one is not deleted: `foo.partial` is a valid run id,
    and an export deletes nothing it did not make."""
    if runs_root is not None:
        check_target(out_dir, runs_root)
    elif out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it first (git keeps the committed version) or pick another")
    staging = _staging_dir(out_dir)
    if staging.exists() or staging.is_symlink():
        raise FileExistsError(f"{staging} exists: the export writes into it before renaming it to {out_dir}, and "
                              "does not delete what it did not make. If it is left by an interrupted export, remove "
                              "it yourself; else pick another --to")
    if out_dir.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"{out_dir} is inside the {what} {source} it would copy; export next to it instead")


def _staging_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


@contextlib.contextmanager
def _staging(out_dir: Path):
    """The export's staging folder, made here (never an existing one, which `_check_out_dir` refuses), renamed to
    `out_dir` when the export succeeds and removed when it fails (it is the export's own): an interrupted export
    leaves no half-written reference."""
    tmp = _staging_dir(out_dir)
    tmp.mkdir(parents=True)  # FileExistsError if one appeared since the check: it is not ours
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out_dir)


def unfinished_steps(run_dir: Path) -> list[str]:
    """What keeps a run (single- or multi-seed) from being finished: each step its configuration lists that has not
    finished, or is stale, as "<seed>/<step>: why"; for a multi-seed run also each seed its seeds.json lists that
    has not evaluated, and a cross-seed aggregate made from other seeds."""
    return [line for _, line in _problems(run_dir)]


def _problems(run_dir: Path) -> list[tuple[str, str]]:
    """(the step's folder relative to the run, why) for each of :func:`unfinished_steps`."""
    runs = ([run_dir] if (run_dir / "study.json").exists()
            else sorted(p.parent for p in run_dir.glob("seed-*/study.json")))
    problems = []
    for run in runs:
        label = "" if run == run_dir else f"{run.name}/"
        try:
            cfg = from_dict(json.loads((run / "study.json").read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append((run.name, f"{run / 'study.json'} cannot be read as a configuration "
                                       f"({type(error).__name__}: {error}): {STUDY_FIX}"))
            continue
        fresh = Freshness(run)
        for spec in study_steps(cfg):
            step = Step(run, spec.stage, spec.variant)
            if not step.done:
                problems.append((label + spec.name, f"{label}{spec.name}: {step.marker_problem() or 'not finished'}"))
            else:
                problems += [(label + spec.name, f"{label}{cause} (stale)") for cause in fresh.causes(spec.name)]
    return _seed_problems(run_dir) + problems


def _seed_problems(run_dir: Path) -> list[tuple[str, str]]:
    """A multi-seed run's listed seeds that have not evaluated (or seeds it does not list), and a cross-seed
    aggregate made from other seeds than the listed ones."""
    if folder_kind(run_dir) != "seeds":
        return []
    status = seeds_status(run_dir, evaluated_seeds(run_dir))
    # the seeds this folder is to hold: a batch's, where a study runs in batches (the others are added elsewhere)
    problems = [(f"seed-{s}", f"seed-{s}: listed in {SEEDS_RECORD}, "
                              f"{'not evaluated' if (run_dir / f'seed-{s}').is_dir() else 'missing'}")
                for s in status["missing_here"]]
    problems += [(f"seed-{s}", f"seed-{s}: not among the seeds {SEEDS_RECORD} lists") for s in status["extra"]]
    aggregate = run_dir / "seeds" / "aggregate.json"
    if status["listed"] is not None and aggregate.exists():
        try:
            made_from = [str(s) for s in json.loads(aggregate.read_text())["seeds"]]
        except (OSError, ValueError, KeyError, TypeError):
            made_from = None
        if made_from != status["listed"]:
            problems.append(("seeds", f"seeds/aggregate.json: made from seeds {made_from}, not the listed "
                                      f"{status['listed']} (stale): synthflaw figures --run-id {run_dir.name} makes "
                                      "it again"))
    return problems


def _write_unfinished(folder: Path, problems: list[tuple[str, str]]) -> None:
    """An export made with --allow-unfinished says so: UNFINISHED lists what was unfinished or stale, and those
    steps keep the markers they had (unsealed), so they read as stale in the export too."""
    if problems:
        write_json_atomic(folder / UNFINISHED, {"unfinished": [line for _, line in problems],
                                                "steps": sorted({name for name, _ in problems})})


def export_run(run_dir: str | Path, out_dir: str | Path, *, html: bool = True, runs_root: str | Path | None = None,
               allow_unfinished: bool = False, batch=None) -> list[Path]:
    """Copy the kept files of `run_dir` into `out_dir` (which must not exist; with `runs_root`, it must lie inside
    it) and export notebooks as HTML.

    Returns the written files. Refuses a run with unfinished or stale steps unless `allow_unfinished`. Writes into a
    temporary sibling and renames it at the end, so an interrupted export leaves no half-written reference.
    `batch`: of a multi-seed run, export only these seeds, as a batch of its study (the export's seeds.json says
    which; each must be finished; no findings across seeds): a study stopped before all its seeds ran is committed
    as a batch, and a later one is added with :func:`add_batch`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "study.json").exists() and not any(run_dir.glob("seed-*/study.json")):
        raise ValueError(f"{run_dir} is not a finished run (no study.json, no seed-*/study.json)")
    _check_out_dir(run_dir, out_dir, runs_root, "run")
    if batch is not None:
        record = read_seed_record(run_dir)
        if record is None or not set(batch) <= set(record["seeds"]):
            raise ValueError(f"--batch exports some seeds of a multi-seed study: {run_dir}'s {SEEDS_RECORD} lists "
                             f"{'none' if record is None else ' '.join(map(str, record['seeds']))}, not all of "
                             f"{' '.join(map(str, batch))}")
    with run_lock(run_dir):  # no step changes while it is copied
        problems = _batch_problems(run_dir, batch)
        if problems and not allow_unfinished:
            lines = [line for _, line in problems]
            shown = "\n  - ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
            raise ValueError(f"{run_dir} is not finished:\n  - {shown}\nFinish it (synthflaw run with the same run id; "
                             "--overwrite for stale steps), or export it as it is with --allow-unfinished")
        return _export(run_dir, out_dir, html, problems=problems, batch=batch)


def add_batch(run_dir: str | Path, out_dir: str | Path, *, runs_root: str | Path | None = None,
              batch=None) -> list[Path]:
    """Add a finished batch of a multi-seed study (`run_dir`: its seeds.json names the study's seeds and this
    batch's) to an existing export of the same study (`out_dir`, made by :func:`export_run` from an earlier batch,
    perhaps on another machine): each of the batch's seeds is exported by the same rules into ``seed-<k>/`` of the
    export, and the export's record takes the batch in. Refused, with nothing written, when the two are not the same
    study (seeds, preset, overrides, registered), when the batch is unfinished or stale, or when the export already
    holds one of its seeds. Once every seed of the study is there, ``synthflaw figures`` makes the findings.
    `batch`: add only these of the run's seeds (finished ones)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if runs_root is not None and not inside(out_dir, runs_root):
        raise ValueError(f"--to {out_dir} resolves to {out_dir.resolve()}, outside the runs folder {runs_root}")
    source = read_seed_record(run_dir)
    target = read_seed_record(out_dir) if out_dir.is_dir() else None
    if source is None:
        raise ValueError(f"{run_dir} is not a multi-seed run (no {SEEDS_RECORD}): only a batch of a multi-seed "
                         "study can be added to an export")
    if target is None:
        raise ValueError(f"{out_dir} is not an export of a multi-seed study (no {SEEDS_RECORD}): export the first "
                         f"batch with synthflaw export --run-id {run_dir.name} --to {out_dir} (without --add)")
    if study_of(source) != study_of(target):
        raise ValueError(f"{run_dir} and {out_dir} are not the same study: {SEEDS_RECORD} says {study_of(source)} "
                         f"in the first and {study_of(target)} in the second")
    with run_lock(run_dir), run_lock(out_dir):
        problems = _batch_problems(run_dir, batch)
        if problems:
            shown = "\n  - ".join(line for _, line in problems[:20])
            raise ValueError(f"{run_dir} is not finished:\n  - {shown}\nFinish the batch (synthflaw run with the "
                             "same run id and --batch) before adding it")
        adding = [s for s in evaluated_seeds(run_dir) if batch is None or s in {str(b) for b in batch}]
        present = [s for s in adding if (out_dir / f"seed-{s}").exists()]
        if present:
            raise FileExistsError(f"{out_dir} already holds seed-{', seed-'.join(present)}: a seed is added once; "
                                  "add a batch of other seeds")
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.add-"))
        try:
            _export_into(run_dir, out_dir, staging, html=False, outer=None, batch=[int(s) for s in adding])
            written = []
            for seed in adding:
                (staging / f"seed-{seed}").rename(out_dir / f"seed-{seed}")
                written += sorted(p for p in (out_dir / f"seed-{seed}").rglob("*") if p.is_file())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        held = set(target.get("batch", target["seeds"])) | {int(s) for s in adding}
        record = study_of(target)
        if held != set(target["seeds"]):  # still a part of the study: the record says which part
            record["batch"] = [s for s in target["seeds"] if s in held]
        write_json_atomic(out_dir / SEEDS_RECORD, record)
    return written + [out_dir / SEEDS_RECORD]


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def export_sweep(sweep_dir: str | Path, out_dir: str | Path, *, runs_root: str | Path | None = None,
                 allow_unfinished: bool = False) -> list[Path]:
    """Export a sweep: each point's runs as :func:`export_run` exports a run (no notebooks), its ``sweep.json`` and
    its ``figures/`` (CSV, PNG, Markdown), into `out_dir` (which must not exist). Paths that point into the sweep are
    written relative to it (into a point's run, relative to that run). Refuses a sweep with a missing, unfinished or
    stale point unless `allow_unfinished`; writes into a temporary sibling renamed at the end."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    if not is_sweep(sweep_dir):
        raise ValueError(f"{sweep_dir} is not a sweep (no {MANIFEST}); export a run with synthflaw export")
    _check_out_dir(sweep_dir, out_dir, runs_root, "sweep")
    manifest = read_manifest(sweep_dir)
    problems = []
    for point in manifest["points"]:
        check_run_id(point["name"])  # a manifest's point names become folders of the export
        point_dir = sweep_dir / point["run"]
        found = sorted(p.parent.name for p in point_dir.glob("seed-*/study.json"))
        problems += [f"{point['name']}/seed-{seed}: not started" for seed in manifest["seeds"]
                     if f"seed-{seed}" not in found]
        problems += [f"{point['name']}/{line}" for line in unfinished_steps(point_dir)] if found else []
    if problems and not allow_unfinished:
        shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                                                else "")
        raise ValueError(f"the sweep {sweep_dir} is not finished:\n  - {shown}\nFinish it (synthflaw sweep --run-id "
                         f"{sweep_dir.name}), or export it as it is with --allow-unfinished")
    with _staging(out_dir) as tmp:
        return _export_sweep(sweep_dir, out_dir, tmp, manifest)


def _export_sweep(sweep_dir: Path, out_dir: Path, tmp: Path, manifest: dict) -> list[Path]:
    written = []
    for point in manifest["points"]:
        point_dir = sweep_dir / point["run"]
        if not any(point_dir.glob("seed-*/study.json")):
            continue  # an unstarted point of an --allow-unfinished export
        (tmp / point["run"]).parent.mkdir(parents=True, exist_ok=True)
        with run_lock(point_dir):  # no step of the point changes while it is copied
            made = _export(point_dir, tmp / point["run"], html=False, outer=sweep_dir, problems=_problems(point_dir))
        written += [out_dir / point["run"] / p.relative_to(tmp / point["run"]) for p in made]
    shutil.copy2(sweep_dir / MANIFEST, tmp / MANIFEST)
    written.append(out_dir / MANIFEST)
    figures = sweep_dir / FIGURES
    for path in sorted(figures.iterdir()) if figures.is_dir() else []:
        if path.is_file() and path.suffix in KEEP_SUFFIXES and not path.name.startswith("."):
            (tmp / FIGURES).mkdir(exist_ok=True)
            shutil.copy2(path, tmp / FIGURES / path.name)
            written.append(out_dir / FIGURES / path.name)
    relative_paths(tmp, sweep_dir)  # the manifest's job logs; the points' files hold no such path any more
    machine_paths(tmp)
    return written


def _export(run_dir: Path, out_dir: Path, html: bool, outer: Path | None = None,
            problems: list[tuple[str, str]] = (), batch=None) -> list[Path]:
    with _staging(out_dir) as tmp:
        return _export_into(run_dir, out_dir, tmp, html, outer, problems, batch)


def _batch_problems(run_dir: Path, batch=None) -> list[tuple[str, str]]:
    """:func:`_problems` of the whole run, or (with `batch`) of the batch's seeds only: the study's other seeds are
    another batch's."""
    problems = _problems(run_dir)
    if batch is None:
        return problems
    mine = [(n, line) for n, line in problems if any(n == f"seed-{s}" or n.startswith(f"seed-{s}/") for s in batch)]
    return mine + [(f"seed-{s}", f"seed-{s}: not started") for s in batch if not (run_dir / f"seed-{s}").is_dir()]


def _in_batch(path: Path, root: Path, batch) -> bool:
    """Whether a file of a multi-seed run belongs to the exported `batch` (None: every file): its seeds' folders
    and the record; not the other seeds, nor the cross-seed results (made only from every seed)."""
    if batch is None:
        return True
    top = path.relative_to(root).parts[0]
    return top in {f"seed-{s}" for s in batch} or top == SEEDS_RECORD


def _export_into(run_dir: Path, out_dir: Path, tmp: Path, html: bool, outer: Path | None,
                 problems: list[tuple[str, str]] = (), batch=None) -> list[Path]:
    written = []
    # the first finished seed in numeric order (seed-2 before seed-10), as the cross-seed summary orders them
    seed_dirs = [] if (run_dir / "study.json").exists() else seed_runs(run_dir)
    if batch is not None:
        seed_dirs = [p for p in seed_dirs if p.name in {f"seed-{s}" for s in batch}]
    first_seed = seed_dirs[0].name if seed_dirs else None
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and _kept(p, run_dir, first_seed)
                       and _in_batch(p, run_dir, batch)):
        target = tmp / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        written.append(out_dir / path.relative_to(run_dir))
    if html:
        source = seed_dirs[0] if seed_dirs else run_dir
        notebooks = sorted(source.glob("*/notebook.ipynb"))
        if notebooks:
            staged = tmp / "notebooks"
            staged.mkdir(parents=True, exist_ok=True)
            for notebook in notebooks:  # named by stage, so that one nbconvert call converts them all
                shutil.copy2(notebook, staged / f"{notebook.parent.name}.ipynb")
            inputs = sorted(staged.glob("*.ipynb"))
            # the `basic` template: the cells and their outputs without the 280 kB of JupyterLab CSS per file
            subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--template", "basic",
                            *map(str, inputs)], check=True, capture_output=True)
            for staged_notebook in inputs:
                staged_notebook.unlink()
                written.append(out_dir / "notebooks" / f"{staged_notebook.stem}.html")
    relative_paths(tmp, run_dir)
    if outer is not None:  # a sweep's point: paths into other points of the sweep, relative to the sweep
        relative_paths(tmp, outer)
    machine_paths(tmp)
    if batch is not None:  # the export holds this batch of the study: its record says so (all of it: no batch)
        record = study_of(read_seed_record(tmp))
        if set(record["seeds"]) - set(batch):
            record["batch"] = [s for s in record["seeds"] if s in batch]
        write_json_atomic(tmp / SEEDS_RECORD, record)
    reseal(tmp, unsealed={name for name, _ in problems})
    _write_unfinished(tmp, problems)
    if problems:
        written.append(out_dir / UNFINISHED)
    return written


def machine_paths(folder: Path) -> None:
    """Rewrite what is left of the machine's absolute paths in every text file under `folder` (after
    :func:`relative_paths`): the Python environment's folder becomes ``{python}``, the repository's ``{repository}``
    and the home folder ``~``. A notebook's output can name any of them (a warning names its module's file), and an
    export is committed: it must say nothing about the machine that made it."""
    named = {sys.prefix: "{python}", sys.base_prefix: "{python}", str(REPO_ROOT): "{repository}",
             str(Path.home()): "~"}
    prefixes = {}
    for path, token in named.items():
        for form in (str(Path(path).absolute()), str(Path(path).resolve())):
            if form != "/":
                prefixes.setdefault(form, token)
    _rewrite(folder, prefixes)


def _rewrite(folder: Path, prefixes: dict[str, str]) -> None:
    """Replace each absolute path prefix by its token in every text file under `folder`, where the prefix is a whole
    path: followed by '/' or by a character no path name continues with. Longest first: the environment inside the
    repository is named as the environment."""
    ordered = sorted(prefixes, key=len, reverse=True)
    pattern = re.compile("|".join(f"({re.escape(p)})(?=/|(?![\\w.\\-]))" for p in ordered))
    _substitute(folder, pattern, lambda m: prefixes[m.group(0)])


def _substitute(folder: Path, pattern: re.Pattern, replace) -> None:
    """`pattern.sub(replace, ...)` in every UTF-8 text file (`TEXT_SUFFIXES`) under `folder`, rewriting only the
    files it changes."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = pattern.sub(replace, text)
        if new != text:
            path.write_text(new, encoding="utf-8")


def relative_paths(folder: Path, run_dir: Path) -> None:
    """Rewrite the run's absolute path in every text file under `folder` relative to the run: ``<run>/07_evaluate``
    becomes ``07_evaluate``, ``<run>`` alone ``.``. Results, aggregate.json and the notebooks record where the run
    lay on the machine that made it, which means nothing (and tells too much) in a committed export."""
    prefixes = sorted({str(run_dir.resolve()), str(run_dir.absolute())}, key=len, reverse=True)
    # the prefix, then '/' (a path inside the run) or a character no path name continues with (the run itself)
    pattern = re.compile("|".join(f"{re.escape(p)}(?:/|(?![\\w.\\-]))" for p in prefixes))
    _substitute(folder, pattern, lambda m: "" if m.group(0).endswith("/") else ".")


def reseal(folder: Path, unsealed=frozenset()) -> None:
    """Seal each exported step's done.json again over the files the export keeps: the products digest of what is
    there, and the upstream records moved to the upstreams' new digests where they matched the old ones (a record
    that did not match stays unmatched: a stale step stays stale). Markers without digests (older runs) are left,
    and so are the `unsealed` steps (relative folders; a whole seed's "seed-<k>"): an unfinished or stale step of
    an --allow-unfinished export keeps the marker it had, so it stays stale in the export."""
    markers = {}
    for done in folder.rglob("done.json"):
        marker, _ = load_marker(done.parent)
        name = done.parent.relative_to(folder).as_posix()
        if any(name == skip or name.startswith(skip + "/") for skip in unsealed):
            continue
        if marker is not None and "digest" in marker:
            markers[name] = (done.parent, marker)
    new_digest = {}
    for name, (step_dir, marker) in markers.items():
        products = product_digests(step_dir)
        new_digest[name] = (marker["digest"], combined_digest(products), products)
    for name, (step_dir, marker) in markers.items():
        old, digest, products = new_digest[name]
        prefix = name.split("/")[0] + "/" if name.startswith("seed-") else ""  # upstreams: the same seed's steps
        upstream = {}
        for up, recorded in marker.get("upstream", {}).items():
            before, after, _ = new_digest.get(prefix + up, (None, None, None))
            upstream[up] = after if recorded is not None and recorded == before else recorded
        write_json_atomic(step_dir / "done.json", {**marker, "digest": digest, "products": products,
                                                  "upstream": upstream, "exported_from": old})
