"""A sweep's definition: the grid and its points' names, the Sweep and its points' configurations, the trend test
stated before any point runs, and the manifest (``runs/<ID>/sweep.json``) that records them."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from synthflaw import config as config_mod
from synthflaw.config import ConfigError, StudyConfig
from synthflaw.registry import StepSpec, selected_steps
from synthflaw.runner import Study, resolve_study
from synthflaw.runs import (
    SWEEP_MANIFEST,
    check_run_id,
    fingerprint,
    read_run_json,
    refuse_other_kind,
    run_folder,
    step_config,
    write_json_atomic,
)

MANIFEST = SWEEP_MANIFEST
POINTS = "points"
DEFINITION_KEYS = ("preset", "overrides", "grid", "seeds", "trend_test")
# What of the trend test makes two sweeps differ: its wording and metric list are the manifest's, as stated then.
TREND_IDENTITY = ("treated", "control", "confidence")
# Keys whose values are themselves lists or JSON: their grid values are separated by ';' instead of ','.
LIST_SEPARATOR = ";"


class SweepRefused(ValueError):
    """A sweep id reused with another definition, or a sweep folder that cannot be read."""


class SweepFailed(RuntimeError):
    """A point of the sweep failed; the message names it, and the run's own error follows."""


# --------------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------------

def _default_value(key: str):
    """The library default of a dotted key (its type says how grid values are written)."""
    value = StudyConfig().to_dict()
    for part in key.split("."):
        value = value[part]
    return value


def _takes_lists(key: str) -> bool:
    return isinstance(_default_value(key), (tuple, list, dict))


def parse_grid(pairs: list[str]) -> dict[str, list]:
    """``["cpt.synthetic_fraction=0.1,0.3", "sft.epochs=1,2"]`` -> {key: [values]}, each value checked by
    :func:`synthflaw.config.coerce`; ConfigError naming the key at the first bad one. Keys whose values are lists
    (``cpt.branches``) or JSON (``unlearn.hyperparameters``) separate their values with ';'."""
    grid: dict[str, list] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"grid {pair!r} is not of the form key=v1,v2,... (e.g. --grid "
                              "cpt.synthetic_fraction=0.1,0.3)")
        key, text = (part.strip() for part in pair.split("=", 1))
        config_mod.require_utf8("--grid", key, text)
        if key not in config_mod.valid_keys():
            config_mod.coerce(key, None)  # raises the ConfigError that names the valid keys and the close ones
        grid_values(grid, key, [v for v in text.split(LIST_SEPARATOR if _takes_lists(key) else ",")])
    return grid


def grid_values(grid: dict, key: str, values: list) -> None:
    """Add `key` with `values` (strings from the command line, or values) to `grid`, checked."""
    if key == "seed":
        raise ConfigError("the seed is not a grid key: give the seeds with --seeds 0 1 2 (seeds=[...]); every point "
                          "runs every seed, paired by seed")
    if key == "preset":
        raise ConfigError("the preset is not a grid key: a sweep has one preset (--preset); sweep its parameters")
    if key in grid:
        raise ConfigError(f"grid key {key} is given twice; list all its values once: --grid {key}=v1,v2")
    values = [v.strip() if isinstance(v, str) else v for v in values]
    values = [config_mod.coerce(key, v) for v in values if not (isinstance(v, str) and not v)]
    if not values:
        raise ConfigError(f"grid key {key} has no values: --grid {key}=v1,v2")
    seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"grid key {key} repeats a value ({values}): each value once")
    grid[key] = values


def _plain(text: str) -> str:
    """`text` with what a folder name may not hold (path separators, control characters) replaced by '_'."""
    return "".join("_" if c in "/\\" or not c.isprintable() else c for c in text)


def point_names(values: list[dict]) -> list[str]:
    """One folder name per point: ``key=value,key2=value2`` (swept keys only); ``point-<i>`` for every point when
    those would be too long or collide."""
    from synthflaw.reporting.sweep_figures import value_text

    names = [_plain(",".join(f"{k}={value_text(v)}" for k, v in point.items())) for point in values]
    try:
        for name in names:
            check_run_id(name)
    except ValueError:
        names = []
    if len(set(names)) != len(values):
        names = [f"point-{i:03d}" for i in range(len(values))]
    return names


# --------------------------------------------------------------------------------------------------------------
# The sweep and its manifest
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One grid point: its folder name and the values of the swept keys."""

    name: str
    values: dict


@dataclass
class Sweep:
    """A sweep's definition and where it lives; every point's configuration derives from it."""

    root: Path
    preset: str
    overrides: dict
    grid: dict
    seeds: list[int]
    trend_test: dict
    points: list[Point] = field(default_factory=list)
    # other sweeps of the same runs folder whose finished steps this one may place (not part of its definition:
    # where a step comes from changes nothing in it)
    reuse_from: list[str] = field(default_factory=list)
    _sharing: dict = field(default_factory=dict, repr=False)
    _studies: dict = field(default_factory=dict, repr=False)

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise ValueError(f"{self.root}: no point {name!r}; points: {', '.join(p.name for p in self.points)}")

    def point_dir(self, point: Point | str) -> Path:
        return run_folder(self.root / POINTS, point if isinstance(point, str) else point.name)

    def run_dir(self, point: Point | str, seed: int) -> Path:
        return run_folder(self.point_dir(point), f"seed-{seed}")

    def command(self, only=None, engine: str = "papermill") -> str:
        """The command that continues this sweep as its manifest defines it (`synthflaw sweep` without --grid): what
        a message advises to run again."""
        stages = f" --stages {' '.join(map(str, only))}" if only else ""
        chosen = f" --engine {engine}" if engine != "papermill" else ""
        return f"synthflaw sweep --run-id {self.root.name} --runs-root {self.root.parent}{stages}{chosen}"

    def overrides_for(self, point: Point, seed: int) -> dict:
        return {**self.overrides, **point.values, "seed": seed}

    def study(self, point: Point, seed: int) -> Study:
        """The point's study with `seed`, resolved and checked once per sweep (every later use takes this one);
        ConfigError naming the point when its configuration is refused."""
        key = (point.name, seed)
        if key not in self._studies:
            try:
                self._studies[key] = resolve_study(self.preset, self.overrides_for(point, seed))
            except ConfigError as error:
                raise ConfigError(f"point {point.name}: {error}") from None
        return self._studies[key]

    def config(self, point: Point, seed: int) -> StudyConfig:
        return self.study(point, seed).cfg

    def check(self) -> "Sweep":
        """Every point with every seed resolved and checked (each once, then kept): ConfigError naming the point
        before any point runs, not while another one runs."""
        for seed in self.seeds:
            for point in self.points:
                self.study(point, seed)
        return self

    def definition(self) -> dict:
        """What makes two sweeps the same sweep (JSON-normal: tuples as lists)."""
        return _json_normal({k: getattr(self, k) for k in DEFINITION_KEYS})

    def sharing(self, seed: int, only=None) -> dict[tuple[str, str], list[str]]:
        """{(step name, fingerprint): the points (in grid order) that have that step}, for the steps of the stages
        `only` (all without) that two or more points of `seed` have."""
        key = (seed, tuple(only) if only else None)
        if key not in self._sharing:
            found: dict[tuple[str, str], list[str]] = {}
            for point in self.points:
                cfg = self.config(point, seed)
                for spec in selected_steps(cfg, only):
                    found.setdefault((spec.name, step_fingerprint(cfg, spec)), []).append(point.name)
            self._sharing[key] = {k: v for k, v in found.items() if len(v) > 1}
        return self._sharing[key]


def _json_normal(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def step_fingerprint(cfg: StudyConfig, spec: StepSpec) -> str:
    return fingerprint(step_config(cfg, spec.stage, spec.variant))


def trend_statement(grid: dict, treated: str = "synthetic", control: str = "natural",
                    confidence: float = 0.95) -> dict:
    """The trend test, stated in the manifest before any point runs: what is estimated, on which metrics and keys,
    and how it is read. The figures apply it as written here."""
    from synthflaw.reporting.preregistration import PRIMARY_ENDPOINTS
    from synthflaw.reporting.tables import HEADLINE

    numeric = [k for k, vs in grid.items() if all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in vs)]
    return {
        "treated": treated, "control": control, "confidence": confidence,
        "primary": list(PRIMARY_ENDPOINTS),
        "metrics": list(dict.fromkeys([*PRIMARY_ENDPOINTS, *HEADLINE.values()])),
        "keys": numeric,
        "not_tested": {k: "its values are not numbers: no slope" for k in grid if k not in numeric},
        "statistic": (f"for each metric and each numeric swept key, the other keys held at each of their values: per "
                      f"seed, the ordinary least-squares slope of metric({treated}) - metric({control}) against the "
                      f"key's value over the grid points; then the mean of the per-seed slopes and its "
                      f"{confidence:.0%} Student-t interval across seeds (paired by seed: both models of a seed share "
                      "its world, base model and SFT data). A seed needs two or more distinct key values with both "
                      "models measured."),
        "reading": ("the slope is positive (negative) when its interval lies above (below) 0; an interval holding 0 "
                    "shows no trend at this many seeds, which is not evidence of no trend. Primary endpoints are "
                    "read first; the other metrics are secondary."),
    }


def define_sweep(preset: str, sweep_id: str, grid: dict | list[str], seeds=None, overrides: dict | None = None, *,
                 runs_root: str | Path = "runs", treated: str = "synthetic", control: str = "natural",
                 reuse_from=None) -> Sweep:
    """Check everything and build the sweep, writing nothing: the id, the grid (a dict, or ``key=v1,v2`` strings),
    the overrides, the seeds, every point's configuration (ConfigError naming the key or the point) and the sweeps
    it may reuse steps from (`reuse_from`: ids of sweeps in `runs_root`)."""
    root = run_folder(runs_root, sweep_id)
    refuse_other_kind(root, "sweep")
    reuse_from = check_reuse_from(runs_root, sweep_id, reuse_from)
    if isinstance(grid, (list, tuple)):
        grid = parse_grid(list(grid))
    else:
        checked: dict = {}
        for key, values in grid.items():
            grid_values(checked, key, list(values))
        grid = checked
    if not grid:
        raise ConfigError("the grid is empty: give at least one --grid key=v1,v2")
    overrides = {k: config_mod.coerce(k, v) for k, v in (overrides or {}).items()}
    both = sorted(set(grid) & set(overrides))
    if both:
        raise ConfigError(f"{', '.join(both)} is both swept (--grid) and set (--set): keep one")
    if seeds is not None and "seed" in overrides:
        raise ConfigError("seed is given both as an override and as the seeds: give the seeds only (--seeds 3)")
    if seeds is None:
        base = config_mod.resolve(preset, overrides)
        seeds = list(config_mod.PRESET_SEEDS.get(preset, ())) if "seed" not in overrides else []
        seeds = seeds or [base.seed]
    overrides.pop("seed", None)
    seeds = [config_mod.coerce("seed", s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds}: give one or more seeds, each once (--seeds 0 1 2)")
    if treated == control:
        raise ConfigError(f"the trend test contrasts two models; treated and control are both {treated!r}: give "
                          "two models (--trend-treated synthetic --trend-control natural)")
    values = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    points = [Point(name, v) for name, v in zip(point_names(values), values)]
    sweep = Sweep(root, preset, overrides, grid, list(seeds), trend_statement(grid, treated, control), points,
                  reuse_from)
    return sweep.check()  # every point and seed resolved and checked before anything is written, once: kept


def check_reuse_from(runs_root: str | Path, sweep_id: str, ids) -> list[str]:
    """The sweeps a sweep may reuse steps from, each an existing sweep of the same runs folder other than itself."""
    found = []
    for other in ids or []:
        if other == sweep_id:
            raise ConfigError(f"--reuse-from {other}: a sweep reuses its own steps anyway; name another sweep")
        try:
            read_manifest(run_folder(runs_root, other))
        except ValueError as error:  # not a sweep, a broken manifest, a path: named as the --reuse-from it is
            raise SweepRefused(f"--reuse-from {other}: {error}; name a sweep of --runs-root {runs_root}, or leave "
                               "the --reuse-from out") from None
        found += [other] if other not in found else []
    return found


def _manifest_lock(root: Path):
    from filelock import FileLock

    return FileLock(str(root / ".manifest.lock"), timeout=120)


def read_manifest(root: Path) -> dict:
    """The sweep's manifest, checked for what the commands read of it (SweepRefused naming the file otherwise): a
    cut or edited manifest is refused before anything runs, is exported or is reported."""
    path = Path(root) / MANIFEST
    fix = ("undo the edit, or restore it (an exported sweep's copy, or a backup), or start the sweep under another "
           "--run-id")
    if not path.exists():
        raise SweepRefused(f"{root} is not a sweep (no {MANIFEST}); start one with synthflaw sweep --run-id "
                           f"{Path(root).name} --grid KEY=V1,V2")
    try:
        manifest = read_run_json(path, (*DEFINITION_KEYS, "points"), fix)
    except ValueError as error:
        raise SweepRefused(str(error)) from None
    problem = _manifest_problem(manifest) or _definition_problem(manifest)
    if problem:
        raise SweepRefused(f"{path} is not a valid sweep manifest ({problem}); {fix}")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the parts of a manifest the commands use (None when nothing is)."""
    types = {"preset": str, "overrides": dict, "grid": dict, "seeds": list, "trend_test": dict, "points": list}
    for key, kind in types.items():
        if not isinstance(manifest[key], kind):
            return f"'{key}' is not a JSON {'string' if kind is str else 'object' if kind is dict else 'list'}"
    if not manifest["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in manifest["seeds"]):
        return "'seeds' is not a list of integers"
    for point in manifest["points"]:
        if not isinstance(point, dict) or not isinstance(point.get("name"), str) \
                or not isinstance(point.get("values"), dict):
            return f"point {str(point)[:80]} lacks a 'name' or its 'values'"
        try:
            check_run_id(point["name"])  # a point's name becomes a folder, here and in an export
        except ValueError as error:
            return f"point {point['name'][:80]!r}: {error}"
        if point.get("run") != f"{POINTS}/{point['name']}":  # where its runs are: never a path of its own
            return f"point {point['name']!r} has 'run' {point.get('run')!r}, not {POINTS}/{point['name']}"
    reuse = manifest.get("reuse_from", [])
    if not isinstance(reuse, list) or not all(isinstance(r, str) for r in reuse):
        return "'reuse_from' is not a list of sweep ids"
    for other in reuse:
        try:
            check_run_id(other)  # a folder beside the sweep: never a path
        except ValueError as error:
            return f"'reuse_from': {error}"
    return None


def _definition_problem(manifest: dict) -> str | None:
    """What a new definition with the manifest's values would be refused for (None when nothing), checked as
    :func:`define_sweep` checks --preset, --set, --grid and --seeds, and every point against the grid: a hand-edited
    value is named by its point and key when the manifest is read, not when some other point runs."""
    preset = manifest["preset"]
    if preset not in config_mod.PRESETS:
        return f"'preset' {preset!r} is not a preset; presets: {', '.join(config_mod.PRESETS)}"
    grid, problem = _checked_grid(manifest["grid"])
    return (problem or _overrides_problem(manifest["overrides"], grid) or _seeds_problem(manifest["seeds"])
            or _points_problem(manifest["points"], grid))


def _checked_grid(stored: dict) -> tuple[dict, str | None]:
    """The manifest's grid with its values checked and coerced as --grid's are, and what is wrong with it."""
    grid: dict = {}
    try:
        for key, values in stored.items():
            if not isinstance(values, list):
                return grid, f"'grid': the values of {key} are not a JSON list"
            if key not in config_mod.valid_keys():
                config_mod.coerce(key, None)  # raises the ConfigError that names the valid keys and the close ones
            grid_values(grid, key, values)
    except ConfigError as error:
        return grid, f"'grid': {error}"
    return grid, None if grid else "'grid' is empty"


def _overrides_problem(overrides: dict, grid: dict) -> str | None:
    for key, value in overrides.items():
        try:
            config_mod.coerce(key, value)
        except ConfigError as error:
            return f"'overrides', key {key}: {error}"
    both = sorted((set(grid) | {"seed"}) & set(overrides))
    return f"'overrides' sets {', '.join(both)}, which the grid or the seeds give" if both else None


def _seeds_problem(seeds: list) -> str | None:
    try:
        for seed in seeds:
            config_mod.coerce("seed", seed)
    except ConfigError as error:
        return f"'seeds': {error}"
    return "'seeds' repeats a seed" if len(set(seeds)) != len(seeds) else None


def _points_problem(points: list[dict], grid: dict) -> str | None:
    """What is wrong with the manifest's points against its grid: each point's values are one combination of the
    grid's values (every combination once). Whether a point's configuration resolves is :meth:`Sweep.check`'s (a
    resolution costs what the manifest's every read should not)."""
    allowed = {key: [_json_normal(v) for v in values] for key, values in grid.items()}
    seen = []
    for point in points:
        name, values = point["name"], point["values"]
        if sorted(values) != sorted(grid):
            return (f"point {name!r}: its keys ({', '.join(sorted(values)) or 'none'}) are not the grid's "
                    f"({', '.join(sorted(grid))})")
        for key, value in values.items():
            try:
                coerced = config_mod.coerce(key, value)
            except ConfigError as error:
                return f"point {name!r}, key {key}: {error}"
            if _json_normal(coerced) not in allowed[key]:
                return f"point {name!r}, key {key}: {value!r} is not one of the grid's values {grid[key]}"
        seen.append(json.dumps(_json_normal(values), sort_keys=True))
    if len(set(seen)) != len(seen) or len({p["name"] for p in points}) != len(points):
        return "two points have the same values or the same name"
    combinations = 1
    for values in grid.values():
        combinations *= len(values)
    if len(points) != combinations:
        return f"{len(points)} points, but the grid makes {combinations} (one per combination of its values)"
    return None


def update_manifest(root: Path, change) -> dict:
    """Apply `change(manifest)` (in place) under the manifest's lock and write it atomically: jobs and points of one
    sweep record into it concurrently."""
    with _manifest_lock(Path(root)):
        manifest = read_manifest(root)
        change(manifest)
        write_json_atomic(Path(root) / MANIFEST, manifest)
    return manifest


def open_sweep(sweep: Sweep, log=print) -> Sweep:
    """Write the manifest of a new sweep (before any point runs: the trend test is stated first), or check that an
    existing one has the same definition; SweepRefused naming what differs otherwise. Every point's configuration
    is checked first (ConfigError naming the point), the manifest's as a new definition's."""
    sweep.check()
    sweep.root.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(sweep.root):
        path = sweep.root / MANIFEST
        if path.exists():
            manifest = read_manifest(sweep.root)
            old, new = _identity(manifest), _identity(sweep.definition())
            differ = [k for k in DEFINITION_KEYS if old.get(k) != new[k]]
            if differ:
                shown = "; ".join(f"{k}: {json.dumps(old.get(k), sort_keys=True)[:200]} -> "
                                  f"{json.dumps(new[k], sort_keys=True)[:200]}" for k in differ)
                raise SweepRefused(f"{sweep.root} holds a sweep with another definition ({shown}). A sweep's points "
                                   "are only comparable under one definition: use another --run-id, or leave out "
                                   "--grid, --preset, --seeds and --set to continue the existing one as its "
                                   f"{MANIFEST} defines it")
            if sweep.reuse_from:  # where steps may come from is not part of the definition: the latest holds
                write_json_atomic(path, {**manifest, "reuse_from": sweep.reuse_from})
            log(f"[sweep] {sweep.root}: continuing ({len(sweep.points)} points x {len(sweep.seeds)} seeds)")
            return sweep
        manifest = {**sweep.definition(),
                    "stated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "points": [{"name": p.name, "values": _json_normal(p.values),
                                "run": f"{POINTS}/{p.name}"} for p in sweep.points],
                    "planned_sharing": _planned_sharing(sweep), "reuse_from": sweep.reuse_from, "shared": {},
                    "jobs": {}}
        write_json_atomic(path, manifest)
    log(f"[sweep] {sweep.root}: {len(sweep.points)} points x {len(sweep.seeds)} seeds; manifest {path}")
    return sweep


def _identity(definition: dict) -> dict:
    """The parts of a definition two sweeps must share to be one (JSON-normal)."""
    found = _json_normal({k: definition.get(k) for k in DEFINITION_KEYS})
    found["trend_test"] = {k: (found["trend_test"] or {}).get(k) for k in TREND_IDENTITY}
    return found


def _planned_sharing(sweep: Sweep) -> dict:
    """{seed-<k>: {step: [points]}}: the steps computed once per seed and reused by the other points."""
    return {f"seed-{seed}": {f"{name}@{fp}": points for (name, fp), points in sweep.sharing(seed).items()}
            for seed in sweep.seeds}


def load_sweep(sweep_id: str, runs_root: str | Path = "runs") -> Sweep:
    """The sweep ``<runs_root>/<sweep_id>`` as its manifest defines it."""
    root = run_folder(runs_root, sweep_id)
    manifest = read_manifest(root)
    points = [Point(p["name"], p["values"]) for p in manifest["points"]]
    return Sweep(root, manifest["preset"], manifest["overrides"], manifest["grid"], manifest["seeds"],
                 manifest["trend_test"], points, list(manifest.get("reuse_from", [])))
