"""Figures of the data analysis (stage 02), drawn from its CSVs only: t-SNE, the token-frequency KDE, lengths."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from synthflaw.records import read_csv
from synthflaw.reporting.plots import colors, new_figure, save_figure


def _rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = read_csv(path, required)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["set"], []).append(row)
    return groups


def plot_tsne(csv_path: Path, png_path: Path, dpi: int = 150) -> str:
    """Scatter of the t-SNE rows of tsne.csv, one colour per set. t-SNE axes have no units: read clusters and
    overlap, not distances between far-apart clusters."""
    groups = _groups(_rows(csv_path, ("set", "x", "y")))
    palette = colors(list(groups))
    fig, ax = new_figure()
    for name, rows in groups.items():
        ax.scatter([float(r["x"]) for r in rows], [float(r["y"]) for r in rows], s=8, alpha=0.6,
                   color=palette[name], label=f"{name} (n={len(rows)})", edgecolors="none")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title("Sentence embeddings per text set, t-SNE\n(axes have no unit: read clusters and overlap)", fontsize=10)
    ax.legend(markerscale=2)
    return save_figure(fig, png_path, dpi)


def _kde(centres: np.ndarray, weights: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Weighted Gaussian KDE: f(x) = sum_i w_i N(x; c_i, h^2) / sum_i w_i, in units of 1/decade."""
    z = (grid[:, None] - centres[None, :]) / bandwidth
    return (np.exp(-0.5 * z ** 2) * weights[None, :]).sum(1) / (weights.sum() * bandwidth * math.sqrt(2 * math.pi))


def _peak_labels(points: list[tuple[float, str]], width: float) -> list[tuple[float, str]]:
    """Tokens closer than `width` on the x axis share one label (at the first, most frequent one), so labels of
    one peak do not overprint each other. `points` come most frequent first."""
    clusters: list[tuple[float, list[str]]] = []
    for x, token in points:
        near = next((c for c in clusters if abs(c[0] - x) < width), None)
        if near:
            near[1].append(token)
        else:
            clusters.append((x, [token]))
    return [(x, " ".join(tokens)) for x, tokens in clusters]


def token_kde_curves(rows: list[dict], bandwidth: float = 0.05, points: int = 1200
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The curves of `plot_token_kde` from token-frequency rows: a grid of log10(rank) values and, per set, the
    weighted KDE of its token occurrences on that grid (each curve integrates to ~1 over log10 rank)."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive (in decades of rank), got {bandwidth}")
    top = max(int(r["rank"]) for r in rows)
    grid = np.linspace(-6 * bandwidth, math.log10(top) + 6 * bandwidth, points)
    curves = {}
    for name, group in _groups(rows).items():
        centres = np.log10([int(r["rank"]) for r in group])
        curves[name] = _kde(centres, np.array([float(r["count"]) for r in group]), grid, bandwidth)
    return grid, curves


def plot_token_kde(csv_path: Path, png_path: Path, bandwidth: float = 0.05, annotate: int = 5,
                   dpi: int = 150) -> str:
    """Kernel density of each set's token occurrences over the shared token-rank axis of token_frequency.csv.

    x axis: the token's rank in the reference set (1 = its most frequent token), log scale; tokens the reference
    never uses sit right of the dashed line. y axis: density of the set's token occurrences per decade of rank
    (Gaussian KDE on log10(rank), every occurrence one sample, bandwidth `bandwidth` decades, the same for all
    sets; each curve has area 1). A natural corpus spreads its mass over many ranks; a templated one piles it onto
    a few tokens, which show as sharp peaks. Labels: the reference's `annotate` most frequent tokens, and each other
    set's `annotate` most frequent tokens among those at least twice as frequent as in the reference (its peaks
    that rise above the reference's). The legend gives each set's share of tokens the reference never uses."""
    rows = _rows(csv_path, ("set", "token", "rank", "count", "in_reference", "reference"))
    reference = rows[0]["reference"]
    top_rank = max(int(r["rank"]) for r in rows)
    ref_vocab = max((int(r["rank"]) for r in rows if r["in_reference"] == "1"), default=0)
    grid, curves = token_kde_curves(rows, bandwidth)
    palette = colors(list(curves))
    fig, ax = new_figure((8.0, 4.8))
    ref_share = {r["token"]: float(r["share"]) for r in rows if r["set"] == reference}
    for name, group in _groups(rows).items():
        label = name
        if name != reference:
            outside = sum(float(r["share"]) for r in group if r["in_reference"] != "1")
            label = f"{name} ({outside:.0%} of tokens not in {reference})"
        ax.plot(10 ** grid, curves[name], color=palette[name], lw=1.2, label=label)
        ax.fill_between(10 ** grid, curves[name], color=palette[name], alpha=0.15, lw=0)
        by_count = sorted(group, key=lambda r: (-float(r["count"]), int(r["rank"])))
        if name != reference:  # label where this set's peaks rise above the reference's
            by_count = [r for r in by_count if float(r["share"]) >= 2 * ref_share.get(r["token"], 0.0)]
        top = by_count[:annotate]
        for x, label in _peak_labels([(math.log10(int(r["rank"])), r["token"]) for r in top], 2 * bandwidth):
            y = float(np.interp(x, grid, curves[name]))
            ax.annotate(label, (10 ** x, y), xytext=(0, 3), textcoords="offset points", ha="center",
                        fontsize=8, color=palette[name], parse_math=False)
    if 0 < ref_vocab < top_rank:
        ax.axvline(ref_vocab + 0.5, color="0.4", ls="--", lw=0.8)
        ax.text(ref_vocab + 0.5, 0.2, f"not in {reference} \u2192", transform=ax.get_xaxis_transform(),
                rotation=90, fontsize=8, color="0.4", ha="right", va="center")
    ax.set_ylim(0, 1.15 * max(c.max() for c in curves.values()))  # headroom for the labels
    ax.set_xscale("log")
    ax.set_xlabel(f"token rank in {reference} (log scale)")
    ax.set_ylabel(f"density of token occurrences per decade\n(Gaussian KDE, bandwidth {bandwidth} decade)")
    ax.set_title("Token frequencies: structural tokens of a template show as sharp peaks")
    ax.legend()
    return save_figure(fig, png_path, dpi)


def plot_lengths(csv_path: Path, png_path: Path, bins: int = 40, dpi: int = 150) -> str:
    """Histograms (shared bins, normalised to density) of text length in words per set, from lengths.csv."""
    groups = _groups(_rows(csv_path, ("set", "words")))
    palette = colors(list(groups))
    words = {name: np.array([int(r["words"]) for r in rows]) for name, rows in groups.items()}
    edges = np.histogram_bin_edges(np.concatenate(list(words.values())), bins=bins)
    fig, ax = new_figure()
    for name, values in words.items():
        ax.hist(values, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=palette[name],
                label=f"{name} (mean {values.mean():.1f})")
    ax.set_xlabel("length (whitespace-separated words)")
    ax.set_ylabel("share of texts per word of length (density)")
    ax.set_title("Text lengths per set")
    ax.legend()
    return save_figure(fig, png_path, dpi)


# The figures of a stage-02 folder: CSV -> (PNG, the function that draws it).
DATA_FIGURES = {"tsne.csv": ("tsne.png", plot_tsne), "token_frequency.csv": ("token_kde.png", plot_token_kde),
                "lengths.csv": ("lengths.png", plot_lengths)}


def plot_data_figures(src: Path, out: Path | None = None) -> list[str]:
    """Draw the figures of the stage-02 CSVs found in `src` into `out` (default `src`); the PNG names drawn."""
    src = Path(src)
    out = Path(out) if out is not None else src
    return [plot(src / csv_name, out / png) for csv_name, (png, plot) in DATA_FIGURES.items()
            if (src / csv_name).exists()]
