"""The findings as a forest plot: one row per check, grouped by finding (primary checks first, a header per
finding), its interval and mean, 0, the paper-sized effect and the non-inferiority margin where one is registered,
and the verdict at the right (`findings_forest.csv` beside it, which the figure is drawn from alone).

The checks' endpoints have different units (share of prompts, nats per token, nats per reply, accuracy), so each
row is drawn in the units of its own yardstick, written under its label: the paper-sized effect delta where the
endpoint has one (the diamond at +-1 is then the paper's effect in the claimed direction, and a non-inferiority
check's margin, -delta to 0, is the shaded band), else the check's minimum detectable difference at these seeds (a
row reaching past +-1 is then larger than what these seeds could resolve).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from synthflaw.records import read_csv, write_csv
from synthflaw.reporting import labels
from synthflaw.reporting.plots import new_figure, save_figure
from synthflaw.reporting.tables import num

COLUMNS = ["finding", "claim", "check", "label", "unit", "family", "kind", "sign", "mean", "low", "high", "scale",
           "scale_kind", "verdict"]
VERDICT_COLOURS = {"reproduces": "tab:green", "reversed": "tab:red", "paper-sized effect excluded": "tab:blue",
                   "inconclusive": "tab:gray"}
PAPER = "tab:purple"


def forest_rows(found: list[dict]) -> list[dict]:
    """The forest's rows from `findings.findings` (checks with an interval and a yardstick only)."""
    rows = []
    for f in found:
        for c in f["checks"]:
            if c["ci"] is None:
                continue
            scale, kind = (c["delta"], "paper-sized effect") if c.get("delta") else (c.get("mdd"), "MDD")
            if not scale:
                continue
            label = labels.check(c["check"])
            rows.append({"finding": f["id"], "claim": f.get("claim", ""), "check": c["check"], "label": label.words,
                         "unit": label.unit, "family": "primary" if c["primary"] else "exploratory",
                         "kind": c.get("kind", "directional"), "sign": c.get("sign", 1), "mean": c["value"],
                         "low": c["ci"][0], "high": c["ci"][1], "scale": scale, "scale_kind": kind,
                         "verdict": c["verdict"]})
    return rows


def write_forest(found: list[dict], out_dir, dpi: int = 120) -> str | None:
    """findings_forest.csv and .png in `out_dir`; None when no check has an interval (one seed)."""
    rows = forest_rows(found)
    if not rows:
        return None
    out = Path(out_dir)
    write_csv(out / "findings_forest.csv", rows, COLUMNS)
    return plot_forest(out / "findings_forest.csv", out / "findings_forest.png", dpi)


def _layout(rows: list[dict]) -> list[tuple[str, dict]]:
    """Top to bottom: a ("header", first row) line per finding, then a ("check", row) line per check."""
    lines, seen = [], None
    for r in rows:
        if r["finding"] != seen:
            lines.append(("header", r))
            seen = r["finding"]
        lines.append(("check", r))
    return lines


def _draw_row(ax, y: float, r: dict) -> tuple[float, float]:
    """One check at height y: the margin band or the paper's effect, then the interval and the mean."""
    scale, primary = num(r["scale"]), r["family"] == "primary"
    low, mean, high = (num(r[k]) / scale for k in ("low", "mean", "high"))
    if r["scale_kind"] == "paper-sized effect":
        if r["kind"] == "non_inferior":
            ax.fill_betweenx([y - 0.38, y + 0.38], -1, 0, color=PAPER, alpha=0.15, lw=0)
        else:
            sign = int(num(r["sign"]) or 0)
            for x in ([sign] if sign else [-1, 1]):
                ax.plot([x], [y], "D", color=PAPER, ms=5, mfc="none")
    colour = VERDICT_COLOURS.get(r["verdict"], "tab:gray")
    ax.plot([low, high], [y, y], color=colour, lw=2.6 if primary else 1.2)
    ax.plot([mean], [y], "o", color=colour, ms=5.5 if primary else 3.5)
    return low, high


def _tick(r: dict) -> str:
    """The check in words (the contrast first, so that wrapping never hides it), then its yardstick."""
    words, _, contrast = r["label"].rpartition(": ")
    yardstick = f"1 = {r['scale_kind']} {num(r['scale']):.3g} {r['unit']}"
    return (textwrap.fill(f"{contrast}: {words}" if words else contrast, 70) + "\n"
            + f"{yardstick}{'' if r['family'] == 'primary' else '; exploratory'}")


def plot_forest(csv_path, png_path, dpi: int = 120) -> str:
    """The forest from its CSV alone."""
    rows = read_csv(csv_path, required=tuple(COLUMNS))
    lines = _layout(rows)
    fig, ax = new_figure((12.0, 0.62 * len(lines) + 2.2))
    ticks, verdicts, lows, highs = [], [], [], []
    for y, (kind, r) in zip(range(len(lines) - 1, -1, -1), lines):
        if kind == "header":
            claim = textwrap.shorten(f"Finding {r['finding']}: {r['claim']}", 150, placeholder="...")
            ticks.append((y, textwrap.fill(claim, 80), None))
            continue
        low, high = _draw_row(ax, y, r)
        lows.append(low)
        highs.append(high)
        colour = VERDICT_COLOURS.get(r["verdict"], "tab:gray")
        ticks.append((y, _tick(r), colour))
        verdicts.append((y, r["verdict"], colour))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(min(-1.5, min(lows) - 0.3), max(1.5, max(highs) + 0.3))
    ax.set_ylim(-0.7, len(lines) - 0.3)
    ax.set_yticks([y for y, _, _ in ticks], [t for _, t, _ in ticks], fontsize=7.5)
    for tick, (_, _, colour) in zip(ax.get_yticklabels(), ticks):
        if colour is None:
            tick.set_fontweight("bold")
            tick.set_fontsize(8.5)
    right = ax.twinx()  # the verdicts as right-hand tick labels, so the layout makes room for them
    right.set_ylim(ax.get_ylim())
    right.set_yticks([y for y, _, _ in verdicts], [v for _, v, _ in verdicts], fontsize=8)
    for tick, (_, _, colour) in zip(right.get_yticklabels(), verdicts):
        tick.set_color(colour)
    ax.set_xlabel("contrast in units of its yardstick: the paper-sized effect where registered,\n"
                  "else the minimum detectable difference (MDD) at these seeds; 0 = no difference")
    ax.set_title("Findings: each check's contrast, 95% interval,\nagainst 0 and the paper's effect", fontsize=10)
    handles = [Line2D([], [], color="tab:gray", lw=2.6, marker="o", label="primary check (mean, interval)"),
               Line2D([], [], color="tab:gray", lw=1.2, marker="o", ms=3.5, label="exploratory check"),
               Line2D([], [], color=PAPER, ls="none", marker="D", mfc="none", label="paper-sized effect, claimed side"),
               Patch(color=PAPER, alpha=0.15, label="non-inferiority margin (-delta to 0)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return save_figure(fig, png_path, dpi)
