"""Across seeds: mean and confidence interval of every headline metric, paired differences, and the five findings.

`synthflaw run --seeds 0 1 2 --run-id ID` leaves one ordinary run per seed in ``runs/ID/seed-<k>/``. This module
reads only their finished JSON files (``07_evaluate/<model>/metrics.json``, ``05_unlearning/<method>/result.json``)
and writes, into one output folder:

- ``aggregate.json``: every per-seed value, the summaries and the paired differences (findings can be recomputed
  from it alone);
- ``tables/headline_ci.csv`` / ``tables/headline_ci.md`` / ``tables/per_seed.csv``, ``hsr_by_level_ci.csv``,
  ``findings_differences.csv``;
- ``findings.json`` / ``findings.md``; ``headline_ci.png``, ``hsr_by_level_ci.png`` (drawn from the CSVs only).

Why paired differences: every model of one seed shares that seed's world, base model and SFT data, so the seed-to-
seed spread of a metric is mostly shared between models; the difference within a seed cancels it, and the interval
of the mean difference over seeds is the honest test of a finding (a difference of two unpaired intervals is not).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import stdtrit  # noqa: E402  (the Student-t quantile; scipy.stats takes seconds to import)

from synthflaw import config as config_mod  # noqa: E402
from synthflaw import figures, runner  # noqa: E402  (module imports: figures may import this module back)
from synthflaw.records import read_csv, write_csv, write_json, write_text_atomic  # noqa: E402

REFERENCES = ("natural", "synthetic")
BRANCH_ORDER = ("natural", "synthetic", "rewritten", "more_natural")
LEVEL_PREFIX = "HSR_level_"
STAT_COLUMNS = ("n", "mean", "std", "low", "high", "half_width", "single_seed")
# Bounds closer to 0 than this count as 0: equal metrics read from two files can differ by float rounding only.
ZERO = 1e-12
_SEED_DIR = re.compile(r"^seed-(-?\d+)$")


# --------------------------------------------------------------------------------------------------------------
# Reading the seed runs
# --------------------------------------------------------------------------------------------------------------

def _done_models(run: Path) -> dict[str, Path]:
    root = run / "07_evaluate"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if (p / "done.json").exists() and (p / "metrics.json").exists()}


def _expected_models(run: Path) -> list[str] | None:
    """The models the seed's study.json says it evaluates (the runner's own fan-out), or None without study.json."""
    study = run / "study.json"
    if not study.exists():
        return None
    return runner.models_of(config_mod.from_dict(json.loads(study.read_text())["config"]))


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


def _seed_label(run: Path, position: int) -> str:
    match = _SEED_DIR.match(run.name)
    if match:
        return match.group(1)
    study = run / "study.json"
    if study.exists():
        return str(json.loads(study.read_text())["config"]["seed"])
    return str(position)


def _metric_values(metrics: dict) -> dict[str, float]:
    """The headline metrics of one metrics.json (figures.HEADLINE names) plus HSR per level; missing/None skipped."""
    values = {}
    for key, column in figures.HEADLINE.items():
        value = metrics
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            values[column] = float(value)
    for level, value in sorted((metrics.get("hsr_by_level") or {}).items(), key=lambda kv: int(kv[0])):
        if value is not None:
            values[f"{LEVEL_PREFIX}{int(level)}"] = float(value)
    return values


def _seed_key(seed: str):
    return (0, int(seed), "") if re.fullmatch(r"-?\d+", seed) else (1, 0, seed)


def _model_order(models) -> list[str]:
    models = list(dict.fromkeys(models))
    return [m for m in BRANCH_ORDER if m in models] + [m for m in models if m not in BRANCH_ORDER]


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------

def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean and two-sided Student-t confidence interval of the mean.

    mean = sum(x) / n, std = sample standard deviation (ddof = 1), half_width = t_{(1+c)/2, n-1} * std / sqrt(n),
    [low, high] = mean -/+ half_width; the t quantile is computed (scipy.special.stdtrit, exact for every n), not
    read from a table. With n = 1 there is no
    spread to estimate: low = high = mean, std = None and ``single_seed`` = True (findings then stay inconclusive).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value (one seed)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci got non-finite values {x.tolist()}; drop failed seeds or fix their metrics")
    mean = float(x.mean())
    if x.size == 1:
        return {"n": 1, "mean": mean, "std": None, "low": mean, "high": mean, "half_width": 0.0, "single_seed": True}
    std = float(x.std(ddof=1))
    half = float(stdtrit(x.size - 1, (1.0 + confidence) / 2.0)) * std / math.sqrt(x.size)
    return {"n": int(x.size), "mean": mean, "std": std, "low": mean - half, "high": mean + half, "half_width": half,
            "single_seed": False}


def contrast(per_seed: dict, terms: list[tuple[str, str, float]], confidence: float = 0.95) -> dict | None:
    """Mean and CI over seeds of a paired linear contrast sum_i w_i * metric_i(model_i, seed).

    Only seeds where every term has a value count. E.g. [("synthetic", "HSR", 1), ("natural", "HSR", -1)] is the
    paired difference HSR(synthetic) - HSR(natural). None when no seed has all terms.
    """
    seed_sets = [set(per_seed.get(model, {}).get(metric, {})) for model, metric, _ in terms]
    common = sorted(set.intersection(*seed_sets), key=_seed_key) if seed_sets else []
    if not common:
        return None
    values = [sum(w * per_seed[model][metric][s] for model, metric, w in terms) for s in common]
    return {**mean_ci(values, confidence), "seeds": common}


def _diff(per_seed, model, reference, metric, confidence):
    return contrast(per_seed, [(model, metric, 1.0), (reference, metric, -1.0)], confidence)


# --------------------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------------------

def _unlearning_costs(run: Path) -> dict[str, float]:
    """Tokens the unlearning step processed (forget + replay) as a fraction of the CPT budget, per method."""
    costs = {}
    root = run / "05_unlearning"
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        result = path / "result.json"
        if (path / "done.json").exists() and result.exists():
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
    costs: dict[str, dict[str, float]] = {}
    seeds = []
    for position, run in enumerate(run_dirs):
        models = _done_models(run)
        if not models:
            raise ValueError(f"{run} has no finished 07_evaluate step; aggregate only finished seeds (seed_runs)")
        seed = _seed_label(run, position)
        if seed in seeds:
            raise ValueError(f"seed {seed} appears twice ({run}); pass each seed's run once")
        seeds.append(seed)
        for model, path in models.items():
            for metric, value in _metric_values(json.loads((path / "metrics.json").read_text())).items():
                per_seed.setdefault(model, {}).setdefault(metric, {})[seed] = value
        for method, fraction in _unlearning_costs(run).items():
            costs.setdefault(method, {})[seed] = fraction

    models = _model_order(per_seed)
    per_seed = {m: per_seed[m] for m in models}
    summary = {m: {metric: mean_ci(list(v.values()), confidence) for metric, v in per_seed[m].items()}
               for m in models}
    differences = {ref: {m: {metric: _diff(per_seed, m, ref, metric, confidence) for metric in per_seed[m]}
                         for m in models if m != ref}
                   for ref in REFERENCES if ref in per_seed}
    aggregated = {"confidence": confidence, "seeds": seeds, "runs": [str(p) for p in run_dirs], "models": models,
                  "per_seed": per_seed, "summary": summary, "differences": differences,
                  "unlearning_cost": {m: {"per_seed": v, **mean_ci(list(v.values()), confidence)}
                                      for m, v in costs.items()}}
    _write_tables(aggregated, Path(out_dir))
    return aggregated


def _write_tables(agg: dict, out: Path) -> None:
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    write_json(out / "aggregate.json", agg)
    headline = list(figures.HEADLINE.values())
    rows, md_rows, level_rows, seed_rows, diff_rows = [], [], [], [], []
    for model in agg["models"]:
        mine = agg["summary"][model]
        n_model = len({s for v in agg["per_seed"][model].values() for s in v})
        rows += [{"model": model, "metric": metric, **_stats_row(mine[metric])} for metric in headline
                 if metric in mine]
        md_rows.append({"model": model, "n": str(n_model), **{c: _fmt(mine.get(c), n_model) for c in headline}})
        levels = sorted((int(k[len(LEVEL_PREFIX):]), k) for k in mine if k.startswith(LEVEL_PREFIX))
        level_rows += [{"model": model, "level": level, **_stats_row(mine[key])} for level, key in levels]
        seed_rows += [{"model": model, "seed": s, "metric": metric, "value": v}
                      for metric, by_seed in agg["per_seed"][model].items() for s, v in by_seed.items()]
    for ref, by_model in agg["differences"].items():
        for model, by_metric in by_model.items():
            diff_rows += [{"model": model, "reference": ref, "metric": metric, **_stats_row(stats)}
                          for metric, stats in by_metric.items() if stats is not None]
    write_csv(tables / "headline_ci.csv", rows)
    write_csv(tables / "per_seed.csv", seed_rows)
    cols = list(md_rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in md_rows]
    note = (f"\nmean ± half-width of the {agg['confidence']:.0%} Student-t interval over seeds "
            f"({', '.join(agg['seeds'])}); n = seeds per model.\n")
    write_text_atomic(tables / "headline_ci.md", "\n".join(lines) + "\n" + note)
    for name, table in (("hsr_by_level_ci.csv", level_rows), ("findings_differences.csv", diff_rows)):
        if table:
            write_csv(out / name, table)
        elif (out / name).exists():
            (out / name).unlink()  # left by an earlier aggregation with more data; it would be stale


# --------------------------------------------------------------------------------------------------------------
# The five findings (+ the rewritten branch)
# --------------------------------------------------------------------------------------------------------------

def _directional(stats: dict | None, sign: int) -> bool | None:
    """True when the CI excludes 0 on the claimed side (sign +1: above, -1: below, 0: either side), False when it
    excludes 0 on the other side, None when it contains 0, is missing, or comes from a single seed."""
    if stats is None or stats["single_seed"]:
        return None
    if sign == 0:
        return True if (stats["low"] > ZERO or stats["high"] < -ZERO) else None
    low, high = (stats["low"], stats["high"]) if sign > 0 else (-stats["high"], -stats["low"])
    return True if low > ZERO else False if high < -ZERO else None


def _not_below(stats: dict | None) -> bool | None:
    """Non-inferiority without margin: False when the CI lies wholly below 0, True otherwise (n >= 2)."""
    if stats is None or stats["single_seed"]:
        return None
    return False if stats["high"] < -ZERO else True


def _all(verdicts) -> bool | None:
    """Three-valued AND: any False -> False, all True -> True, otherwise None (inconclusive)."""
    verdicts = list(verdicts)
    return False if False in verdicts else True if verdicts and all(v is True for v in verdicts) else None


def _check(name: str, rule: str, stats: dict | None, verdict: bool | None, **extra) -> dict:
    return {"check": name, "value": None if stats is None else stats["mean"],
            "ci": None if stats is None else [stats["low"], stats["high"]], "n": None if stats is None else stats["n"],
            "reproduces": verdict, "rule": rule, **extra}


def _finding(fid: str, claim: str, checks: list[dict], note: str | None = None) -> dict:
    primary = checks[0]
    return {"id": fid, "claim": claim, "metric": primary["check"], "value": primary["value"], "ci": primary["ci"],
            "n": primary["n"], "reproduces": _all(c["reproduces"] for c in checks),
            "rule": "; AND ".join(c["rule"] for c in checks), "checks": checks, "note": note}


def findings(aggregated: dict, unlearning_method: str = "lower_bounded") -> list[dict]:
    """The five findings of PAPER.md and the rewritten branch, each tested on paired per-seed contrasts.

    d(X; a - b) is the per-seed difference of metric X between models a and b, averaged over seeds with a Student-t
    CI (`contrast`). A directional check reproduces (True) when its CI excludes 0 on the claimed side, is False when
    it excludes 0 on the other side and None (inconclusive) otherwise or with one seed. A finding's verdict is the
    three-valued AND of its checks (any False -> False; all True -> True; else None). Rules:

    1. SynthQA raises the knowledge benchmark, and the gain sits on the facts only SynthQA carries:
       d(benchmark; synthetic - natural) > 0; d(benchmark_synthqa_only; synthetic - natural) > 0; and the
       difference-in-differences d(synthqa_only; syn - nat) - d(stated; syn - nat) > 0. `benchmark` is measured
       before SFT (base capability, as the paper's MMLU); the same contrast after SFT is reported, not tested.
    2. After identical SFT, SynthQA lowers instruction following and chat quality:
       d(HSR; synthetic - natural) < 0; d(chat_score; synthetic - natural) < 0.
    3. The output distribution shifts: d(leakage; synthetic - natural) > 0; d(ppl_mean; synthetic - natural) != 0
       (two-sided: the direction of the shift is not claimed, so this check is True or None, never False);
       d(ppl_std; synthetic - natural) < 0 (the reported lower variance); and for the next-token KL from `natural`,
       which is >= 0 by construction and 0 for `natural` itself, d(kl; synthetic - rewritten) > 0 (the same facts in
       diverse formats as the control; d(kl; synthetic - natural) > 0 only when `rewritten` was not run).
    3b. The same shift before SFT, on the checkpoint each SFT started from (SFT on identical chats can erase what
       CPT left; added after the 2-seed reference showed leakage 0 for every SFT model, before the 3-seed run):
       d(pre_sft_leakage; synthetic - natural) > 0 (continuations of plain prompts that carry the template);
       d(pre_sft_ppl_mean; synthetic - natural) != 0 (two-sided); d(pre_sft_ppl_std; synthetic - natural) < 0.
    4. The lower-bounded unlearning (model ``unlearn-<unlearning_method>``, u) brings HSR back to at least natural's
       level, chat above synthetic's, and keeps most of the benchmark gain: d(HSR; u - natural) not significantly
       below 0 (False only when its CI lies wholly below 0, else True); d(HSR; u - synthetic) > 0 (a recovery
       actually measured, so that noise alone cannot pass the first check); d(chat_score; u - synthetic) > 0;
       retention (acc_u - acc_nat) / (acc_syn - acc_nat) >= 0.5, tested without dividing as the per-seed contrast
       acc_u - (acc_syn + acc_nat) / 2 > 0 (equivalent while the gain is positive; None unless finding 1's gain
       check is True). Reported, not tested: the unlearning tokens (forget + replay) as a fraction of CPT tokens.
    5. More natural data recovers only part: HSR(more_natural) strictly between synthetic and natural:
       d(HSR; more_natural - synthetic) > 0 and d(HSR; natural - more_natural) > 0.
    6. rewritten (the SynthQA facts in diverse formats): the gain without the loss: d(benchmark; rewritten -
       natural) > 0 and d(HSR; rewritten - natural) not significantly below 0.
    """
    per_seed, c = aggregated["per_seed"], aggregated["confidence"]

    def d(metric, a, b):
        return _diff(per_seed, a, b, metric, c)

    def missing(*models):
        absent = [m for m in models if m not in per_seed]
        return f"not run: {', '.join(absent)}" if absent else None

    out = []
    gain = d("benchmark", "synthetic", "natural")
    did = contrast(per_seed, [("synthetic", "benchmark_synthqa_only", 1), ("natural", "benchmark_synthqa_only", -1),
                              ("synthetic", "benchmark_stated", -1), ("natural", "benchmark_stated", 1)], c)
    syn_only = d("benchmark_synthqa_only", "synthetic", "natural")
    out.append(_finding("1", "SynthQA raises the knowledge benchmark over natural; the gain sits on the facts only "
                             "SynthQA carries", [
        _check("benchmark: synthetic - natural", "d(benchmark; synthetic - natural) > 0", gain, _directional(gain, 1)),
        _check("benchmark_synthqa_only: synthetic - natural", "d(benchmark_synthqa_only; synthetic - natural) > 0",
               syn_only, _directional(syn_only, 1)),
        _check("gain on synthqa_only - gain on stated",
               "d(synthqa_only; syn - nat) - d(stated; syn - nat) > 0", did, _directional(did, 1))],
        missing("natural", "synthetic")))
    out[-1]["after_sft"] = {"sft_benchmark: synthetic - natural": d("sft_benchmark", "synthetic", "natural"),
                            "sft_benchmark_synthqa_only: synthetic - natural":
                                d("sft_benchmark_synthqa_only", "synthetic", "natural")}

    hsr, chat = d("HSR", "synthetic", "natural"), d("chat_score", "synthetic", "natural")
    out.append(_finding("2", "after identical SFT, synthetic has lower HSR and chat score than natural", [
        _check("HSR: synthetic - natural", "d(HSR; synthetic - natural) < 0", hsr, _directional(hsr, -1)),
        _check("chat_score: synthetic - natural", "d(chat_score; synthetic - natural) < 0", chat,
               _directional(chat, -1))], missing("natural", "synthetic")))

    def shift_checks(prefix: str) -> list[dict]:
        """Findings 3 and 3b's shared rule on `prefix` metrics (after SFT: "", before: "pre_sft_"), synthetic -
        natural: leakage up, perplexity mean moved (either way), perplexity spread down."""
        checks = []
        for metric, rule, sign in (("leakage", "> 0", 1), ("ppl_mean", "!= 0 (two-sided)", 0), ("ppl_std", "< 0", -1)):
            stats = d(prefix + metric, "synthetic", "natural")
            checks.append(_check(f"{prefix}{metric}: synthetic - natural",
                                 f"d({prefix}{metric}; synthetic - natural) {rule}", stats, _directional(stats, sign)))
        return checks

    kl_ref = "rewritten" if "rewritten" in per_seed else "natural"
    kl = d("kl_from_natural", "synthetic", kl_ref)
    out.append(_finding("3", "the output distribution shifts (template leakage, perplexity distribution, KL)", [
        *shift_checks(""),
        _check(f"kl_from_natural: synthetic - {kl_ref}", f"d(kl_from_natural; synthetic - {kl_ref}) > 0", kl,
               _directional(kl, 1))], missing("natural", "synthetic")))
    out.append(_finding("3b", "before SFT, the CPT model's output distribution shifts (template leakage into plain "
                              "continuations, perplexity distribution)", shift_checks("pre_sft_"),
                        missing("natural", "synthetic")))

    u = f"unlearn-{unlearning_method}"
    back, recovered, chat_up = d("HSR", u, "natural"), d("HSR", u, "synthetic"), d("chat_score", u, "synthetic")
    kept = contrast(per_seed, [(u, "benchmark", 1.0), ("synthetic", "benchmark", -0.5), ("natural", "benchmark", -0.5)],
                    c)
    retention = None
    if kept is not None and gain is not None and abs(gain["mean"]) > 1e-12:
        retention = (kept["mean"] + gain["mean"] / 2) / gain["mean"]  # (acc_u - acc_nat) / (acc_syn - acc_nat)
    cost = aggregated.get("unlearning_cost", {}).get(unlearning_method)
    out.append(_finding("4", f"{u} brings HSR back to at least natural's, chat above synthetic's, and keeps most of "
                             "the benchmark gain, at a small fraction of the CPT cost", [
        _check(f"HSR: {u} - natural", f"d(HSR; {u} - natural) not significantly below 0", back, _not_below(back)),
        _check(f"HSR: {u} - synthetic", f"d(HSR; {u} - synthetic) > 0", recovered, _directional(recovered, 1)),
        _check(f"chat_score: {u} - synthetic", f"d(chat_score; {u} - synthetic) > 0", chat_up,
               _directional(chat_up, 1)),
        _check(f"benchmark: {u} - (synthetic + natural)/2",
               f"retention >= 0.5, i.e. d(benchmark; {u} - (synthetic + natural)/2) > 0, given a significant gain",
               kept, _directional(kept, 1) if _directional(gain, 1) else None, retention=retention)],
        missing("natural", "synthetic", u)))
    out[-1]["unlearning_tokens_fraction_of_cpt"] = None if cost is None else cost["mean"]

    part, short = d("HSR", "more_natural", "synthetic"), d("HSR", "natural", "more_natural")
    out.append(_finding("5", "more natural data recovers only part of the loss: HSR(more_natural) between synthetic "
                             "and natural", [
        _check("HSR: more_natural - synthetic", "d(HSR; more_natural - synthetic) > 0", part, _directional(part, 1)),
        _check("HSR: natural - more_natural", "d(HSR; natural - more_natural) > 0", short, _directional(short, 1))],
        missing("natural", "synthetic", "more_natural")))

    rw_gain, rw_hsr = d("benchmark", "rewritten", "natural"), d("HSR", "rewritten", "natural")
    out.append(_finding("6", "rewritten (SynthQA's facts in diverse formats) gives the benchmark gain without the HSR "
                             "loss", [
        _check("benchmark: rewritten - natural", "d(benchmark; rewritten - natural) > 0", rw_gain,
               _directional(rw_gain, 1)),
        _check("HSR: rewritten - natural", "d(HSR; rewritten - natural) not significantly below 0", rw_hsr,
               _not_below(rw_hsr))], missing("natural", "rewritten")))
    return out


def _verdict(v: bool | None) -> str:
    return {True: "reproduces", False: "does not reproduce (reversed)", None: "inconclusive"}[v]


def _interval(value, ci) -> str:
    return "" if value is None else f"{value:+.4g} [{ci[0]:+.4g}, {ci[1]:+.4g}]"


def write_findings(found: list[dict], out_dir, confidence: float = 0.95, seeds=()) -> None:
    """findings.json (as returned by `findings`) and findings.md: one row per finding, then one row per check."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "findings.json", found)
    lines = [f"# Findings across seeds ({', '.join(map(str, seeds)) or '?'}; {confidence:.0%} Student-t intervals "
             "of paired per-seed differences)", "",
             "| # | claim | primary check | mean [CI] | n | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['id']} | {f['claim']} | {f['metric']} | {_interval(f['value'], f['ci'])} | {f['n'] or ''} | "
              f"{_verdict(f['reproduces'])}{' (' + f['note'] + ')' if f['note'] else ''} |" for f in found]
    lines += ["", "## Checks", "", "| # | check | mean [CI] | n | verdict | rule |", "|---|---|---|---|---|---|"]
    for f in found:
        for ch in f["checks"]:
            extra = f" (retention {ch['retention']:.2f})" if ch.get("retention") is not None else ""
            lines.append(f"| {f['id']} | {ch['check']} | {_interval(ch['value'], ch['ci'])}{extra} | "
                         f"{ch['n'] or ''} | {_verdict(ch['reproduces'])} | {ch['rule']} |")
    for f in found:
        for name, stats in (f.get("after_sft") or {}).items():
            if stats is not None:
                lines.append(f"| {f['id']} | {name} (after SFT; reported, not tested) | "
                             f"{_interval(stats['mean'], (stats['low'], stats['high']))} | {stats['n']} | | |")
    cost = next((f.get("unlearning_tokens_fraction_of_cpt") for f in found if f["id"] == "4"), None)
    if cost:
        lines += ["", f"Unlearning cost (finding 4): forget + replay tokens = {cost:.4f} of the CPT tokens "
                      f"(about 1/{1 / cost:.0f}), mean over seeds."]
    lines += ["", "A finding reproduces when every check does; `inconclusive` means an interval contains 0 (or one "
                  "seed only): more seeds, not a different rule, would settle it."]
    write_text_atomic(out / "findings.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Figures (from the aggregated CSVs only)
# --------------------------------------------------------------------------------------------------------------

def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_headline_ci(csv_path, png_path, dpi: int = 120) -> str:
    """Benchmark accuracy, HSR and chat score / 10 per model, bars at the mean with the CI as error bars."""
    rows = read_csv(csv_path, required=("model", "metric", "mean", "low", "high"))
    models = list(dict.fromkeys(r["model"] for r in rows))
    by_key = {(r["model"], r["metric"]): r for r in rows}
    panels = [("benchmark", "benchmark acc", 1), ("HSR", "HSR", 1), ("chat_score", "chat score / 10", 10)]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(models) + 2), 3.8))
    width = 0.8 / len(panels)
    for k, (metric, label, scale) in enumerate(panels):
        xs, means, errs = [], [], [[], []]
        for i, model in enumerate(models):
            r = by_key.get((model, metric))
            if r is None or _num(r["mean"]) is None:
                continue
            mean, low, high = (_num(r[c]) / scale for c in ("mean", "low", "high"))
            xs.append(i + k * width)
            means.append(mean)
            errs[0].append(mean - low)
            errs[1].append(high - mean)
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks([i + width for i in range(len(models))], models, rotation=30, ha="right")
    ax.set_ylabel("score (mean and CI over seeds)")
    ax.legend(fontsize=8)
    ax.set_title("Benchmark vs instruction following vs chat quality, across seeds")
    _save(fig, Path(png_path), dpi)
    return Path(png_path).name


def plot_hsr_by_level_ci(csv_path, png_path, dpi: int = 120) -> str:
    """HSR per number of constraints, one line per model at the mean with its CI shaded."""
    rows = read_csv(csv_path, required=("model", "level", "mean", "low", "high"))
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((int(r["level"]), _num(r["mean"]), _num(r["low"]), _num(r["high"]))
                     for r in rows if r["model"] == model)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.fill_between([p[0] for p in pts], [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(),
                        alpha=0.15, lw=0)
    ax.set_xticks(sorted({int(r["level"]) for r in rows}))
    ax.set_xlabel("constraints per instruction (level)")
    ax.set_ylabel("hard satisfaction rate")
    ax.set_title("Instruction following by level (mean and CI over seeds)")
    ax.legend(fontsize=7)
    _save(fig, Path(png_path), dpi)
    return Path(png_path).name


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
        raise ValueError(f"{run_dir} has no seed-<k>/ folder whose 07_evaluate steps have all finished; run "
                         f"`synthflaw run --seeds 0 1 2 --run-id {run_dir.name}` first")
    out = Path(out_dir) if out_dir is not None else run_dir / "seeds"
    agg = aggregate(runs, out, confidence)
    found = findings(agg, unlearning_method)
    write_findings(found, out, confidence, agg["seeds"])
    made = [plot_headline_ci(out / "tables" / "headline_ci.csv", out / "headline_ci.png", dpi)]
    if (out / "hsr_by_level_ci.csv").exists():
        made.append(plot_hsr_by_level_ci(out / "hsr_by_level_ci.csv", out / "hsr_by_level_ci.png", dpi))
    return {"seeds": agg["seeds"], "figures": made,
            "findings": {f["id"]: f["reproduces"] for f in found}}
