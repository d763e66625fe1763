"""findings.json and findings.md: :func:`synthflaw.reporting.findings.findings`'s result written down, the rules and
the positive control first, then a row per finding, a row per check with its MDD, finding 2's power and what is
reported untested. Kept apart from the findings' logic: what a verdict is and how it is printed change separately.
"""

from __future__ import annotations

from pathlib import Path

from synthflaw.records import write_json, write_text_atomic
from synthflaw.reporting import verdicts
from synthflaw.reporting.findings import ITEM_METRICS
from synthflaw.reporting.preregistration import PAPER_RELATIVE_EFFECT, PRIMARY_ENDPOINTS, STUDY_FINDINGS


def _verdict(label: str, mdd=None, delta=None) -> str:
    """A label as findings.md writes it: inconclusive ones with the MDD beside the paper-sized effect."""
    if label != verdicts.INCONCLUSIVE or mdd is None:
        return label
    return f"inconclusive (MDD {mdd:.3g}" + (f" vs paper-sized {delta:.3g})" if delta else ")")


def _interval(value, ci) -> str:
    return "" if value is None else f"{value:+.4g} [{ci[0]:+.4g}, {ci[1]:+.4g}]"


def _size(stats_or_check: dict) -> str:
    n, items = stats_or_check.get("n"), stats_or_check.get("items")
    return "" if n is None else f"{n}" + (f" ({items} items)" if items else "")


def _mdd(value) -> str:
    return "" if value is None else f"{value:.4g}"


def write_findings(found: list[dict], out_dir, confidence: float = 0.95, seeds=()) -> None:
    """findings.json (as returned by `findings`) and findings.md: the rules, the positive control, one row per
    finding, then one row per check (primary first) with its minimum detectable difference, then what is reported
    untested."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "findings.json", found)
    lines = _preamble(found, confidence, seeds) + _tables(found) + _closing(found)
    write_text_atomic(out / "findings.md", "\n".join(lines) + "\n")


def _preamble(found: list[dict], confidence: float, seeds) -> list[str]:
    """The title, the rules, the margins and their source, natural above its null, and the positive control."""
    margin = found[0].get("ni_margin") if found else None
    margins = found[0].get("margins") if found else None
    lines = [f"# Findings across seeds ({', '.join(map(str, seeds)) or '?'}; {confidence:.0%} intervals)", "",
             "Rules (docs/preregistration.md): each finding has a primary family of at most two checks, "
             "Holm-adjusted within it (one-sided at 2.5% for a directional claim); every other check is "
             "exploratory. Verdicts: reproduces | reversed | paper-sized effect excluded (the interval lies on the "
             "near side of the paper-sized effect, and the positive control was detected on that endpoint) | "
             "inconclusive (with its MDD beside the paper-sized effect). Study-wide: Holm across findings "
             f"{', '.join(STUDY_FINDINGS)} on each finding's p (the largest Holm p of its primary checks, 1 unless it "
             "reproduces); a count of findings that reproduce counts this column.",
             "",
             f"Primary endpoints: {', '.join(PRIMARY_ENDPOINTS)}. Per-item endpoints ({', '.join(ITEM_METRICS)}) "
             "are contrasted item by item within seeds (standard errors clustered by base prompt where items share "
             "one) and combined over seeds (random effects, Student t on k - 1 degrees of freedom); the others by "
             "the Student t interval of per-seed differences. MDD: the minimum detectable difference at these seeds "
             "(two-sided 5%, power 80%)."]
    if margins and margins["values"]:
        source = ("pre-registered (docs/preregistration.md)" if margins["registered"] else
                  f"derived from this run's natural model and nulls ({PAPER_RELATIVE_EFFECT:.1%} of natural above "
                  "its null), not pre-registered")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in margins["values"].items())
        lines += ["", f"Paper-sized effects (the margins of 'no worse than' claims), {source}: {shown}."]
    if margin:
        lines += ["", f"Natural's learnable HSR above the best null: {margin['natural']:.3f} - "
                      f"{margin['best_null']:.3f} = {margin['above_null']:.3f}."]
    control = next((f for f in found if f["id"] == "C"), None)
    if control and control.get("detected"):
        seen = [e for e, v in control["detected"].items() if v]
        lines += ["", f"Positive control (harmed - natural): detected on {', '.join(seen) or 'no endpoint'}"
                      f"{'' if len(seen) == len(control['detected']) else '; not detected on ' + ', '.join(e for e, v in control['detected'].items() if not v)}."
                      " Where it is not detected, this run cannot exclude a harm on that endpoint."]
        if control.get("exchange_rate") is not None:
            lines += [f"Exchange rate measured by the control: {control['exchange_rate']:.3g} nats/token of "
                      "compliance margin per unit of learnable HSR."]
    elif control:
        lines += ["", "Positive control not run: no verdict of 'paper-sized effect excluded' is possible."]
    return lines


def _tables(found: list[dict]) -> list[str]:
    """One row per finding, one per check, finding 2's power and what is reported untested."""
    lines = ["", "| # | claim | primary check | mean [CI] | seeds | verdict | study-wide (Holm p) |",
             "|---|---|---|---|---|---|---|"]
    for f in found:
        head = f["checks"][0] if f["checks"] else {}
        wide = "" if "study_p" not in f else f"{'reproduces' if f['study_wide'] else 'no'} ({f['study_p']:.3g})"
        lines.append(f"| {f['id']} | {f['claim']} | {f['metric']} | {_interval(f['value'], f['ci'])} | "
                     f"{f['n'] or ''} | {_verdict(f['verdict'], head.get('mdd'), head.get('delta'))}"
                     f"{' (' + f['note'] + ')' if f['note'] else ''} | {wide} |")
    lines += ["", "## Checks", "",
              "| # | check | family | mean [CI] | seeds | MDD | p (Holm) | verdict | rule |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in found:
        for ch in f["checks"]:
            extra = f" (retention {ch['retention']:.2f})" if ch.get("retention") is not None else ""
            p = ch.get("p_holm") if ch["primary"] else ch.get("p")
            lines.append(f"| {f['id']} | {ch['check']} | {'primary' if ch['primary'] else 'exploratory'} | "
                         f"{_interval(ch['value'], ch['ci'])}{extra} | {_size(ch)} | {_mdd(ch['mdd'])} | "
                         f"{'' if p is None else f'{p:.3g}'} | {_verdict(ch['verdict'], ch['mdd'], ch['delta'])} | "
                         f"{ch['rule']} |")
    rows = next((f.get("power") for f in found if f["id"] == "2"), None)
    if rows:
        size = ("paper-sized effect (registered)" if rows[0].get("registered") else
                f"paper's effect here ({PAPER_RELATIVE_EFFECT:.0%} of that)")
        lines += ["", "## Power: could these seeds see the paper's effect? (finding 2)", "",
                  f"| endpoint | natural above its null | {size} | MDD | detectable |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['endpoint']} | {r['natural_above_null']:.4g} | {_mdd(r['paper_effect_here'])} | "
                  f"{_mdd(r['mdd'])} | {'' if r['detectable'] is None else 'yes' if r['detectable'] else 'no'} |"
                  for r in rows]
    lines += ["", "## Reported, not tested", "", "| # | contrast | mean [CI] | seeds | MDD |", "|---|---|---|---|---|"]
    for f in found:
        for name, stats in (f.get("reported") or {}).items():
            if stats is not None:
                lines.append(f"| {f['id']} | {name} | {_interval(stats['mean'], (stats['low'], stats['high']))} | "
                             f"{_size(stats)} | {_mdd(stats.get('mdd'))} |")
    return lines


def _closing(found: list[dict]) -> list[str]:
    """Finding 4's cost and what `inconclusive` means."""
    lines = []
    cost = next((f.get("unlearning_tokens_fraction_of_cpt") for f in found if f["id"] == "4"), None)
    if cost:
        lines += ["", f"Unlearning cost (finding 4): forget + replay tokens = {cost:.4f} of the CPT tokens "
                      f"(about 1/{1 / cost:.0f}), mean over seeds."]
    lines += ["", "`inconclusive` means no rule was met: more seeds, not a different rule, would settle it, and the "
                  "MDD says how large a difference these seeds could have shown."]
    return lines
