"""Sweeps: the study over a grid of parameter values, each point a run of its own, steps shared by content.

``synthflaw sweep --preset P --run-id ID --grid cpt.synthetic_fraction=0.1,0.3 --seeds 0 1 2`` (or
:func:`run_sweep`) runs the cartesian product of the grid's values, each point with every seed, into::

    runs/<ID>/sweep.json                        the manifest: the definition (preset, overrides, grid, seeds, the
                                                trend test stated before any point runs), the points and their
                                                folders, the planned sharing, what each shared step was
                                                (computed or reused, from where), the jobs submitted
    runs/<ID>/points/<point>/seed-<k>/          an ordinary run folder per point and seed (`synthflaw.runner`)
    runs/<ID>/points/<point>/seeds/             the point's cross-seed tables (`reporting.aggregate.summarize`)
    runs/<ID>/figures/                          every headline metric against every swept key, the trend tests
    runs/<ID>/slurm/<job id>/                   submitit's files and logs, one folder per job

Sharing. A step depends on its configuration sections only (:func:`synthflaw.runs.step_config`); when its
fingerprint is the same in several points of one seed (stages 01-03 of a sweep over `cpt.synthetic_fraction`), it
is computed once and the other points get its files by hard link (a copy where the file system refuses links), with
its done.json as it was: the product digests and the digests of the upstream steps it read stay valid, and the
runner skips it as done. A step is reused only from a finished, current step whose upstreams were placed in this
point with the same digests. Concurrent points (SLURM jobs, two shells) coordinate through one OS file lock per
(seed, step, fingerprint) under ``runs/<ID>/.claims/``: whoever holds it computes or copies the step, the others wait
and then reuse it.

Executors. `local` runs the points in order in this process; every run is resumable, so a killed sweep given the
same command continues where it stopped. `slurm` submits one submitit job per point (its seeds in order) or per seed
(every point of that seed, the shared steps first), as one job array; a job runs the same functions as `local`.
Running the command again submits only the points (or seeds) not finished; ``--status`` reports each point and the
last job of each, with its error and log.

The code: :mod:`synthflaw.sweep.definition` (the grid, the Sweep and its points, the trend test, the manifest),
:mod:`synthflaw.sweep.sharing` (claims, donors and placing), :mod:`synthflaw.sweep.points` (running a point, a
seed, a point with a seed) and :mod:`synthflaw.sweep.executors` (the status, the local and SLURM executors,
everything at once, the figures).
"""

from synthflaw.sweep.definition import (
    Point,
    Sweep,
    SweepFailed,
    SweepRefused,
    check_reuse_from,
    define_sweep,
    grid_values,
    load_sweep,
    open_sweep,
    parse_grid,
    point_names,
    read_manifest,
    trend_statement,
    update_manifest,
)
from synthflaw.sweep.executors import (
    SlurmOptions,
    draw,
    execute,
    figures,
    finished,
    pending_units,
    point_seed_state,
    run_local,
    run_sweep,
    run_unit,
    sbatch_script,
    slurm_folder,
    status_report,
    status_text,
    submit,
    summarize_points,
    sweep_status,
)
from synthflaw.sweep.points import run_point, run_point_seed, run_seed, summarize_point

__all__ = [
    "Point",
    "SlurmOptions",
    "Sweep",
    "SweepFailed",
    "SweepRefused",
    "check_reuse_from",
    "define_sweep",
    "draw",
    "execute",
    "figures",
    "finished",
    "grid_values",
    "load_sweep",
    "open_sweep",
    "parse_grid",
    "pending_units",
    "point_names",
    "point_seed_state",
    "read_manifest",
    "run_local",
    "run_point",
    "run_point_seed",
    "run_seed",
    "run_sweep",
    "run_unit",
    "sbatch_script",
    "slurm_folder",
    "status_report",
    "status_text",
    "submit",
    "summarize_point",
    "summarize_points",
    "sweep_status",
    "trend_statement",
    "update_manifest",
]
