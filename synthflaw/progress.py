"""One progress bar per step, and the libraries' own bars and messages off.

A step shows one bar: training its optimizer steps with the loss and tokens/s (`synthflaw.training.scaffold`),
evaluation the endpoint it is measuring (`synthflaw.metrics.evaluation`). Left alone, transformers adds a bar per
model load ("Loading weights") and per save ("Writing model shards"), and its warnings: in a notebook each is a red
stderr block (or, with ipywidgets, a widget of its own), several per step, and the step's own lines sit between them. `quiet_libraries`
turns them off through the libraries' own switches, once per process, before a stage runs. With ``SYNTHFLAW_DEBUG=1``
in the environment it turns them on instead.

Bars are tqdm.auto's: a widget in JupyterLab (ipywidgets is a dependency; without it tqdm warns "IProgress not
found", with its own absolute path, and falls back to text), text in a console. The runner's batch kernel sets
``SYNTHFLAW_TEXT_BARS=1``: no one watches a widget there, and a widget saved in an executed notebook shows in its
HTML export as nothing, or as the 0% it had when first drawn, where a text bar keeps its last line.
"""

from __future__ import annotations

import contextlib
import os
import time

DEBUG_ENV = "SYNTHFLAW_DEBUG"
TEXT_BARS_ENV = "SYNTHFLAW_TEXT_BARS"


def debug() -> bool:
    """Whether the libraries' bars and messages stay on (``SYNTHFLAW_DEBUG`` set to anything but "", "0")."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def quiet_libraries() -> None:
    """The libraries' progress bars and info/warning messages off (on, at their defaults, in debug mode)."""
    import datasets
    from transformers.utils import logging

    if debug():
        logging.enable_progress_bar()  # transformers' own and huggingface_hub's
        logging.set_verbosity_warning()
        datasets.enable_progress_bars()
        datasets.logging.set_verbosity_warning()
    else:
        logging.disable_progress_bar()  # transformers' own and huggingface_hub's
        logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def bar(total: int, desc: str, **kwargs):
    """A tqdm bar: a widget in a notebook, text in a console or where ``SYNTHFLAW_TEXT_BARS=1``."""
    if os.environ.get(TEXT_BARS_ENV, "") not in ("", "0"):
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, **kwargs)


class Endpoints:
    """A bar over the named parts of one measurement: shows which is being measured, and times each.

    ``with endpoints.measuring("benchmark"): ...`` sets the bar's postfix, then advances it and records
    ``timings["benchmark_s"]``.
    """

    def __init__(self, total: int, desc: str):
        self.bar = bar(total, desc, unit="endpoint")
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def measuring(self, name: str):
        self.bar.set_postfix_str(name)
        started = time.perf_counter()
        yield
        self.timings[f"{name}_s"] = time.perf_counter() - started
        self.bar.update()

    def close(self) -> None:
        self.bar.set_postfix_str("done")
        self.bar.close()
