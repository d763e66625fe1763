"""The findings as a forest plot: one row per check, grouped by finding (primary checks first), its interval, 0,
the paper-sized effect where one is registered, and the verdict at the right (`findings_forest.csv` beside it).

The checks' endpoints have different units (HSR, nats per token, nats per reply, accuracy), so each row is drawn in
the units of its own yardstick, written in its label: the paper-sized effect delta where the endpoint has one (the
dotted lines at -1 and +1 are then the paper's effect), else the check's minimum detectable difference at these
seeds (a row reaching past +-1 is then larger than what these seeds could resolve).
"""

from __future__ import annotations

from pathlib import Path

from synthflaw.records import read_csv, write_csv
from synthflaw.reporting.plots import new_figure, save_figure
from synthflaw.reporting.tables import num

COLUMNS = ["finding", "check", "family", "mean", "low", "high", "scale", "scale_kind", "verdict"]
VERDICT_COLOURS = {"reproduces": "tab:green", "reversed": "tab:red", "paper-sized effect excluded": "tab:blue",
                   "inconclusive": "tab:gray"}


def forest_rows(found: list[dict]) -> list[dict]:
    """The forest's rows from `findings.findings` (checks with an interval only)."""
    rows = []
    for f in found:
        for c in f["checks"]:
            if c["ci"] is None:
                continue
            scale, kind = (c["delta"], "paper-sized effect") if c.get("delta") else (c.get("mdd"), "MDD")
            if not scale:
                continue
            rows.append({"finding": f["id"], "check": c["check"], "family": "primary" if c["primary"] else
                         "exploratory", "mean": c["value"], "low": c["ci"][0], "high": c["ci"][1], "scale": scale,
                         "scale_kind": kind, "verdict": c["verdict"]})
    return rows


def write_forest(found: list[dict], out_dir, dpi: int = 120) -> str | None:
    """findings_forest.csv and .png in `out_dir`; None when no check has an interval (one seed)."""
    rows = forest_rows(found)
    if not rows:
        return None
    out = Path(out_dir)
    write_csv(out / "findings_forest.csv", rows, COLUMNS)
    return plot_forest(out / "findings_forest.csv", out / "findings_forest.png", dpi)


def plot_forest(csv_path, png_path, dpi: int = 120) -> str:
    """The forest from its CSV alone."""
    rows = read_csv(csv_path, required=tuple(COLUMNS))
    fig, ax = new_figure((11.0, 0.42 * len(rows) + 1.6))
    labels, verdicts = [], []
    for y, r in enumerate(reversed(rows)):
        scale = num(r["scale"])
        low, mean, high = (num(r[k]) / scale for k in ("low", "mean", "high"))
        colour = VERDICT_COLOURS.get(r["verdict"], "tab:gray")
        ax.plot([low, high], [y, y], color=colour, lw=2.4 if r["family"] == "primary" else 1.2)
        ax.plot([mean], [y], "o", color=colour, ms=5 if r["family"] == "primary" else 3.5)
        verdicts.append((r["verdict"], colour))
        labels.append(f"{r['finding']}: {r['check']}  [unit: {r['scale_kind']} = {scale:.3g}]"
                      + ("" if r["family"] == "primary" else " (exploratory)"))
    ax.axvline(0, color="black", lw=0.8)
    for x in (-1, 1):
        ax.axvline(x, color="tab:purple", lw=0.8, ls=":")
    ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    right = ax.twinx()  # the verdicts as right-hand tick labels, so the layout makes room for them
    right.set_ylim(ax.get_ylim())
    right.set_yticks(range(len(verdicts)), [v for v, _ in verdicts], fontsize=7.5)
    for tick, (_, colour) in zip(right.get_yticklabels(), verdicts):
        tick.set_color(colour)
    ax.set_xlabel("contrast / its unit (dotted: +-1 unit); thick: primary checks")
    ax.set_title("Findings: 95% intervals in units of the paper-sized effect (else the MDD)", fontsize=10)
    return save_figure(fig, png_path, dpi)
