"""What the notebooks show: a step's figures and tables, loss curves, and a few samples of an evaluation."""

from __future__ import annotations

import tempfile
from pathlib import Path

from synthflaw.records import read_jsonl
from synthflaw.reporting.figures import headline_table, hsr_by_level
from synthflaw.reporting.plots import plot_loss_csv
from synthflaw.reporting import labels
from synthflaw.reporting.tables import HEADLINE, markdown_table


def show(path: Path, pattern: str = "*.png") -> None:
    """Display the folder's index of figures and the headline table (if any), then every figure matching `pattern`
    in it, in a notebook."""
    from IPython.display import Image, Markdown, display

    path = Path(path)
    if (path / "README.md").exists():
        display(Markdown((path / "README.md").read_text()))
    table = path / "tables" / "headline.md"
    if table.exists():
        display(Markdown(table.read_text()))
    for png in sorted(path.glob(pattern)):
        display(Markdown(f"**{png.name}**"), Image(filename=str(png)))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return f"{len(value)} {'entries' if isinstance(value, dict) else 'items'}"
    text = "-" if value is None else str(value)
    return text if len(text) <= 40 else text[:39] + "..."


def summary(result: dict) -> None:
    """A stage's result as a small table in words, a row per step (a model, a branch, a method): each number under
    its name and unit from the label table (`labels.result_field`), to 4 digits; texts, lists and dicts are left to
    each step's result.json, which holds the whole result. The table and figures the notebook shows next stay in
    view."""
    from IPython.display import Markdown, display

    steps = result if result and all(isinstance(v, dict) for v in result.values()) else {"result": result}
    rows = []
    for name, values in steps.items():
        row = {"step": name}
        for key, value in values.items():
            if isinstance(value, (bool, int, float)) and value is not None:
                row[labels.result_field(key, HEADLINE)] = _cell(value)
        rows.append(row)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    display(Markdown(markdown_table(rows, columns, fmt=lambda v: "" if v is None else str(v)) if rows else
                     "(no step ran)"))


def in_words(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Table rows whose metric columns (headline columns such as ``learnable_HSR``) are renamed to their words and
    unit from the label table; other columns kept. Returns the rows and their columns in order."""
    def name(column: str) -> str:
        try:
            label = labels.metric(column)
        except KeyError:
            return column
        return f"{label.words} ({label.unit})"

    renamed = [{name(k): v for k, v in row.items()} for row in rows]
    return renamed, list(dict.fromkeys(c for row in renamed for c in row))


def show_loss_curves(step_paths: dict[str, Path]) -> None:
    """Draw (from its loss.csv) and display the loss curve of each finished training step: {label: step folder}."""
    from IPython.display import Image, Markdown, display

    for label, path in step_paths.items():
        if (path / "loss.csv").exists():
            plot_loss_csv(path / "loss.csv", path / "loss.png")
            display(Markdown(f"**{label}**"), Image(filename=str(path / "loss.png")))


def show_evaluation(run_dir) -> None:
    """Display the headline table and the instruction-following figure (HSR by number of constraints, both tiers)
    of every finished evaluation of a run, with the null replies, as stage 08 draws them from the metrics.json
    files. Drawn in a temporary folder: stage 07's notebook shows them without writing into the run."""
    from IPython.display import Image, Markdown, display

    with tempfile.TemporaryDirectory() as tmp:
        rows = headline_table(Path(run_dir), Path(tmp))
        if rows:  # models and null replies as rows, each measure in words with its unit
            renamed, columns = in_words(rows)
            display(Markdown(markdown_table(renamed, columns)))
        for name in hsr_by_level(Path(run_dir), Path(tmp), dpi=100):
            display(Markdown(f"**{name}**"), Image(data=(Path(tmp) / name).read_bytes(), format="png"))


def show_samples(samples_path, n: int = 6) -> str:
    """The first `n` instruction-following samples with their per-constraint verdicts, for reading in a notebook."""
    rows = [r for r in read_jsonl(Path(samples_path)) if r.get("task") == "instruction"][:n]
    parts = []
    for r in rows:
        verdicts = ", ".join(f"{c['type']}={'ok' if v else 'FAIL'}" for c, v in zip(r["constraints"], r["verdicts"]))
        parts.append(f"--- level {r.get('level')}: {r['prompt']}\n>>> {r['response']}\n[{verdicts}]")
    return "\n\n".join(parts)
