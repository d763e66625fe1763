"""Executing the study's notebooks: one Python kernel for a run's executions (:func:`notebook_kernel`), the one
papermill call with its error naming the failed cell (:func:`execute_notebook`), and the log lines of a stage's
steps as they finish (:class:`DoneWatcher`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

from synthflaw.progress import TEXT_BARS_ENV
from synthflaw.registry import StepSpec
from synthflaw.resources import shipped
from synthflaw.runs import Step, die_with_parent, held_lock_fds, note_kernel

NOTEBOOKS_DIR = shipped("notebooks")


PARAMETERS_TAG = "parameters"  # papermill puts the run's values right after the cell with this tag


class StepFailed(RuntimeError):
    """A step raised; the message says which cell and where the executed notebook is."""


class NotebookRefused(ValueError):
    """A notebook the runner will not execute: its parameters cell is not tagged once; the message names it and the
    fix."""


def check_parameters_cell(notebook: str | Path) -> None:
    """NotebookRefused unless exactly one cell of `notebook` is tagged `parameters`. Without the tag, papermill puts
    the run's values at the top and the notebook's own defaults (run_dir = "../runs/notebook", for stepping through
    by hand) then replace them: the stage would write outside the run, where no lock, marker or export sees it.
    With two, the second one's defaults would replace the run's values the same way."""
    import nbformat

    cells = nbformat.read(str(notebook), as_version=4).cells
    tagged = [i for i, cell in enumerate(cells) if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if len(tagged) == 1:
        return
    found = "no cell" if not tagged else f"{len(tagged)} cells (cells {', '.join(str(i + 1) for i in tagged)})"
    raise NotebookRefused(
        f"{notebook} has {found} tagged {PARAMETERS_TAG!r}, so papermill would not put the run's values after the "
        "notebook's own defaults and the stage would write outside the run; nothing was executed. Tag the one cell "
        f"that sets run_dir, preset and overrides {PARAMETERS_TAG!r} (JupyterLab: the property inspector, Cell Tags), "
        "or restore the notebook (git checkout -- notebooks/)")


@contextlib.contextmanager
def notebook_kernel(cwd: Path):
    """One Python kernel for a run's notebook executions, shut down at the end.

    The kernel writes into the run, so it must not outlive the runner that holds the run's lock: it inherits the
    lock of every run folder this process holds (the lock stays held while the kernel lives, so a retry is refused
    instead of writing beside it), and on Linux it is killed the moment the runner ends, however it ends
    (``kill -9`` included; elsewhere ipykernel's own check of its parent stops it within a second).

    IPC transport: the kernel listens on local socket files, not TCP ports (nothing else on the host can connect, and
    the kernel has nothing to warn about). The files go into a private temporary folder named by its absolute path:
    a relative name would be taken from the kernel's `cwd` by the kernel and from this process's working directory by
    the client, which differ as soon as synthflaw runs from another folder than the notebooks'. Its progress bars are text (`synthflaw.progress`): no one watches a widget
    in a batch, and a text bar keeps its last line in the executed notebook and its HTML.
    """
    from jupyter_client import KernelManager

    with tempfile.TemporaryDirectory(prefix="synthflaw-kernel-") as sockets:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
        km.start_kernel(cwd=str(cwd), env={**os.environ, TEXT_BARS_ENV: "1"}, pass_fds=held_lock_fds(),
                        preexec_fn=die_with_parent())
        note_kernel(getattr(km.provisioner, "pid", None))  # the local provisioner's; another may not say
        try:
            yield km
        finally:
            km.shutdown_kernel(now=True)
            km.cleanup_resources()
            note_kernel(None)


def _reset_namespace(km) -> None:
    """Forget what the previous notebook defined (and restart the execution count); imports stay loaded."""
    client = km.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        # tqdm.auto warns, naming its file in the virtual environment, when ipywidgets is missing: the warning went
        # into every notebook that imports it, and its absolute path into the exports
        client.execute_interactive("get_ipython().reset(new_session=True); __import__('warnings').filterwarnings("
                                   "'ignore', message='IProgress not found')", timeout=120,
                                   output_hook=lambda msg: None)
    finally:
        client.stop_channels()


def execute_notebook(notebook: str | Path, out: Path, parameters: dict, km, what: str,
                     failure: type[Exception] | None = None) -> None:
    """Execute `notebook` into `out` with `parameters` in the kernel `km` (its namespace reset first); `failure`
    (StepFailed by default) naming `what`, the cell and the executed notebook when a cell raises. A notebook whose
    parameters cell is not tagged once is refused before it runs (:func:`check_parameters_cell`)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    check_parameters_cell(notebook)  # before the kernel runs anything of it
    _reset_namespace(km)
    try:
        # coalesce_streams: a cell's text bars are kept as their last lines, not as every redraw
        pm.execute_notebook(str(notebook), str(out), parameters=parameters, progress_bar=False,
                            cwd=str(NOTEBOOKS_DIR.parent), kernel_name="python3", km=km, coalesce_streams=True)
    except PapermillExecutionError as err:
        raise (failure or StepFailed)(f"{what} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); the "
                                      f"executed notebook is {out}") from err


class DoneWatcher:
    """Logs a line as each step of one notebook execution finishes (its done.json appears).

    The notebook's own lines go into the notebook, and one execution can last many minutes (a stage's SFTs), so
    without this the console says nothing until the whole stage is done. A background thread polls the markers;
    leaving the context stops it and logs what finished since its last look.
    """

    def __init__(self, todo: list[tuple[StepSpec, Step]], line, log, interval: float = 0.5):
        self._pending, self._line, self._log, self._interval = list(todo), line, log, interval
        self._last = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="synthflaw-progress", daemon=True)

    def __enter__(self) -> "DoneWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sweep()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self._sweep()

    def _sweep(self) -> None:
        for spec, step in list(self._pending):
            if step.done:
                now = time.time()
                self._log(self._line(spec, now - self._last))
                self._last = now
                self._pending.remove((spec, step))
