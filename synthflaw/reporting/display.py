"""What the notebooks show: a step's figures and tables, loss curves, and a few samples of an evaluation."""

from __future__ import annotations

from pathlib import Path

from synthflaw.records import read_jsonl
from synthflaw.reporting.plots import plot_loss_csv


def show(path: Path, pattern: str = "*.png") -> None:
    """Display the headline table (if any) and every figure matching `pattern` in a folder, in a notebook."""
    from IPython.display import Image, Markdown, display

    path = Path(path)
    table = path / "tables" / "headline.md"
    if table.exists():
        display(Markdown(table.read_text()))
    for png in sorted(path.glob(pattern)):
        display(Markdown(f"**{png.name}**"), Image(filename=str(png)))


def show_loss_curves(step_paths: dict[str, Path]) -> None:
    """Draw (from its loss.csv) and display the loss curve of each finished training step: {label: step folder}."""
    from IPython.display import Image, Markdown, display

    for label, path in step_paths.items():
        if (path / "loss.csv").exists():
            plot_loss_csv(path / "loss.csv", path / "loss.png")
            display(Markdown(f"**{label}**"), Image(filename=str(path / "loss.png")))


def show_samples(samples_path, n: int = 6) -> str:
    """The first `n` instruction-following samples with their per-constraint verdicts, for reading in a notebook."""
    rows = [r for r in read_jsonl(Path(samples_path)) if r.get("task") == "instruction"][:n]
    parts = []
    for r in rows:
        verdicts = ", ".join(f"{c['type']}={'ok' if v else 'FAIL'}" for c, v in zip(r["constraints"], r["verdicts"]))
        parts.append(f"--- level {r.get('level')}: {r['prompt']}\n>>> {r['response']}\n[{verdicts}]")
    return "\n\n".join(parts)
