"""The label table (synthflaw.reporting.labels) and the figures that use it: every title and axis is in words, with
its unit, never a raw key; and the same files in give the same PNG bytes out."""

from pathlib import Path

import pytest
from matplotlib.figure import Figure

from synthflaw.records import read_csv
from synthflaw.reporting import labels
from synthflaw.reporting.aggregate import LEARNABLE_LEVEL_PREFIX, LEVEL_PREFIX
from synthflaw.reporting.figures import make_figures
from synthflaw.reporting.forest import plot_forest
from synthflaw.reporting.plots import CURVE_PANELS, plot_headline_ci, plot_hsr_by_level_ci, plot_sft_curve_ci
from synthflaw.reporting.sweep_figures import plot_metric_against_key
from synthflaw.reporting.tables import HEADLINE, NULL_COLUMNS

RUNS = Path(__file__).resolve().parent.parent / "runs"
SEEDS = RUNS / "reference" / "seeds"
SWEEPS = [RUNS / "reference-fraction" / "figures", RUNS / "reference-templates" / "figures"]


def raw_keys_in(text: str) -> list[str]:
    return sorted(k for k in labels.raw_keys() if k in text)


def titles_and_axes(fig: Figure) -> list[str]:
    """Every title (figure and axes) and axis label of a figure."""
    texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.get_title(loc) for loc in ("left", "center", "right")] + [ax.get_xlabel(), ax.get_ylabel()]
    return [t for t in texts if t]


@pytest.fixture
def drawn(monkeypatch):
    """The titles and axis labels of every figure saved while the test runs, by file name."""
    seen: dict[str, list[str]] = {}
    save = Figure.savefig

    def spy(fig, target, *args, **kwargs):
        seen[f"figure {len(seen)}"] = titles_and_axes(fig)
        return save(fig, target, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def assert_in_words(drawn: dict[str, list[str]]) -> None:
    assert drawn, "no figure was drawn"
    raw = {name: [(t, raw_keys_in(t)) for t in texts if raw_keys_in(t)] for name, texts in drawn.items()}
    assert not any(raw.values()), f"raw keys in titles or axes: {raw}"
    untitled = [name for name, texts in drawn.items() if not texts]
    assert not untitled


def test_every_metric_a_figure_or_table_can_show_has_words_a_unit_and_a_direction():
    metrics = {*HEADLINE.values(), *NULL_COLUMNS.values(), *CURVE_PANELS, f"{LEVEL_PREFIX}3",
               f"{LEARNABLE_LEVEL_PREFIX}2"}
    for metric in metrics:
        label = labels.metric(metric)
        assert label.words and label.unit and label.better, metric
        assert not raw_keys_in(label.axis()), (metric, label)
    assert labels.metric(f"{LEARNABLE_LEVEL_PREFIX}2").words == "instructions fully followed, learnable tier, 2 constraints"


def test_a_metric_missing_from_the_table_is_refused_not_shown_raw():
    with pytest.raises(KeyError):
        labels.metric("new_metric_nobody_labelled")


def test_checks_and_keys_read_in_words():
    check = labels.check("pre_sft_template_pull: synthetic - natural")
    assert check.words.endswith(": synthetic - natural") and check.unit == "nats per reply"
    assert labels.check("gain on synthqa_only - gain on stated").unit == labels.metric("benchmark").unit
    fraction = labels.key("cpt.synthetic_fraction")
    assert (fraction.paper, fraction.control_x) == (0.02, 0.0) and "SynthQA" in fraction.axis()
    assert labels.key("sft.learning_rate").words == "peak learning rate"  # any swept key: its configuration help


def test_a_raw_key_in_a_title_is_caught():
    fig = Figure()
    fig.add_subplot().set_title("pre_sft_template_pull vs cpt.synthetic_fraction")
    assert {"cpt.synthetic_fraction", "pre_sft_template_pull"} <= set(raw_keys_in(" ".join(titles_and_axes(fig))))
    assert not raw_keys_in(labels.metric("pre_sft_template_pull").axis())


def test_cross_seed_and_sweep_figures_are_in_words_and_redraw_to_the_committed_bytes(tmp_path, drawn):
    plot_headline_ci(SEEDS / "tables" / "headline_ci.csv", tmp_path / "headline_ci.png")
    plot_hsr_by_level_ci(SEEDS / "hsr_by_level_ci.csv", tmp_path / "hsr_by_level_ci.png")
    plot_sft_curve_ci(SEEDS / "sft_curve_ci.csv", tmp_path / "sft_curve_ci.png")
    plot_forest(SEEDS / "findings_forest.csv", tmp_path / "findings_forest.png")
    for name in ("headline_ci.png", "findings_forest.png", "hsr_by_level_ci.png", "sft_curve_ci.png"):
        assert (tmp_path / name).read_bytes() == (SEEDS / name).read_bytes(), name
    for folder in SWEEPS:
        csv = next(folder.glob("learnable_HSR__*.csv"))
        metric, key = csv.stem.split("__")
        plot_metric_against_key(csv, tmp_path / csv.with_suffix(".png").name, metric, key)
        assert (tmp_path / csv.with_suffix(".png").name).read_bytes() == csv.with_suffix(".png").read_bytes()
        assert any(" - " in r["model"] for r in read_csv(csv))  # the contrast beside the curves
    assert_in_words(drawn)


@pytest.mark.slow
def test_every_figure_of_a_run_and_a_sweep_is_in_words(tmp_path, drawn):
    make_figures(min((RUNS / "reference").glob("seed-*")), tmp_path / "run", 120)  # its first seed
    for folder in SWEEPS:
        for csv in sorted(folder.glob("*__*.csv")):
            metric, key = csv.stem.split("__")
            plot_metric_against_key(csv, tmp_path / csv.with_suffix(".png").name, metric, key)
    assert len(drawn) >= 10 + 2 * 24
    assert_in_words(drawn)
