"""The study's steps, in order, and the runner that executes them.

A step is a stage plus a variant (a CPT branch, an unlearning method, a model to fine-tune or evaluate); each step
has its own folder. With ``engine="papermill"`` (the batch path) the runner executes each stage's notebook once,
for all of the stage's unfinished variants, into ``<run>/<stage>/notebook.ipynb``. Starting a kernel and importing
torch and transformers costs seconds per execution, so a run starts one kernel and executes every stage's notebook
in it, resetting the notebook namespace in between (the imported modules stay loaded; what a notebook defines does
not reach the next one). ``engine="inprocess"`` calls the same library functions without notebooks. Each step is
marked done as it finishes. The order and the fan-out are :mod:`synthflaw.registry`'s.

What a run may trust (:func:`plan_run`, before anything is written, with the run folder locked): a finished step
whose products or upstreams changed (stale), or whose configuration changed, is refused unless `overwrite`, which
runs it and everything downstream of it again; an upstream outside the stages asked for must be finished and
current, since nothing will redo it. While the run goes on, a finished step whose upstream ran again in it runs
again too (the data flow), and a half-done step whose upstream ran again starts over instead of resuming: the
lifecycle's one decision (:func:`synthflaw.runs.decide`), which a notebook's `run_stage` asks too.

The rooms: :mod:`~synthflaw.runner.study` (a Study resolved once, running it, several seeds, the figures again),
:mod:`~synthflaw.runner.plan` (what a run may trust) and :mod:`~synthflaw.runner.notebooks` (the kernel, the one
papermill call, the progress lines).
"""

from synthflaw.runner.notebooks import NOTEBOOKS_DIR, DoneWatcher, StepFailed, execute_notebook, notebook_kernel
from synthflaw.runner.plan import Plan, Problem, plan_run, upstream_candidates
from synthflaw.runner.study import (
    ENGINES,
    Study,
    regenerate,
    resolve_study,
    run_seeds,
    run_study,
    status_text,
    summarize_seeds,
)

__all__ = [
    "ENGINES",
    "NOTEBOOKS_DIR",
    "DoneWatcher",
    "Plan",
    "Problem",
    "StepFailed",
    "Study",
    "execute_notebook",
    "notebook_kernel",
    "plan_run",
    "regenerate",
    "resolve_study",
    "run_seeds",
    "run_study",
    "status_text",
    "summarize_seeds",
    "upstream_candidates",
]
