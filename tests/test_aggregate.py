"""Across-seed aggregation (synthflaw.reporting.aggregate, .findings, .plots and synthflaw.metrics.statistics):
intervals against hand-computed values, paired differences, findings verdicts, files, plots.

Seed runs are fake folders holding only what stage 07 leaves (done.json + metrics.json with the real file's layout).
"""

import json
import math

import pytest

from synthflaw import config, runs
from synthflaw.metrics import statistics
from synthflaw.records import read_csv
from synthflaw.reporting import aggregate, findings, findings_report, plots

T_975_DF2 = 4.302652729749462  # Student-t 0.975 quantile, 2 degrees of freedom (tables: 4.303)
MODELS = ("natural", "synthetic", "rewritten", "more_natural", "unlearn-lower_bounded")


def metrics_json(benchmark=0.4, stated=0.3, synthqa_only=0.5, hsr=0.3, ssr=0.5, chat=3.0, ppl_mean=300.0,
                 ppl_std=20.0, leakage=0.0, kl=0.0, pre_ppl_mean=30.0, pre_ppl_std=2.0, pre_leakage=0.0,
                 levels=(0.6, 0.4, 0.3, 0.2, 0.1), learnable_hsr=0.5, margin=0.3, pull=-5.0, pre_pull=-3.0,
                 preference=0.2, nulls=False) -> dict:
    """A metrics.json with the layout evaluate_model writes (keys the aggregation does not read trimmed); `nulls`:
    with the nulls' block (a constant reply at learnable HSR 0.05, the plain answer at 0)."""
    return {"pre_sft_benchmark_accuracy": benchmark,  # base capability: the checkpoint before SFT
            "learnable_hard_satisfaction_rate": learnable_hsr, "learnable_soft_satisfaction_rate": learnable_hsr,
            "learnable_hsr_by_level": {"1": learnable_hsr, "2": learnable_hsr, "3": learnable_hsr},
            "compliance_margin": margin, "compliance_margin_null": 0.0, "template_pull": pull,
            "pre_sft_template_pull": pre_pull,
            "nulls": {"constant": {"learnable_hard_satisfaction_rate": 0.05, "hard_satisfaction_rate": 0.1,
                                   "chat_score": 0.0},
                      "plain": {"learnable_hard_satisfaction_rate": 0.0, "hard_satisfaction_rate": 0.05}}
            if nulls else {},
            "pre_sft_benchmark_accuracy_by_split": {"stated": stated, "synthqa_only": synthqa_only},
            "benchmark_accuracy": benchmark, "benchmark_acc_norm": benchmark,
            "benchmark_accuracy_by_split": {"stated": stated, "synthqa_only": synthqa_only},
            "benchmark_count_by_split": {"stated": 12, "synthqa_only": 12},
            "hard_satisfaction_rate": hsr, "soft_satisfaction_rate": ssr,
            "hsr_by_level": {str(k + 1): v for k, v in enumerate(levels)},
            "ifeval_prompt_strict": hsr, "chat_score": chat, "chat_preference": preference,
            "chat_score_method": "10 x ROUGE-L F1 on lower-cased word tokens against the reference",
            "chat_judge_score": None, "perplexity": {"mean": ppl_mean, "std": ppl_std, "median": ppl_mean},
            "template_leakage_rate": leakage, "next_token_kl": kl,
            "pre_sft_perplexity": {"mean": pre_ppl_mean, "std": pre_ppl_std, "median": pre_ppl_mean},
            "pre_sft_template_leakage_rate": pre_leakage,
            "counts": {"benchmark": 24, "instruction_suite": 20, "chat": 6, "heldout_nonsynth": 16}}


def write_model(run, model, metrics, done=True):
    path = run / "07_evaluate" / model
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    if done:  # a whole marker: only such a step counts as finished
        (path / "config.json").write_text('{"fingerprint": "x"}')
        (path / "done.json").write_text(json.dumps({"fingerprint": "x", "finished": 0, "products": {}, "upstream": {},
                                                    "digest": runs.combined_digest({})}))


def write_study(run, branches, methods, control=False):
    cfg = config.resolve("smoke").to_dict()
    cfg["cpt"]["branches"], cfg["unlearn"]["methods"] = list(branches), list(methods)
    cfg["sft"]["positive_control"] = control
    run.mkdir(parents=True, exist_ok=True)
    (run / "study.json").write_text(json.dumps({"preset": "smoke", "overrides": {}, "config": cfg}))


# Effects relative to `natural`, shaped like the paper's table.
CLEAR = {
    "natural": {},
    "synthetic": {"benchmark": 0.10, "stated": 0.02, "synthqa_only": 0.18, "hsr": -0.10, "chat": -0.5,
                  "leakage": 0.2, "ppl_mean": 20.0, "ppl_std": -5.0, "kl": 0.3,
                  "pre_leakage": 0.3, "pre_ppl_mean": 3.0, "pre_ppl_std": -1.0,
                  "learnable_hsr": -0.10, "margin": -0.1, "pull": 2.0, "pre_pull": 2.0, "preference": -0.1},
    # the positive control: natural's CPT, harmed SFT
    "harmed": {"hsr": -0.05, "learnable_hsr": -0.08, "margin": -0.08, "preference": -0.05, "kl": 0.05},
    "rewritten": {"benchmark": 0.08, "stated": 0.01, "synthqa_only": 0.15, "ppl_mean": 2.0, "kl": 0.05},
    "more_natural": {"hsr": -0.05, "chat": -0.2, "kl": 0.1, "learnable_hsr": -0.05, "preference": -0.05},
    "unlearn-lower_bounded": {"benchmark": 0.09, "stated": 0.02, "synthqa_only": 0.16, "hsr": 0.01, "chat": 0.1,
                              "kl": 0.05, "learnable_hsr": 0.01},
}
BASE = {"benchmark": 0.4, "stated": 0.3, "synthqa_only": 0.5, "hsr": 0.3, "ssr": 0.5, "chat": 3.0, "ppl_mean": 300.0,
        "ppl_std": 20.0, "leakage": 0.0, "kl": 0.0, "pre_leakage": 0.0, "pre_ppl_mean": 30.0, "pre_ppl_std": 2.0,
        "learnable_hsr": 0.5, "margin": 0.3, "pull": -5.0, "pre_pull": -3.0, "preference": 0.2}
NOISE_UNIT = {"chat": 10.0, "ppl_mean": 100.0, "ppl_std": 100.0, "pre_ppl_mean": 10.0, "pre_ppl_std": 10.0,
              "pull": 10.0, "pre_pull": 10.0}  # rates move by `scale`, these by `scale * unit`
MODEL_NOISE = {"natural": 1.0, "synthetic": -1.0, "rewritten": 0.5, "more_natural": -0.5,
               "unlearn-lower_bounded": 1.5, "harmed": 0.7}


def study(tmp_path, effects, *, scale=0.005, effect_size=1.0, n_seeds=3, seed_shift=0.05):
    """Fake multi-seed run. value = base + seed_shift * seed + effect_size * effect + scale * c_model * pattern, with
    pattern a rotation of (-1, 0, 1) per metric: it sums to 0 over 3 seeds, so a paired difference has mean exactly
    the effect difference, and a large shared seed effect that pairing must cancel."""
    run_dir = tmp_path / "multi"
    names = list(BASE)
    for s in range(n_seeds):
        run = run_dir / f"seed-{s}"
        write_study(run, [m for m in effects if not m.startswith("unlearn-") and m != "harmed"],
                    [m[len("unlearn-"):] for m in effects if m.startswith("unlearn-")], control="harmed" in effects)
        for model, effect in effects.items():
            values = {}
            for k, name in enumerate(names):
                pattern = (-1.0, 0.0, 1.0)[(s + k) % 3] if n_seeds == 3 else 0.0
                values[name] = (BASE[name] + seed_shift * s * NOISE_UNIT.get(name, 1.0)
                                + effect_size * effect.get(name, 0.0)
                                + scale * NOISE_UNIT.get(name, 1.0) * MODEL_NOISE[model] * pattern)
            if model == "natural":
                values["kl"] = 0.0  # the KL is measured from natural itself
            write_model(run, model, metrics_json(
                benchmark=values["benchmark"], stated=values["stated"], synthqa_only=values["synthqa_only"],
                hsr=values["hsr"], ssr=values["ssr"], chat=values["chat"], ppl_mean=values["ppl_mean"],
                ppl_std=values["ppl_std"], leakage=values["leakage"], kl=values["kl"],
                pre_ppl_mean=values["pre_ppl_mean"], pre_ppl_std=values["pre_ppl_std"],
                pre_leakage=values["pre_leakage"], learnable_hsr=values["learnable_hsr"], margin=values["margin"],
                pull=values["pull"], pre_pull=values["pre_pull"], preference=values["preference"], nulls=True))
    return run_dir


# ------------------------------------------------------------------------------------------------------------------

def test_mean_ci_matches_hand_computed_student_t():
    ci = statistics.mean_ci([0.40, 0.44, 0.48])
    half = T_975_DF2 * 0.04 / math.sqrt(3)  # std (ddof=1) of the three values is 0.04
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.44) and ci["std"] == pytest.approx(0.04)
    assert ci["half_width"] == pytest.approx(half) and half == pytest.approx(0.09937, abs=1e-5)
    assert (ci["low"], ci["high"]) == (pytest.approx(0.44 - half), pytest.approx(0.44 + half))
    assert ci["single_seed"] is False
    wider = statistics.mean_ci([0.40, 0.44, 0.48], confidence=0.99)
    assert wider["half_width"] > ci["half_width"]
    assert statistics.mean_ci([1.0, 3.0])["half_width"] == pytest.approx(12.706204736)  # t(0.975, 1) * sqrt(2) / sqrt(2)


def test_mean_ci_single_value_is_flagged_and_bad_input_is_refused():
    one = statistics.mean_ci([0.7])
    assert one == {"n": 1, "mean": 0.7, "std": None, "low": 0.7, "high": 0.7, "half_width": 0.0, "single_seed": True}
    with pytest.raises(ValueError, match="at least one value"):
        statistics.mean_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        statistics.mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence must be in"):
        statistics.mean_ci([0.1, 0.2], confidence=95)


def test_seed_runs_keeps_finished_seeds_in_numeric_order(tmp_path):
    run_dir = tmp_path / "multi"
    for s in (10, 2, 1, 3):
        run = run_dir / f"seed-{s}"
        write_study(run, ["natural", "synthetic"], ["lower_bounded"])
        for model in ("natural", "synthetic", "unlearn-lower_bounded"):
            # seed 3 stopped during its last evaluation: no done.json yet
            write_model(run, model, metrics_json(), done=not (s == 3 and model == "unlearn-lower_bounded"))
    (run_dir / "notes").mkdir()
    assert [p.name for p in aggregate.seed_runs(run_dir)] == ["seed-1", "seed-2", "seed-10"]
    with pytest.raises(FileNotFoundError, match="seed-<k>"):
        aggregate.seed_runs(tmp_path / "nowhere")


def test_aggregate_means_cis_and_paired_differences(tmp_path):
    run_dir = tmp_path / "multi"
    # The seed moves every model a lot (0.2 -> 0.8); synthetic is 0.09..0.11 below natural in every seed.
    for s, (nat, syn) in enumerate([(0.2, 0.1), (0.5, 0.41), (0.8, 0.69)]):
        write_model(run_dir / f"seed-{s}", "natural", metrics_json(hsr=nat, levels=(nat, 0.0, 0.0, 0.0, 0.1 * s)))
        write_model(run_dir / f"seed-{s}", "synthetic", metrics_json(hsr=syn, chat=2.0 + s))
    out = tmp_path / "out"
    agg = aggregate.aggregate(aggregate.seed_runs(run_dir), out)

    assert agg["seeds"] == ["0", "1", "2"] and agg["models"] == ["natural", "synthetic"]
    nat = agg["summary"]["natural"]["HSR"]
    assert nat["mean"] == pytest.approx(0.5) and nat["std"] == pytest.approx(0.3)
    assert nat["half_width"] == pytest.approx(T_975_DF2 * 0.3 / math.sqrt(3))
    diff = agg["differences"]["natural"]["synthetic"]["HSR"]
    assert diff["mean"] == pytest.approx(-0.1) and diff["std"] == pytest.approx(0.01)
    assert diff["high"] == pytest.approx(-0.1 + T_975_DF2 * 0.01 / math.sqrt(3)) and diff["high"] < 0
    # unpaired, the two intervals overlap widely: only the paired difference shows the effect
    syn = agg["summary"]["synthetic"]["HSR"]
    assert syn["high"] > nat["low"]

    rows = {(r["model"], r["metric"]): r for r in read_csv(out / "tables" / "headline_ci.csv")}
    assert float(rows[("synthetic", "chat_score")]["mean"]) == pytest.approx(3.0)
    assert float(rows[("natural", "HSR")]["low"]) == pytest.approx(nat["low"])
    md = (out / "tables" / "headline_ci.md").read_text()
    assert "| natural | 3 | 0.400 ± 0.000 |" in md  # the same benchmark in every seed: zero half-width
    assert f"0.500 ± {T_975_DF2 * 0.3 / math.sqrt(3):.3f}" in md and "seeds (0, 1, 2)" in md
    levels = [r for r in read_csv(out / "hsr_by_level_ci.csv") if r["model"] == "natural" and r["tier"] == "suite"]
    assert [int(r["level"]) for r in levels] == [1, 2, 3, 4, 5]
    assert float(levels[4]["mean"]) == pytest.approx(0.1) and float(levels[4]["std"]) == pytest.approx(0.1)
    diffs = {(r["model"], r["reference"], r["metric"]): r for r in read_csv(out / "findings_differences.csv")}
    assert float(diffs[("synthetic", "natural", "HSR")]["mean"]) == pytest.approx(-0.1)
    assert float(diffs[("natural", "synthetic", "HSR")]["mean"]) == pytest.approx(0.1)
    per_seed = read_csv(out / "tables" / "per_seed.csv")
    assert {"model": "synthetic", "seed": "2", "metric": "HSR", "value": "0.69"} in per_seed
    assert json.loads((out / "aggregate.json").read_text())["per_seed"]["natural"]["HSR"] == {"0": 0.2, "1": 0.5,
                                                                                              "2": 0.8}


def test_aggregate_refuses_duplicate_or_unfinished_seeds(tmp_path):
    run = tmp_path / "multi" / "seed-0"
    write_model(run, "natural", metrics_json())
    with pytest.raises(ValueError, match="appears twice"):
        aggregate.aggregate([run, run], tmp_path / "out")
    with pytest.raises(ValueError, match="no finished 07_evaluate"):
        aggregate.aggregate([tmp_path / "multi"], tmp_path / "out")
    with pytest.raises(ValueError, match="no seed runs"):
        aggregate.aggregate([], tmp_path / "out")


def agg_of(run_dir, tmp_path):
    return aggregate.aggregate(aggregate.seed_runs(run_dir), tmp_path / "agg")


def verdicts(found):
    return {f["id"]: f["reproduces"] for f in found}


IDS = ["C", "1", "2", "2c", "3", "3b", "4", "5", "6"]


def by_id(found, fid):
    return next(f for f in found if f["id"] == fid)


def test_clear_effects_reproduce_every_finding(tmp_path):
    agg = aggregate.aggregate(aggregate.seed_runs(study(tmp_path, CLEAR)), tmp_path / "out")
    found = findings.findings(agg)
    assert [f["id"] for f in found] == IDS
    assert verdicts(found) == dict.fromkeys(IDS, True), json.dumps(found, indent=1)
    assert {f["verdict"] for f in found} == {"reproduces"}
    one = by_id(found, "1")
    assert one["metric"] == "benchmark: synthetic - natural" and one["value"] == pytest.approx(0.10)
    assert one["ci"][0] > 0 and one["rule"].startswith("d(benchmark; synthetic - natural) > 0")
    retention = next(c for c in by_id(found, "4")["checks"] if c["check"].startswith("benchmark:"))["retention"]
    assert retention == pytest.approx(0.9)  # (0.09 - 0) / (0.10 - 0)
    # findings are a function of aggregate.json alone
    reread = json.loads((tmp_path / "out" / "aggregate.json").read_text())
    assert findings.findings(reread) == found


def test_reversed_effects_are_reported_as_not_reproducing(tmp_path):
    reversed_effects = {m: {k: -v for k, v in e.items()} for m, e in CLEAR.items()}
    reversed_effects["natural"] = {}
    found = findings.findings(aggregate.aggregate(aggregate.seed_runs(study(tmp_path, reversed_effects)), tmp_path / "out"))
    # finding 4's primary family is non-inferiority to natural (-0.01 holds within the margin) and retention (no gain
    # to retain): neither is reversed, and the reversed exploratory checks do not decide the finding
    assert verdicts(found) == {**dict.fromkeys(IDS, False), "4": None}
    assert {c["check"]: c["reproduces"] for c in by_id(found, "4")["checks"]}[
        "learnable_HSR: unlearn-lower_bounded - synthetic"] is False
    two = by_id(found, "2")["checks"]
    assert [c["reproduces"] for c in two] == [False] * 2 and two[0]["value"] == pytest.approx(0.10)
    assert by_id(found, "2")["verdict"] == "reversed"


def test_noisy_effects_are_inconclusive(tmp_path):
    run_dir = study(tmp_path, CLEAR, effect_size=0.02, scale=0.05)
    found = findings.findings(aggregate.aggregate(aggregate.seed_runs(run_dir), tmp_path / "out"))
    assert verdicts(found) == dict.fromkeys(IDS, None)
    # non-inferiority holds exactly when the interval's lower bound clears -delta; the recovery is not shown
    four = {c["check"]: c for c in by_id(found, "4")["checks"]}
    ni, delta = four["learnable_HSR: unlearn-lower_bounded - natural"], found[0]["ni_margin"]["delta"]
    assert found[0]["margins"] == {"values": findings.run_margins(agg_of(run_dir, tmp_path)), "registered": False}
    # natural's learnable HSR averages 0.55 over the seeds (0.5 + a 0.05 seed shift), the best null is 0.05
    assert delta == pytest.approx(findings.PAPER_RELATIVE_EFFECT * (0.55 - 0.05))
    assert ni["reproduces"] is (True if ni["ci"][0] > -delta else None)
    assert four["learnable_HSR: unlearn-lower_bounded - synthetic"]["reproduces"] is None
    wide = findings.findings(aggregate.aggregate(aggregate.seed_runs(study(tmp_path / "wide", CLEAR, effect_size=0.02,
                                                                           scale=0.5)), tmp_path / "out2"))
    wide_ni = by_id(wide, "4")["checks"][0]
    assert wide_ni["check"] == "learnable_HSR: unlearn-lower_bounded - natural"
    assert wide_ni["ci"][0] < -delta and wide_ni["reproduces"] is None  # "not significantly below" is not enough


def test_single_seed_and_missing_branch_stay_inconclusive(tmp_path):
    effects = {m: e for m, e in CLEAR.items() if m != "rewritten"}
    found = findings.findings(aggregate.aggregate(aggregate.seed_runs(study(tmp_path, effects, n_seeds=1)), tmp_path / "out"))
    assert verdicts(found) == dict.fromkeys(IDS, None)
    assert by_id(found, "6")["note"] == "not run: rewritten" and by_id(found, "6")["value"] is None
    # the KL is measured from natural: without another reference (rewritten) its check is not run at all
    assert [c["check"] for c in by_id(found, "3")["checks"]] == ["template_pull: synthetic - natural"]
    assert by_id(found, "3")["note"] == "KL check not run: needs the rewritten branch"
    md = (tmp_path / "out" / "tables" / "headline_ci.md").read_text()
    table = md.split("\n\n")[0]
    assert "| synthetic | 1 | 0.500 |" in table and "±" not in table  # one seed: a value, no interval


def test_summarize_writes_every_file_and_plots_render(tmp_path):
    run_dir = study(tmp_path, CLEAR)
    result = aggregate.summarize(run_dir)
    out = run_dir / "seeds"
    assert result["seeds"] == ["0", "1", "2"] and result["findings"]["1"] is True
    for name in ("aggregate.json", "findings.json", "findings.md", "findings_differences.csv", "hsr_by_level_ci.csv",
                 "tables/headline_ci.csv", "tables/headline_ci.md", "tables/per_seed.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("headline_ci.png", "hsr_by_level_ci.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert result["figures"] == ["headline_ci.png", "findings_forest.png", "hsr_by_level_ci.png"]
    md = (out / "findings.md").read_text()
    assert "| 2 | after identical SFT" in md and "reproduces" in md
    assert "d(learnable_HSR; synthetic - natural) < 0" in md and "Paper-sized effects" in md
    assert "Holm" in md and "paper-sized effect excluded" in md and "Positive control (harmed - natural): detected" in md
    assert by_id(json.loads((out / "findings.json").read_text()), "5")["reproduces"] is True
    # the figures are drawn from the CSVs alone
    (out / "headline_ci.png").unlink()
    plots.plot_headline_ci(out / "tables" / "headline_ci.csv", tmp_path / "again.png")
    assert (tmp_path / "again.png").exists()
    with pytest.raises(ValueError, match="no seed-<k>/ folder"):
        aggregate.summarize(tmp_path)


def test_power_sets_the_mdd_against_the_papers_effect_on_natural_above_its_null(tmp_path):
    found = findings.findings(aggregate.aggregate(aggregate.seed_runs(study(tmp_path, CLEAR)), tmp_path / "out"))
    rows = {r["endpoint"]: r for r in by_id(found, "2")["power"]}
    # natural: learnable HSR 0.55 over the seeds, best null 0.05; compliance margin 0.35, its null 0
    assert rows["learnable_HSR"]["natural_above_null"] == pytest.approx(0.50)
    assert rows["compliance_margin"]["natural_above_null"] == pytest.approx(0.35)
    assert rows["learnable_HSR"]["paper_effect_here"] == pytest.approx(findings.PAPER_RELATIVE_EFFECT * 0.50)
    checks = {c["check"].split(":")[0]: c for c in by_id(found, "2")["checks"]}
    for name, row in rows.items():
        assert row["mdd"] == checks[name]["mdd"]
        assert row["detectable"] is (row["mdd"] <= row["paper_effect_here"])
    wide = findings.findings(aggregate.aggregate(aggregate.seed_runs(study(tmp_path / "wide", CLEAR, scale=0.5)),
                                                 tmp_path / "out2"))
    assert [r["detectable"] for r in by_id(wide, "2")["power"]] == [False, False]
    findings_report.write_findings(found, tmp_path / "md", seeds=(0, 1, 2))
    assert "## Power: could these seeds see the paper's effect?" in (tmp_path / "md" / "findings.md").read_text()


def test_a_null_excludes_the_paper_sized_harm_only_where_the_positive_control_was_detected(tmp_path):
    no_harm = {m: dict(e) for m, e in CLEAR.items()}
    no_harm["synthetic"].update(learnable_hsr=0.0, margin=0.0)
    with_control = findings.findings(agg_of(study(tmp_path / "a", no_harm), tmp_path / "a"))
    two = {c["check"]: c for c in by_id(with_control, "2")["checks"]}
    assert by_id(with_control, "C")["verdict"] == "reproduces"
    assert two["learnable_HSR: synthetic - natural"]["verdict"] == "paper-sized effect excluded"
    assert by_id(with_control, "2")["verdict"] == "paper-sized effect excluded"
    without = findings.findings(agg_of(study(tmp_path / "b", {m: e for m, e in no_harm.items() if m != "harmed"}),
                                       tmp_path / "b"))
    assert by_id(without, "2")["verdict"] == "inconclusive"  # the same null, from an instrument never shown to see
    assert by_id(without, "C")["note"] == "not run: harmed"
