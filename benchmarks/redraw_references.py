"""Redraw the figures, tables and indexes of the committed runs under runs/ in place, from their own files, after a
change to synthflaw.reporting: what `synthflaw figures` and `synthflaw sweep --figures-only` draw, kept by the
export's rules.

- the first seed's stage-02 figures in `02_data_flaws/` and each training step's `loss.png`;
- every seed's `08_figures/` (PNGs of the first seed only, as the export keeps them), its step resealed over the
  new files (`done.json`'s products; nothing downstream reads stage 08);
- every multi-seed run's and sweep point's `seeds/` (aggregate.json kept: it names the folders the run was made in);
- every sweep's `figures/`.

    PYTHONPATH=. python benchmarks/redraw_references.py            # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from synthflaw.registry import DATA_FLAWS, FIGURES  # noqa: E402
from synthflaw.reporting.aggregate import seed_runs, summarize  # noqa: E402
from synthflaw.reporting.data_plots import plot_data_figures  # noqa: E402
from synthflaw.reporting.figures import make_figures  # noqa: E402
from synthflaw.reporting.plots import plot_loss_csv  # noqa: E402
from synthflaw.reporting.sweep_figures import render  # noqa: E402
from synthflaw.runs import combined_digest, load_marker, product_digests, write_json_atomic  # noqa: E402
from synthflaw.sweep.definition import MANIFEST, read_manifest  # noqa: E402

RUNS = Path(__file__).resolve().parent.parent / "runs"
DRAWN = (".png", ".csv", ".md")


def replace_drawn(source: Path, target: Path, keep_png: bool, skip: tuple[str, ...] = ()) -> None:
    """Make `target`'s drawn files (PNG, CSV, Markdown, at any depth) those of `source`: stale ones removed."""
    for old in [p for p in target.rglob("*") if p.suffix in DRAWN and p.name not in skip]:
        old.unlink()
    for new in source.rglob("*"):
        if new.is_file() and new.name not in skip and (new.suffix != ".png" or keep_png):
            (target / new.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(new, target / new.relative_to(source))


def redraw_figures_step(seed_dir: Path, keep_png: bool) -> None:
    """Stage 08 of one seed, drawn from the seed's files, then its done.json sealed over the new products."""
    step = seed_dir / FIGURES.name
    marker, _ = load_marker(step)
    if marker is None:
        return
    dpi = json.loads((step / "config.json").read_text())["study"]["figures"]["dpi"]
    with tempfile.TemporaryDirectory() as tmp:
        make_figures(seed_dir, Path(tmp), dpi)
        replace_drawn(Path(tmp), step, keep_png)
    products = product_digests(step)
    write_json_atomic(step / "done.json", {**marker, "digest": combined_digest(products), "products": products})


def redraw_run(run_dir: Path) -> None:
    """Every seed's stage 08 and the cross-seed summary of a multi-seed run (or a sweep's point), and the first
    seed's stage-02 figures and training steps' loss curves (PNGs only: no product of a step)."""
    seeds = seed_runs(run_dir)
    for k, seed_dir in enumerate(seeds):
        redraw_figures_step(seed_dir, keep_png=k == 0)
    if seeds and load_marker(seeds[0] / DATA_FLAWS.name)[0] is not None:
        plot_data_figures(seeds[0] / DATA_FLAWS.name)
    for png in sorted(seeds[0].rglob("loss.png")) if seeds else []:  # a training step's own curve (its notebook's)
        plot_loss_csv(png.with_suffix(".csv"), png)
    with tempfile.TemporaryDirectory() as tmp:
        summarize(run_dir, tmp)
        replace_drawn(Path(tmp), run_dir / "seeds", keep_png=True, skip=("aggregate.json",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args()
    for folder in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        if (folder / MANIFEST).exists():
            manifest = read_manifest(folder)
            for point in manifest["points"]:
                redraw_run(folder / point["run"])
            render(folder, manifest)
        elif (folder / "seeds").is_dir():
            redraw_run(folder)
        print("redrawn:", folder.name, flush=True)


if __name__ == "__main__":
    main()
