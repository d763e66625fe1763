"""A sweep's figures and trend tests, from its files only: each point's ``seed-<k>/07_evaluate/<model>/metrics.json``
and the manifest (``sweep.json``: the grid, the seeds and the trend test as stated before the sweep ran).

Writes into ``<sweep>/figures/``:

- ``values.csv``: every headline value per point, seed and model (what everything else is computed from);
- ``<metric>__<key>.png`` beside ``<metric>__<key>.csv``: the metric against the swept key, one line per model at
  the mean over seeds with its Student-t interval, and beside it the trend test's contrast (treated - control,
  paired within seeds) with its interval (a row of panels per combination of the other keys' values), for the
  primary endpoints first, then every other headline metric that was measured;
- ``trend_tests.csv`` / ``trend_tests.md``: the trend test of the manifest (per seed, the OLS slope of the treated
  model's metric minus the control's over the key's values; the mean slope with its t interval across seeds);
- ``README.md``: the index of the figures (what each shows, the finding it speaks to, its CSV).

The same files give the same CSV and Markdown, byte for byte: rows follow the grid's order and the study's model
order, and nothing reads the clock.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import numpy as np

from synthflaw.metrics.statistics import mean_ci, seed_key
from synthflaw.records import read_csv, write_csv, write_text_atomic
from synthflaw.registry import EVALUATE, model_order
from synthflaw.reporting import labels
from synthflaw.reporting.index import sweep_row, write_index
from synthflaw.reporting.plots import colors, new_figure, save_figure
from synthflaw.reporting.tables import headline_values, markdown_table, num
from synthflaw.runs import load_marker

FOLDER = "figures"
SUMMARY_COLUMNS = ("key", "value", "x", "slice", "model", "n", "mean", "std", "low", "high", "half_width", "seeds")
TREND_COLUMNS = ("metric", "primary", "key", "slice", "treated", "control", "n_seeds", "slope", "low", "high",
                 "half_width", "per_seed", "verdict")


def value_text(value) -> str:
    """A grid value as the tables show it (lists joined by '+', floats as Python writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return repr(value) if isinstance(value, float) else str(value)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def collect(root: Path, manifest: dict) -> dict[tuple[str, str, str, str], float]:
    """{(point, seed, model, metric): value} of every finished evaluation of the sweep (a model whose 07 step has
    no valid done.json is left out, as the cross-seed aggregate leaves it out)."""
    found = {}
    for point in manifest["points"]:
        for seed in manifest["seeds"]:
            evaluate = root / point["run"] / f"seed-{seed}" / EVALUATE.name
            for path in sorted(evaluate.iterdir()) if evaluate.is_dir() else []:
                if load_marker(path)[0] is None or not (path / "metrics.json").exists():
                    continue
                for metric, value in headline_values(json.loads((path / "metrics.json").read_text())).items():
                    if num(value) is not None:
                        found[(point["name"], str(seed), path.name, metric)] = float(value)
    return found


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def slices(grid: dict, key: str) -> list[dict]:
    """Each combination of the other keys' values, in grid order ([{}] for a one-key grid)."""
    others = [k for k in grid if k != key]
    return [dict(zip(others, combo)) for combo in itertools.product(*(grid[k] for k in others))]


def _slice_label(values: dict) -> str:
    return ",".join(f"{k}={value_text(v)}" for k, v in values.items())


def _point_at(manifest: dict, values: dict) -> str | None:
    for point in manifest["points"]:
        if all(_same(point["values"].get(k), v) for k, v in values.items()):
            return point["name"]
    return None


def summary_rows(data: dict, manifest: dict, metric: str, key: str, models: list[str]) -> list[dict]:
    """Mean and t interval over seeds of `metric`, per slice, model and value of `key`; then the same of the trend
    test's contrast, treated - control paired within each seed (model "<treated> - <control>")."""
    grid, seeds = manifest["grid"], [str(s) for s in manifest["seeds"]]
    test = manifest["trend_test"]
    confidence = test["confidence"]
    numeric = _numeric(grid[key])
    contrast = f"{test['treated']} - {test['control']}"
    rows = []
    for fixed in slices(grid, key):
        for model in [*models, contrast]:
            for position, x in enumerate(grid[key]):
                point = _point_at(manifest, {**fixed, key: x})
                have, values = _per_seed(data, point, seeds, metric, model, contrast, test)
                if not have:
                    continue
                stats = mean_ci(values, confidence)
                rows.append({"key": key, "value": value_text(x), "x": x if numeric else position,
                             "slice": _slice_label(fixed), "model": model, "n": stats["n"], "mean": stats["mean"],
                             "std": stats["std"], "low": stats["low"], "high": stats["high"],
                             "half_width": stats["half_width"], "seeds": ";".join(have)})
    return rows


def _per_seed(data: dict, point: str, seeds: list[str], metric: str, model: str, contrast: str, test: dict):
    """(seeds, values) of one model at one point, or of the contrast: treated - control within each seed that
    measured both."""
    if model != contrast:
        have = [s for s in seeds if (point, s, model, metric) in data]
        return have, [data[(point, s, model, metric)] for s in have]
    treated, control = test["treated"], test["control"]
    have = [s for s in seeds if (point, s, treated, metric) in data and (point, s, control, metric) in data]
    return have, [data[(point, s, treated, metric)] - data[(point, s, control, metric)] for s in have]


def ols_slope(xs, ys) -> float:
    """The least-squares slope of ys on xs: sum((x - mean x)(y - mean y)) / sum((x - mean x)^2)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def _verdict(stats: dict | None) -> str:
    if stats is None:
        return "no seed has two key values with both models measured"
    if stats["single_seed"]:
        return "one seed: no interval"
    if stats["low"] > 0:
        return "slope > 0"
    if stats["high"] < 0:
        return "slope < 0"
    return "interval holds 0: no trend shown"


def trend_rows(data: dict, manifest: dict) -> list[dict]:
    """The manifest's trend test on every metric it names that was measured for both models, primary first."""
    test, grid = manifest["trend_test"], manifest["grid"]
    treated, control = test["treated"], test["control"]
    seeds = sorted({s for (_, s, _, _) in data}, key=seed_key)
    measured = {m for (_, _, model, m) in data if model == treated} & {m for (_, _, model, m) in data
                                                                       if model == control}
    metrics = [m for m in test["metrics"] if m in measured]
    rows = []
    for metric in metrics:
        base = {"metric": metric, "primary": "yes" if metric in test["primary"] else "no", "treated": treated,
                "control": control}
        for key in grid:
            if key not in test["keys"]:
                rows.append({**base, "key": key, "slice": "", "n_seeds": 0,
                             "verdict": "not tested: " + test["not_tested"].get(key, "not a numeric key")})
                continue
            for fixed in slices(grid, key):
                per_seed = {}
                for seed in seeds:
                    pairs = []
                    for x in grid[key]:
                        point = _point_at(manifest, {**fixed, key: x})
                        a, b = data.get((point, seed, treated, metric)), data.get((point, seed, control, metric))
                        if a is not None and b is not None:
                            pairs.append((float(x), a - b))
                    if len({x for x, _ in pairs}) >= 2:
                        per_seed[seed] = ols_slope(*zip(*pairs))
                stats = mean_ci(list(per_seed.values()), test["confidence"]) if per_seed else None
                rows.append({**base, "key": key, "slice": _slice_label(fixed), "n_seeds": len(per_seed),
                             "slope": None if stats is None else stats["mean"],
                             "low": None if stats is None else stats["low"],
                             "high": None if stats is None else stats["high"],
                             "half_width": None if stats is None else stats["half_width"],
                             "per_seed": ";".join(f"{s}:{v!r}" for s, v in per_seed.items()),
                             "verdict": _verdict(stats)})
    return rows


def plot_metric_against_key(csv_path, png_path, metric: str, key: str, dpi: int = 120) -> str:
    """Per slice, two panels drawn from the CSV only: each model's mean over seeds against the key's value with its
    interval, and beside it the contrast (treated - control, paired within seeds) with its interval. The paper's
    value of the key is marked; a control that does not change with the key (natural has no SynthQA whatever its
    share) is one point at its own x (`labels.Key.control_x`), not a line across every value."""
    rows = read_csv(csv_path, required=SUMMARY_COLUMNS)
    panels = list(dict.fromkeys(r["slice"] for r in rows))
    contrast = next((m for m in dict.fromkeys(r["model"] for r in rows) if " - " in m), None)
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if m != contrast]
    palette = colors(models)
    label, swept = labels.metric(metric), labels.key(key)
    numeric = all(num(r["value"]) is not None for r in rows)
    fig, axes = new_figure((10.5, 3.9 * len(panels) + 0.9), rows=len(panels), cols=2)
    for (left, right), panel in zip(axes, panels):
        mine = [r for r in rows if r["slice"] == panel]
        for model in models:
            _draw_model(left, [r for r in mine if r["model"] == model], model, palette[model],
                        swept.control_x if numeric and contrast and contrast.endswith(f" - {model}") else None)
        _errorbars(right, [r for r in mine if r["model"] == contrast], "black", contrast)
        right.axhline(0, color="0.3", lw=0.8)
        for ax in (left, right):
            if not numeric:
                ticks = list(dict.fromkeys((num(r["x"]), r["value"]) for r in mine))
                ax.set_xticks([t for t, _ in ticks], [v for _, v in ticks], rotation=20)
            elif swept.paper is not None:
                ax.axvline(swept.paper, color="tab:purple", ls=":", lw=1.2, label=swept.paper_words, zorder=0)
            ax.set_xlabel(swept.axis(), fontsize=8)
        left.set_ylabel(f"{label.unit}\n({label.better})", fontsize=8)
        left.set_title(f"each model, mean and 95% interval over seeds{_slice_words(panel)}", fontsize=8)
        right.set_ylabel(f"difference, {label.unit}", fontsize=8)
        right.set_title(f"{contrast}, paired within seeds (0 = no difference)", fontsize=8)
        left.legend(fontsize=7)
        right.legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"{label.words}, against the {swept.words}", 100), fontsize=10)
    return save_figure(fig, png_path, dpi)


def _draw_model(ax, mine: list[dict], model: str, colour, control_x) -> None:
    """A model's curve; a control whose value is the same at every point, as one point at `control_x`."""
    if not mine:
        return
    if control_x is not None and len({r["mean"] for r in mine}) == 1:
        mine = [{**mine[0], "x": control_x}]
        model = f"{model} (the same model at every value)"
    _errorbars(ax, mine, colour, model)


def _errorbars(ax, mine: list[dict], colour, name: str) -> None:
    if not mine:
        return
    xs, means = [num(r["x"]) for r in mine], [num(r["mean"]) for r in mine]
    lows = [m - num(r["low"]) if num(r["low"]) is not None else 0.0 for m, r in zip(means, mine)]
    highs = [num(r["high"]) - m if num(r["high"]) is not None else 0.0 for m, r in zip(means, mine)]
    ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, color=colour, label=name)


def _slice_words(panel: str) -> str:
    """A slice ("key=value,...") with each key in words; empty for a one-key grid."""
    if not panel:
        return ""
    parts = [part.split("=", 1) for part in panel.split(",")]
    return "\nat " + ", ".join(f"{labels.key(k).words} = {v}" for k, v in parts)


def _trend_markdown(rows: list[dict], manifest: dict) -> str:
    test = manifest["trend_test"]

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
    columns = ["metric", "primary", "key", "slice", "n_seeds", "slope", "low", "high", "verdict"]
    table = markdown_table(rows, columns, fmt=cell) if rows else "(no metric measured for both models yet)"
    return (f"# Trend tests: {test['treated']} - {test['control']}\n\n"
            f"Stated in sweep.json at {manifest.get('stated_at', '?')}, before any point ran.\n\n"
            f"Statistic: {test['statistic']}\n\nReading: {test['reading']}\n\n{table}\n"
            + (f"\n{legend}" if (legend := labels.legend(r["metric"] for r in rows)) else ""))


def render(root, manifest: dict, dpi: int = 120) -> dict:
    """Every figure and the trend tests of a sweep into ``<root>/figures/``; files of an earlier render that this
    one does not make again are removed (they would be stale). Returns what was made."""
    root = Path(root)
    out = root / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    data = collect(root, manifest)
    grid = manifest["grid"]
    models = model_order({model for (_, _, model, _) in data})
    measured = {metric for (_, _, _, metric) in data}
    metrics = [m for m in dict.fromkeys([*manifest["trend_test"]["primary"], *manifest["trend_test"]["metrics"]])
               if m in measured]
    written, figures, index = [], [], []
    test = manifest["trend_test"]
    contrast = f"the contrast {test['treated']} - {test['control']} paired within seeds"
    values = {p["name"]: p["values"] for p in manifest["points"]}
    value_rows = [{"point": point, **{k: value_text(values[point][k]) for k in grid}, "seed": seed, "model": model,
                   "metric": metric, "value": v}
                  for (point, seed, model, metric), v in sorted(data.items(), key=lambda kv: _order(kv[0], manifest,
                                                                                                      models))]
    write_csv(out / "values.csv", value_rows, ["point", *grid, "seed", "model", "metric", "value"])
    written.append("values.csv")
    for metric in metrics:
        for key in grid:
            rows = summary_rows(data, manifest, metric, key, models)
            if not rows:
                continue
            stem = f"{metric}__{key}"
            write_csv(out / f"{stem}.csv", rows, list(SUMMARY_COLUMNS))
            figures.append(plot_metric_against_key(out / f"{stem}.csv", out / f"{stem}.png", metric, key, dpi))
            written += [f"{stem}.csv", f"{stem}.png"]
            index.append(sweep_row(f"{stem}.png", f"{stem}.csv", metric, key, contrast))
    trends = trend_rows(data, manifest)
    write_csv(out / "trend_tests.csv", trends, list(TREND_COLUMNS))
    write_text_atomic(out / "trend_tests.md", _trend_markdown(trends, manifest))
    written += ["trend_tests.csv", "trend_tests.md"]
    written.append(write_index(out, index, "Figures of this sweep",
                               "Each metric against the swept key, one model per line at its mean over seeds with the "
                               "95% interval, the paper's value of the key marked. The trend tests: trend_tests.md; "
                               "each point's findings: `points/<point>/seeds/`."))
    for path in out.iterdir():
        if path.suffix in (".png", ".csv", ".md") and path.name not in written:
            path.unlink()
    return {"folder": str(out), "trend_table": str(out / "trend_tests.md"), "figures": figures, "files": written,
            "metrics": metrics, "models": models, "trend_tests": len(trends)}


def _order(key: tuple, manifest: dict, models: list[str]) -> tuple:
    """Rows in grid order, then seed, model (the study's order) and metric."""
    point, seed, model, metric = key
    names = [p["name"] for p in manifest["points"]]
    return names.index(point), seed_key(seed), models.index(model), metric
