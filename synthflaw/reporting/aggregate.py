"""Across seeds: mean and confidence interval of every headline metric, paired differences, and the five findings.

`synthflaw run --seeds 0 1 2 --run-id ID` leaves one ordinary run per seed in ``runs/ID/seed-<k>/``. This module
reads only their finished JSON files (``07_evaluate/<model>/metrics.json``, ``05_unlearning/<method>/result.json``)
and writes, into one output folder:

- ``aggregate.json``: every per-seed value, the summaries and the paired differences (findings can be recomputed
  from it alone);
- ``tables/headline_ci.csv`` / ``tables/headline_ci.md`` / ``tables/per_seed.csv``, ``hsr_by_level_ci.csv``,
  ``findings_differences.csv``;
- ``findings.json`` / ``findings.md`` (:mod:`synthflaw.reporting.findings`); ``headline_ci.png``,
  ``findings_forest.png``, ``hsr_by_level_ci.png``, ``sft_curve_ci.png`` (drawn from the CSVs only) and
  ``README.md``, their index.

Differences are paired within seeds (:mod:`synthflaw.metrics.statistics` says why).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from synthflaw.config import from_dict
from synthflaw.metrics.statistics import mean_ci, paired_difference
from synthflaw.records import read_csv, write_csv, write_json, write_text_atomic
from synthflaw.registry import EVALUATE, UNLEARNING, model_order, models_of
from synthflaw.reporting import labels
from synthflaw.reporting.findings import findings
from synthflaw.reporting.findings_report import write_findings
from synthflaw.reporting.forest import write_forest
from synthflaw.reporting.index import run_index
from synthflaw.reporting.preregistration import MARGINS, REGISTERED_PRESET
from synthflaw.runs import STUDY_FIX, read_run_json, require_every_seed
from synthflaw.reporting.plots import (
    plot_headline_ci,
    plot_hsr_by_level_ci,
    plot_sft_curve_ci,
)
from synthflaw.reporting.tables import (
    HEADLINE,
    NULL_COLUMNS,
    NULL_PREFIX,
    dig,
    markdown_table,
)
from synthflaw.runs import load_marker

REFERENCES = ("natural", "synthetic")
LEVEL_PREFIX = "HSR_level_"
LEARNABLE_LEVEL_PREFIX = "learnable_HSR_level_"
STAT_COLUMNS = ("n", "mean", "std", "low", "high", "half_width", "single_seed")
_SEED_DIR = re.compile(r"^seed-(-?\d+)$")


# --------------------------------------------------------------------------------------------------------------
# Reading the seed runs
# --------------------------------------------------------------------------------------------------------------

def _done_models(run: Path) -> dict[str, Path]:
    root = run / EVALUATE.name
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if load_marker(p)[0] is not None and (p / "metrics.json").exists()}


def _expected_models(run: Path) -> list[str] | None:
    """The models the seed's study.json says it evaluates (the runner's own fan-out), or None without study.json."""
    study = run / "study.json"
    if not study.exists():
        return None
    return models_of(from_dict(read_run_json(study, ("config",), STUDY_FIX)["config"]))


def seed_runs(run_dir: str | Path) -> list[Path]:
    """The ``seed-<k>`` folders of a multi-seed run whose 07_evaluate steps have all finished, sorted by k.

    Finished means every model the seed's ``study.json`` lists has ``07_evaluate/<model>/done.json`` and
    ``metrics.json`` (without study.json: at least one model has). A seed still running or stopped half-way is left
    out, so every model is averaged over the same seeds.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; pass the folder of a `synthflaw run --seeds ...` run "
                                "(it holds seed-<k>/ sub-folders)")
    found = []
    for sub in run_dir.iterdir():
        match = _SEED_DIR.match(sub.name)
        if not match or not sub.is_dir():
            continue
        done, expected = _done_models(sub), _expected_models(sub)
        if done and (expected is None or all(m in done for m in expected)):
            found.append((int(match.group(1)), sub))
    return [path for _, path in sorted(found)]


def evaluated_seeds(run_dir: str | Path) -> list[str]:
    """The labels of the seeds of a multi-seed run whose evaluations have all finished (`seed_runs`), in order."""
    return [seed_label(p) for p in seed_runs(run_dir)]


def seed_label(run: Path, position: int = 0) -> str:
    """The seed of one seed's run, as a label: from its folder name ``seed-<k>``, else its study.json, else
    `position`."""
    match = _SEED_DIR.match(run.name)
    if match:
        return match.group(1)
    study = run / "study.json"
    if study.exists():
        return str(read_run_json(study, ("config",), STUDY_FIX)["config"]["seed"])
    return str(position)


def _metric_values(metrics: dict) -> dict[str, float]:
    """The headline metrics of one metrics.json (`HEADLINE` names) plus HSR per level of both tiers; missing/None
    skipped."""
    values = {column: float(dig(metrics, key)) for key, column in HEADLINE.items() if dig(metrics, key) is not None}
    for key, prefix in (("hsr_by_level", LEVEL_PREFIX), ("learnable_hsr_by_level", LEARNABLE_LEVEL_PREFIX)):
        for level, value in sorted((metrics.get(key) or {}).items(), key=lambda kv: int(kv[0])):
            if value is not None:
                values[f"{prefix}{int(level)}"] = float(value)
    return values


def _null_values(metrics: dict) -> dict[str, dict[str, float]]:
    """The nulls of one metrics.json as pseudo-models "null:<kind>" with the `NULL_COLUMNS` metrics."""
    return {NULL_PREFIX + kind: {column: float(v[key]) for key, column in NULL_COLUMNS.items()
                                 if v.get(key) is not None}
            for kind, v in (metrics.get("nulls") or {}).items()}


def _item_values(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """A model's per-item values (items.csv): (metric -> {"<set>/<item id>": value}, {item key: cluster} for the
    items whose row names a cluster (files written before clusters existed name none: each item its own)."""
    out: dict[str, dict[str, float]] = {}
    clusters: dict[str, str] = {}
    if (path / "items.csv").exists():
        for row in read_csv(path / "items.csv", required=("set", "id", "metric", "value")):
            key = f"{row['set']}/{row['id']}"
            out.setdefault(row["metric"], {})[key] = float(row["value"])
            if row.get("cluster"):
                clusters[key] = f"{row['set']}/{row['cluster']}"
    return out, clusters


def _unlearning_costs(run: Path) -> dict[str, float]:
    """Tokens the unlearning step processed (forget + replay) as a fraction of the CPT budget, per method."""
    costs = {}
    root = run / UNLEARNING.name
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        result = path / "result.json"
        if load_marker(path)[0] is not None and result.exists():
            r = json.loads(result.read_text())
            if r.get("cpt_tokens") and r.get("forget_tokens") is not None:
                costs[path.name] = (r["forget_tokens"] + (r.get("replay_tokens") or 0)) / r["cpt_tokens"]
    return costs


def _stats_row(stats: dict | None) -> dict:
    return {c: (stats or {}).get(c) for c in STAT_COLUMNS}


def _fmt(stats: dict | None, n_model: int) -> str:
    """`mean ± half-width` with decimals fitted to the size; `(n=k)` when the metric has fewer seeds than the model."""
    if stats is None:
        return ""
    size = abs(stats["mean"])
    digits = 1 if size >= 100 else 2 if size >= 10 else 3
    cell = f"{stats['mean']:.{digits}f}" if stats["single_seed"] else \
        f"{stats['mean']:.{digits}f} ± {stats['half_width']:.{digits}f}"
    return cell + (f" (n={stats['n']})" if stats["n"] != n_model else "")


def aggregate(run_dirs, out_dir, confidence: float = 0.95) -> dict:
    """Mean and CI over seeds per model and metric, and paired differences against `natural` and `synthetic`.

    run_dirs: one finished run folder per seed (see seed_runs); the seed of each is read from its folder name
    ``seed-<k>`` (else its study.json). Writes into out_dir: aggregate.json, tables/headline_ci.csv (long form:
    model, metric, n, mean, std, low, high, half_width, single_seed), tables/headline_ci.md (``mean ± half-width``),
    tables/per_seed.csv, hsr_by_level_ci.csv and findings_differences.csv. Returns the aggregate.json content.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ValueError("no seed runs to aggregate; run `synthflaw run --seeds 0 1 2 --run-id ID` and let 07 finish")
    per_seed: dict[str, dict[str, dict[str, float]]] = {}
    items: dict[str, dict[str, dict[str, dict]]] = {}  # metric -> seed -> model -> {item key: value}
    clusters: dict[str, dict[str, str]] = {}  # seed -> {item key: cluster}: the items are the seed's, not a model's
    curve_rows, costs, seeds = [], {}, []
    for position, run in enumerate(run_dirs):
        models = _done_models(run)
        if not models:
            raise ValueError(f"{run} has no finished {EVALUATE.name} step; aggregate only finished seeds (seed_runs)")
        seed = seed_label(run, position)
        if seed in seeds:
            raise ValueError(f"seed {seed} appears twice ({run}); pass each seed's run once")
        seeds.append(seed)
        for model, path in models.items():
            metrics = json.loads((path / "metrics.json").read_text())
            values = _metric_values(metrics)
            if model == next(iter(models)):  # the nulls are the same items for every model of a seed
                values_by_model = {model: values, **_null_values(metrics)}
            else:
                values_by_model = {model: values}
            for name, named in values_by_model.items():
                for metric, value in named.items():
                    per_seed.setdefault(name, {}).setdefault(metric, {})[seed] = value
            by_metric, item_clusters = _item_values(path)
            for metric, by_item in by_metric.items():
                items.setdefault(metric, {}).setdefault(seed, {})[model] = by_item
            clusters.setdefault(seed, {}).update(item_clusters)
            curve_rows += [{"seed": seed, "model": model, "point": k, **point}
                           for k, point in enumerate(metrics.get("sft_curve") or [])]
        for method, fraction in _unlearning_costs(run).items():
            costs.setdefault(method, {})[seed] = fraction

    nulls = sorted(m for m in per_seed if m.startswith(NULL_PREFIX))
    models = model_order(m for m in per_seed if m not in nulls) + nulls
    per_seed = {m: per_seed[m] for m in models}
    summary = {m: {metric: mean_ci(list(v.values()), confidence) for metric, v in per_seed[m].items()}
               for m in models}
    differences = {ref: {m: {metric: paired_difference(per_seed, m, ref, metric, confidence)
                             for metric in per_seed[m]}
                         for m in models if m != ref}
                   for ref in REFERENCES if ref in per_seed}
    aggregated = {"confidence": confidence, "seeds": seeds, "runs": [str(p) for p in run_dirs], "models": models,
                  "per_seed": per_seed, "summary": summary, "differences": differences,
                  "sft_curve": _curve_summary(curve_rows, confidence),
                  "unlearning_cost": {m: {"per_seed": v, **mean_ci(list(v.values()), confidence)}
                                      for m, v in costs.items()}}
    _write_tables(aggregated, Path(out_dir))
    # Per-item values stay in memory for the findings' item-level contrasts; on disk they are each model's
    # items.csv, which the export keeps.
    aggregated["items"] = items
    aggregated["clusters"] = clusters
    return aggregated


def _curve_summary(rows: list[dict], confidence: float) -> list[dict]:
    """Mean and CI over seeds of every SFT-curve measurement per model and curve point."""
    out = []
    for model in model_order(dict.fromkeys(r["model"] for r in rows)):
        for point in sorted({r["point"] for r in rows if r["model"] == model}):
            mine = [r for r in rows if r["model"] == model and r["point"] == point]
            fraction = float(np.mean([r["fraction"] for r in mine]))
            for metric in ("learnable_hard_satisfaction_rate", "compliance_margin", "compliance_margin_null",
                           "template_pull"):
                found = [r[metric] for r in mine if r.get(metric) is not None]
                if found:
                    out.append({"model": model, "point": point, "fraction": round(fraction, 4), "metric": metric,
                                **_stats_row(mean_ci(found, confidence))})
    return out


def _write_tables(agg: dict, out: Path) -> None:
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    write_json(out / "aggregate.json", agg)
    headline = list(HEADLINE.values())
    rows, md_rows, level_rows, seed_rows, diff_rows = [], [], [], [], []
    for model in agg["models"]:
        mine = agg["summary"][model]
        n_model = len({s for v in agg["per_seed"][model].values() for s in v})
        rows += [{"model": model, "metric": metric, **_stats_row(mine[metric])} for metric in headline
                 if metric in mine]
        md_rows.append({"model": model, "n": str(n_model), **{c: _fmt(mine.get(c), n_model) for c in headline}})
        for tier, prefix in (("suite", LEVEL_PREFIX), ("learnable", LEARNABLE_LEVEL_PREFIX)):
            levels = sorted((int(k[len(prefix):]), k) for k in mine if k.startswith(prefix))
            level_rows += [{"model": model, "tier": tier, "level": level, **_stats_row(mine[key])}
                           for level, key in levels]
        seed_rows += [{"model": model, "seed": s, "metric": metric, "value": v}
                      for metric, by_seed in agg["per_seed"][model].items() for s, v in by_seed.items()]
    for ref, by_model in agg["differences"].items():
        for model, by_metric in by_model.items():
            diff_rows += [{"model": model, "reference": ref, "metric": metric, **_stats_row(stats)}
                          for metric, stats in by_metric.items() if stats is not None]
    write_csv(tables / "headline_ci.csv", rows)
    write_csv(tables / "per_seed.csv", seed_rows)
    note = (f"\nmean ± half-width of the {agg['confidence']:.0%} Student-t interval over seeds "
            f"({', '.join(agg['seeds'])}); n = seeds per model.\n")
    write_text_atomic(tables / "headline_ci.md", markdown_table(md_rows) + "\n" + note + "\n" + labels.legend(headline))
    for name, table in (("hsr_by_level_ci.csv", level_rows), ("findings_differences.csv", diff_rows),
                        ("sft_curve_ci.csv", agg["sft_curve"])):
        if table:
            write_csv(out / name, table)
        elif (out / name).exists():
            (out / name).unlink()  # left by an earlier aggregation with more data; it would be stale


# --------------------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------------------

def summarize(run_dir, out_dir=None, confidence: float = 0.95, unlearning_method: str = "lower_bounded",
              dpi: int = 120) -> dict:
    """Aggregate the finished seeds of a multi-seed run, test the findings and draw the figures.

    out_dir defaults to ``<run_dir>/seeds``. Returns {"seeds", "figures", "findings"}.
    """
    run_dir = Path(run_dir)
    runs = seed_runs(run_dir)
    if not runs:
        raise ValueError(f"{run_dir} has no seed-<k>/ folder whose {EVALUATE.name} steps have all finished; run "
                         f"`synthflaw run --seeds 0 1 2 --run-id {run_dir.name}` first")
    require_every_seed(run_dir, [seed_label(r) for r in runs])  # the seeds its seeds.json lists, each evaluated
    out = Path(out_dir) if out_dir is not None else run_dir / "seeds"
    agg = aggregate(runs, out, confidence)
    study = runs[0] / "study.json"
    preset = read_run_json(study, ("preset",), STUDY_FIX)["preset"] if study.exists() else None
    found = findings(agg, unlearning_method, MARGINS if preset == REGISTERED_PRESET else None)
    write_findings(found, out, confidence, agg["seeds"])
    made = [plot_headline_ci(out / "tables" / "headline_ci.csv", out / "headline_ci.png", dpi)]
    forest = write_forest(found, out, dpi)
    if forest:
        made.append(forest)
    if (out / "hsr_by_level_ci.csv").exists():
        made.append(plot_hsr_by_level_ci(out / "hsr_by_level_ci.csv", out / "hsr_by_level_ci.png", dpi))
    if (out / "sft_curve_ci.csv").exists():
        made.append(plot_sft_curve_ci(out / "sft_curve_ci.csv", out / "sft_curve_ci.png", dpi))
    run_index(out, made, f"Figures across seeds ({', '.join(agg['seeds'])})",
              "The findings and their rules: findings.md. Each seed's own figures: `seed-<k>/08_figures/`, with "
              "an index of their own.")
    return {"seeds": agg["seeds"], "figures": made,
            "findings": {f["id"]: f["reproduces"] for f in found}}
