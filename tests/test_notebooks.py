"""Stepping through: every stage notebook executed as a researcher runs it in JupyterLab, and what it shows.

Each of notebooks 01-08 runs in a kernel of its own (JupyterLab starts one per notebook), from ``notebooks/``, with
the smoke preset and nothing else set, into one run folder. The notebooks must show:

- no stderr (a red block in JupyterLab) but the package's deliberate warnings (`DELIBERATE_WARNINGS`): no library
  progress bars ("Loading weights", "Writing model shards"), no library messages, no tqdm "IProgress not found";
- one progress bar per step, as a widget, where a stage trains or evaluates, and none elsewhere (a library bar that
  came back as a widget is one too many);
- no absolute path in any output (a notebook's outputs end up in exported HTML);
- for stages 02-08, a picture at the end: what the stage measured, read from the run's files.
"""

import json
import re
import sys
from pathlib import Path

import pytest

from synthflaw import config, progress
from synthflaw.progress import DEBUG_ENV
from synthflaw.registry import EVALUATE, STAGES, stage_variants

slow = pytest.mark.slow  # the smoke study, one kernel per notebook

WIDGET = "application/vnd.jupyter.widget-view+json"

# The warnings the package means a researcher to see (warnings.warn / logging in synthflaw), as regular
# expressions on a notebook's stderr. Nothing else may reach stderr.
DELIBERATE_WARNINGS = (
    r"UserWarning: \d+ of \d+ SFT chats had no assistant token within max_length",  # training/sft.py
    r"is incomplete \(.*\), probably cut by a kill during a save",  # training/checkpoints.py
    r"UserWarning: the generator .* produced no parseable Q-A pair",  # data/synthqa_generation.py
)
# Absolute paths: this machine's folders, and the usual roots of any other.
ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:tmp|home|root|usr|opt|var|work|mnt|srv|Users|private)/")


def output_texts(output) -> list[str]:
    """Every text an output carries: a stream's, each text MIME type's, an error's traceback."""
    if output["output_type"] == "stream":
        return ["".join(output["text"])]
    if output["output_type"] == "error":
        return ["\n".join(output["traceback"])]
    return [v if isinstance(v, str) else "".join(v) for k, v in output.get("data", {}).items()
            if k.startswith("text/") or k == "application/json"]


@pytest.fixture(scope="module")
def stepped_through(smoke_notebooks):
    """{"run": folder, "notebooks": {stage name: executed notebook}}: conftest's `smoke_notebooks`."""
    return smoke_notebooks


@slow
def test_no_stderr_but_the_deliberate_warnings(stepped_through):
    unexpected = []
    for name, notebook in stepped_through["notebooks"].items():
        for cell in notebook["cells"]:
            for output in cell.get("outputs", []):
                if output["output_type"] == "stream" and output["name"] == "stderr":
                    text = "".join(output["text"])
                    if text.strip() and not any(re.search(w, text) for w in DELIBERATE_WARNINGS):
                        unexpected.append(f"{name}: {text.strip()[:200]!r}")
    assert not unexpected, "stderr in the notebooks:\n" + "\n".join(unexpected)


@slow
def test_no_absolute_path_in_any_output(stepped_through):
    prefixes = {str(stepped_through["run"]), str(Path(__file__).resolve().parent.parent), sys.prefix,
                str(Path.home())}
    found = []
    for name, notebook in stepped_through["notebooks"].items():
        for cell in notebook["cells"]:
            for output in cell.get("outputs", []):
                for text in output_texts(output):
                    if ABSOLUTE.search(text) or any(p in text for p in prefixes):
                        match = ABSOLUTE.search(text)
                        where = match.start() if match else 0
                        found.append(f"{name}: ...{text[max(0, where - 60):where + 100]!r}")
    assert not found, "absolute paths in the outputs:\n" + "\n".join(found)


@slow
def test_one_widget_bar_per_training_or_evaluation_step(stepped_through):
    cfg = config.resolve("smoke")
    for stage in STAGES:
        steps = stage_variants(cfg, stage) if stage.variants else [stage.name]
        expected = len(steps) if stage.trains or stage is EVALUATE else 0
        bars = [o for c in stepped_through["notebooks"][stage.name]["cells"] for o in c.get("outputs", [])
                if WIDGET in o.get("data", {})]
        assert len(bars) == expected, f"{stage.name}: {len(bars)} widget bars for {len(steps)} steps"
        labels = ["".join(o["data"]["text/plain"]) for o in bars]
        assert all(any(label.startswith(step) for label in labels) for step in steps[:expected]), labels


@slow
def test_each_stage_ends_with_what_it_measured(stepped_through):
    for stage in STAGES[1:]:  # 01 ends with one record of each data set, as text
        cells = [c for c in stepped_through["notebooks"][stage.name]["cells"] if c["cell_type"] == "code"]
        pictures = [o for o in cells[-1]["outputs"] if "image/png" in o.get("data", {})]
        assert pictures, f"{stage.name}'s last cell shows no figure"
    last = [c for c in stepped_through["notebooks"][EVALUATE.name]["cells"] if c["cell_type"] == "code"][-1]
    tables = "".join("".join(o["data"]["text/markdown"]) for o in last["outputs"] if "text/markdown" in o.get("data", {}))
    assert "null:" in tables and "natural" in tables, "07 shows no headline table with the nulls"
    header = tables.splitlines()[0]  # in words with units, the models (and the nulls) as rows
    assert "instructions fully followed, learnable tier (share of prompts)" in header and "learnable_HSR" not in header
    # the stage's own result right after it ran: a table in words too, not a wall of raw keys
    ran = next(c for c in stepped_through["notebooks"][EVALUATE.name]["cells"]
               if c["cell_type"] == "code" and "display.summary(result)" in "".join(c["source"]))
    summary = "".join("".join(o["data"]["text/markdown"]) for o in ran["outputs"] if "text/markdown" in o.get("data", {}))
    assert summary.startswith("| step |") and "learnable_hsr_above_null" not in summary, summary[:300]


def test_debug_mode_leaves_the_libraries_bars_and_messages_on(monkeypatch):
    from transformers.utils import logging

    monkeypatch.setenv(DEBUG_ENV, "1")
    progress.quiet_libraries()
    assert logging.is_progress_bar_enabled() and logging.get_verbosity() == logging.WARNING
    monkeypatch.delenv(DEBUG_ENV)
    progress.quiet_libraries()
    assert not logging.is_progress_bar_enabled() and logging.get_verbosity() == logging.ERROR
