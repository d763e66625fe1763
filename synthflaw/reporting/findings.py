"""The paper's findings, each tested on paired per-seed differences, with its rule written down before the data.

`findings` reads the aggregate of a multi-seed run (:func:`synthflaw.reporting.aggregate.aggregate`) and returns one
verdict per finding: "reproduces" when every check's interval excludes 0 on the claimed side, "does not reproduce
(reversed)" when one excludes it on the other side, "inconclusive" otherwise.
"""

from __future__ import annotations

from pathlib import Path

from synthflaw.metrics.statistics import contrast, paired_difference
from synthflaw.records import write_json, write_text_atomic

# Bounds closer to 0 than this count as 0: equal metrics read from two files can differ by float rounding only.
ZERO = 1e-12


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
        return paired_difference(per_seed, a, b, metric, c)

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
