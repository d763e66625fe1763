"""Sweeps: the grid and its errors, the manifest, steps shared by content (and their claim under two processes),
resuming, the submitit executors, the sbatch file, and the figures with the trend test."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scipy.special import stdtrit

from synthflaw import cli, config, runs
from synthflaw import sweep as sweeps
from synthflaw.config import ConfigError
from synthflaw.export import export_sweep, unfinished_steps
from synthflaw.records import read_csv
from synthflaw.reporting import sweep_figures
from synthflaw.runs import Step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
CHEAP = ["01", "02", "03"]  # stages that train nothing heavy on the smoke preset (a few seconds a seed)
QUIET = dict(engine="inprocess", log=lambda line: None)
# every stage of a smoke point, with the fewest models and evaluations that still draw every sweep figure
LEAN_POINT = {"cpt.branches": ("natural", "synthetic"), "unlearn.methods": (), "sft.positive_control": False,
              "sft.curve_points": 1, "evaluate.speed_prompts": 0}


def quiet_lines():
    lines = []
    return lines, lines.append


# --------------------------------------------------------------------------------------------------------------
# The grid, the points, the manifest
# --------------------------------------------------------------------------------------------------------------

def test_grid_parses_values_by_type():
    grid = sweeps.parse_grid(["cpt.synthetic_fraction=0.1, 0.30", "sft.epochs=1,2",
                              "cpt.branches=natural,synthetic;natural"])
    assert grid == {"cpt.synthetic_fraction": [0.1, 0.3], "sft.epochs": [1.0, 2.0],
                    "cpt.branches": [("natural", "synthetic"), ("natural",)]}


@pytest.mark.parametrize("pairs, expected", [
    (["cpt.synthetic_fraction"], "not of the form key=v1,v2"),
    (["cpt.synthetic_fracton=0.1"], "Did you mean cpt.synthetic_fraction"),
    (["cpt.synthetic_fraction=0.1,abc"], "cpt.synthetic_fraction expects float, got 'abc'"),
    (["seed=0,1"], "--seeds"),
    (["sft.epochs=1", "sft.epochs=2"], "given twice"),
    (["sft.epochs=1,1.0"], "repeats a value"),
    (["sft.epochs="], "has no values"),
])
def test_bad_grid_is_a_config_error_naming_the_key(pairs, expected):
    with pytest.raises(ConfigError, match=expected):
        sweeps.parse_grid(pairs)


@pytest.mark.parametrize("grid, expected", [("cpt.synthetic_fraction=0.1,abc", "expects float"),
                                            ("cpt.synthetic_fraction=0.1,1.5", "point cpt.synthetic_fraction=1.5"),
                                            ("no.such=1", "unknown parameter")])
def test_cli_refuses_a_bad_grid_before_writing_anything(tmp_path, capsys, grid, expected):
    code = cli.main(["sweep", "--preset", "smoke", "--run-id", "s", "--runs-root", str(tmp_path), "--grid", grid])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_points_are_the_cartesian_grid_with_plain_names():
    sweep = sweeps.define_sweep("smoke", "s", ["cpt.synthetic_fraction=0.1,0.3", "cpt.more_natural_from=synthetic,"
                                               "natural"], seeds=[0, 1], runs_root="runs")
    assert [p.name for p in sweep.points] == [
        "cpt.synthetic_fraction=0.1,cpt.more_natural_from=synthetic",
        "cpt.synthetic_fraction=0.1,cpt.more_natural_from=natural",
        "cpt.synthetic_fraction=0.3,cpt.more_natural_from=synthetic",
        "cpt.synthetic_fraction=0.3,cpt.more_natural_from=natural"]
    assert sweep.config(sweep.points[3], 1).cpt.synthetic_fraction == 0.3 and sweep.config(sweep.points[3], 1).seed == 1
    # names that a folder cannot hold fall back to numbered ones
    assert sweeps.point_names([{"base.model_name_or_path": "org/model"}]) == ["base.model_name_or_path=org_model"]
    assert sweeps.point_names([{"k": "x" * 120}, {"k": "y" * 120}]) == ["point-000", "point-001"]


def test_manifest_states_the_trend_test_and_refuses_another_definition(tmp_path):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "s", ["cpt.synthetic_fraction=0.1,0.3",
                                                                 "cpt.more_natural_from=synthetic,natural"],
                                                  seeds=[0, 1], runs_root=tmp_path), log=lambda _: None)
    manifest = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert manifest["preset"] == "smoke" and manifest["seeds"] == [0, 1]
    assert manifest["grid"]["cpt.synthetic_fraction"] == [0.1, 0.3]
    assert [p["run"] for p in manifest["points"]] == [f"points/{p.name}" for p in sweep.points]
    trend = manifest["trend_test"]
    assert trend["keys"] == ["cpt.synthetic_fraction"] and "cpt.more_natural_from" in trend["not_tested"]
    assert trend["metrics"][:6] == trend["primary"] and (trend["treated"], trend["control"]) == ("synthetic", "natural")
    # stages 01-03 do not read cpt: one step per seed for all four points; the natural branch does not read the
    # share: one step per value of cpt.more_natural_from (which it does read, as part of cpt), for two points each;
    # nor does the positive control, fine-tuned from natural's CPT model
    shared = manifest["planned_sharing"]["seed-0"]
    assert {k.split("@")[0]: len(points) for k, points in shared.items() if k.split("@")[0] < "04"} == dict.fromkeys(
        ["01_generate_data", "02_data_flaws", "03_base_model"], 4)
    natural = sorted((k.split("@")[0], len(points)) for k, points in shared.items() if k.split("@")[0] >= "04")
    assert natural == sorted(2 * [(f"{stage}/{model}", 2) for stage, model in (
        ("04_continued_pretraining", "natural"), ("06_sft", "natural"), ("07_evaluate", "natural"),
        ("06_sft", "harmed"), ("07_evaluate", "harmed"))])

    sweeps.open_sweep(sweeps.define_sweep("smoke", "s", ["cpt.synthetic_fraction=0.1,0.3",
                                                         "cpt.more_natural_from=synthetic,natural"],
                                          seeds=[0, 1], runs_root=tmp_path), log=lambda _: None)  # same: fine
    with pytest.raises(sweeps.SweepRefused, match="grid: .* another --run-id"):
        sweeps.open_sweep(sweeps.define_sweep("smoke", "s", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0, 1],
                                              runs_root=tmp_path))
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["grid"] == manifest["grid"]


# --------------------------------------------------------------------------------------------------------------
# Sharing, claims, resuming
# --------------------------------------------------------------------------------------------------------------

def test_fraction_sweep_computes_stages_01_to_03_once_per_seed(tmp_path):
    started = time.time()
    sweep = sweeps.run_sweep("smoke", "frac", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0, 1], runs_root=tmp_path,
                             only=CHEAP, **QUIET)
    wall = time.time() - started
    first, second = (p.name for p in sweep.points)
    shared = json.loads((sweep.root / "sweep.json").read_text())["shared"]
    for seed in (0, 1):
        mine, theirs = shared[first][f"seed-{seed}"], shared[second][f"seed-{seed}"]
        assert {s: r["how"] for s, r in mine.items()} == dict.fromkeys(
            ["01_generate_data", "02_data_flaws", "03_base_model"], "computed")
        assert {s: (r["how"], r["from"]) for s, r in theirs.items()} == dict.fromkeys(
            ["01_generate_data", "02_data_flaws", "03_base_model"], ("hardlink", first))
        a, b = sweep.run_dir(first, seed), sweep.run_dir(second, seed)
        weights = "03_base_model/model/model.safetensors"
        assert os.stat(a / weights).st_ino == os.stat(b / weights).st_ino  # one file on disk
        assert (a / "03_base_model" / "done.json").read_text() == (b / "03_base_model" / "done.json").read_text()
        placed = json.loads((b / "03_base_model" / "config.json").read_text())
        assert placed["study"]["cpt"]["synthetic_fraction"] == 0.5  # its own configuration, the same fingerprint
        assert json.loads((b / "03_base_model" / "meta.json").read_text())["reused_from"] == \
            f"points/{first}/seed-{seed}/03_base_model"
        assert not (b / "03_base_model" / "checkpoints").exists() and not (b / ".placing").exists()
    # the runner trusts the placed steps: the same sweep again runs nothing
    lines, log = quiet_lines()
    sweeps.run_sweep("smoke", "frac", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0, 1], runs_root=tmp_path,
                     only=CHEAP, engine="inprocess", log=log)
    assert not [line for line in lines if "done in" in line or "reused" in line]
    assert all(row["state"] == "done" for row in sweeps.sweep_status(sweep, CHEAP))
    print(f"fraction sweep, 2 points x 2 seeds, stages 01-03: {wall:.1f} s")


def test_a_sweep_resolves_and_checks_each_point_and_seed_once(tmp_path, monkeypatch):
    from synthflaw import stages

    calls = {"resolve": [], "check": []}
    resolve, check = config.resolve, stages.check
    monkeypatch.setattr(config, "resolve", lambda preset, overrides=None: calls["resolve"].append(
        (overrides or {}).get("cpt.synthetic_fraction")) or resolve(preset, overrides))
    monkeypatch.setattr(stages, "check", lambda cfg: calls["check"].append(cfg.cpt.synthetic_fraction) or check(cfg))
    sweeps.run_sweep("smoke", "counted", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0, 1], runs_root=tmp_path,
                     only=["01"], **QUIET)
    # 2 points x 2 seeds: one resolution and one check each, made before anything ran and kept for every run of
    # the point (its shared stage, then the rest)
    assert sorted(calls["resolve"]) == sorted(calls["check"]) == [0.1, 0.1, 0.5, 0.5]


def test_a_fraction_sweep_plans_the_natural_control_once_per_seed():
    # the natural branch never reads cpt.synthetic_fraction: its CPT, SFT and evaluation are shared by every point
    sweep = sweeps.define_sweep("smoke", "plan", ["cpt.synthetic_fraction=0.1,0.3,0.5"], seeds=[0])
    shared = {name for name, _ in sweep.sharing(0)}
    assert {"04_continued_pretraining/natural", "06_sft/natural", "07_evaluate/natural"} <= shared
    assert not {name for name in shared if name.endswith(("/synthetic", "/rewritten", "/more_natural"))
                or name.startswith(("05_", "08_"))}
    cfg = sweep.config(sweep.points[0], 0)  # at the default share, a natural step's fingerprint is what it was
    spec = next(s for s in sweeps.definition.selected_steps(cfg) if s.name == "04_continued_pretraining/natural")
    default = config.resolve("smoke", {"cpt.synthetic_fraction": config.StudyConfig().cpt.synthetic_fraction})
    plain = {"seed": 0, "variant": "natural", **{k: default.to_dict()[k] for k in ("data", "base", "cpt")}}
    assert runs.step_config(cfg, spec.stage, "natural") == plain


def test_a_sweep_takes_the_steps_another_sweep_finished(tmp_path, capsys):
    fraction = sweeps.run_sweep("smoke", "fraction", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                runs_root=tmp_path, only=CHEAP, **QUIET)
    lines, log = quiet_lines()
    templates = sweeps.run_sweep("smoke", "templates", ["data.synthetic_templates=1,2"], seeds=[0], runs_root=tmp_path,
                                 only=CHEAP, reuse_from=["fraction"], engine="inprocess", log=log)
    one, two = templates.points  # templates=1 is the default: its 01-03 are those of the fraction sweep's points
    shared = json.loads((templates.root / "sweep.json").read_text())
    assert shared["reuse_from"] == ["fraction"]
    donor = f"fraction:{fraction.points[0].name}"
    assert {s: (r["how"], r["from"]) for s, r in shared["shared"][one.name]["seed-0"].items()} == dict.fromkeys(
        ["01_generate_data", "02_data_flaws", "03_base_model"], ("hardlink", donor))
    assert two.name not in shared["shared"]  # another data set: nothing to take, everything computed
    weights = "03_base_model/model/model.safetensors"
    assert os.stat(templates.run_dir(one, 0) / weights).st_ino == os.stat(fraction.run_dir(fraction.points[0], 0)
                                                                           / weights).st_ino
    assert json.loads((templates.run_dir(one, 0) / "03_base_model" / "meta.json").read_text())["reused_from"] == \
        f"../fraction/points/{fraction.points[0].name}/seed-0/03_base_model"
    assert not [line for line in lines if "done in" in line and one.name in line]
    assert all(row["state"] == "done" for row in sweeps.sweep_status(templates, CHEAP))
    # an exported sweep is no donor: its steps were sealed again without their weights
    export_sweep(fraction.root, tmp_path / "exported", allow_unfinished=True)
    again = sweeps.run_sweep("smoke", "again", ["data.synthetic_templates=1"], seeds=[0], runs_root=tmp_path,
                             only=["01"], reuse_from=["exported"], **QUIET)
    assert json.loads((again.root / "sweep.json").read_text())["shared"] == {}
    # what cannot be a donor is refused before anything is written
    for ids, expected in ((["templates2"], "templates2"), (["self"], "its own steps")):
        assert cli.main(["sweep", "--preset", "smoke", "--run-id", "self", "--runs-root", str(tmp_path), "--grid",
                         "sft.epochs=1,2", "--reuse-from", *ids, "--stages", "01"]) == 2
        assert expected in capsys.readouterr().err and not (tmp_path / "self").exists()


CLAIMANT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from synthflaw import sweep as sweeps
    root, point, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    sweep = sweeps.load_sweep(root.name, root.parent)
    Path(str(go) + "." + point.replace("=", "_")).touch()   # ready: imports done
    while not go.exists():
        time.sleep(0.02)
    sweeps.run_point(sweep, point, engine="inprocess", only=["01", "02", "03"], log=print)
""")


@pytest.mark.slow
def test_two_processes_compute_a_shared_step_once(tmp_path):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "race", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                                  runs_root=tmp_path), log=lambda _: None)
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMANT, str(sweep.root), p.name, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in sweep.points]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()  # both start at once: they contend for every claim
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    shared = json.loads((sweep.root / "sweep.json").read_text())["shared"]
    for step in ("01_generate_data", "02_data_flaws", "03_base_model"):
        hows = sorted(shared[p.name]["seed-0"][step]["how"] for p in sweep.points)
        assert hows == ["computed", "hardlink"], (step, hows)  # exactly one computed it
    computed = sum(line.count("computing shared") for line in outputs)
    assert computed == 3 and sum(o.count("reused from") for o in outputs) == 3
    weights = "03_base_model/model/model.safetensors"
    a, b = (sweep.run_dir(p, 0) / weights for p in sweep.points)
    assert os.stat(a).st_ino == os.stat(b).st_ino


def test_a_killed_sweep_continues_where_it_stopped(tmp_path):
    grid = ["data.n_people=24,26"]  # stage 01 reads `data`: nothing shared, each point computes

    class Killed(Exception):
        pass

    def kill_at_second_point(line):
        if line.startswith("[sweep] point 2/2"):
            raise Killed

    with pytest.raises(Killed):
        sweeps.run_sweep("smoke", "resume", grid, seeds=[0], runs_root=tmp_path, only=["01"], engine="inprocess",
                         log=kill_at_second_point)
    sweep = sweeps.load_sweep("resume", tmp_path)
    assert [r["state"] for r in sweeps.sweep_status(sweep, ["01"])] == ["done", "not started"]
    lines, log = quiet_lines()
    sweeps.run_sweep("smoke", "resume", grid, seeds=[0], runs_root=tmp_path, only=["01"], engine="inprocess", log=log)
    first = lines.index("[sweep] point 2/2: data.n_people=26")
    assert any("skipped (done, same config)" in line for line in lines[:first])
    assert not any("done in" in line for line in lines[:first])
    assert any("01_generate_data" in line and "done in" in line for line in lines[first:])
    assert [r["state"] for r in sweeps.sweep_status(sweep, ["01"])] == ["done", "done"]
    assert cli.main(["sweep", "--run-id", "resume", "--runs-root", str(tmp_path), "--status", "--stages", "01"]) == 0


# --------------------------------------------------------------------------------------------------------------
# submitit: the local executor, failures and resubmission, the sbatch file
# --------------------------------------------------------------------------------------------------------------

def test_submitit_local_executor_runs_one_job_per_point(tmp_path):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "jobs", ["data.n_people=24,26"], seeds=[0],
                                                  runs_root=tmp_path), log=lambda _: None)
    options = sweeps.SlurmOptions(cluster="local", time_min=10)
    jobs = sweeps.submit(sweep, options, engine="inprocess", only=["01"], log=lambda _: None)
    assert len(jobs) == 2
    assert [r["state"] for r in sweeps.sweep_status(sweep, ["01"])] == ["done", "done"]
    recorded = json.loads((sweep.root / "sweep.json").read_text())["jobs"]
    for point, job in zip(sweep.points, jobs):
        entry = recorded[f"point:{point.name}"]
        assert entry["submitted"] == [str(job.job_id)] and entry["last"]["state"] == "finished"
        assert entry["last"]["job_id"] == str(job.job_id)
        assert Path(entry["last"]["stdout"]).exists()  # its log, in runs/<sweep>/slurm/<job id>/
        assert Path(entry["last"]["stdout"]).parent == sweep.root.resolve() / "slurm" / str(job.job_id)
    assert sweeps.submit(sweep, options, engine="inprocess", only=["01"], log=lambda _: None) == []


def test_a_failed_point_is_reported_and_resubmitted(tmp_path):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "fail", ["data.n_people=24,26"], seeds=[0],
                                                  runs_root=tmp_path), log=lambda _: None)
    broken = Step(sweep.run_dir(sweep.points[1], 0), "01")
    broken.path.mkdir(parents=True)
    (broken.path / "config.json").write_text(json.dumps({"fingerprint": "0" * 16, "step": broken.name, "study": {}}))
    options = sweeps.SlurmOptions(cluster="debug")  # submitit's in-process executor: the same job function
    with pytest.raises(sweeps.SweepFailed, match="point:data.n_people=26"):
        sweeps.submit(sweep, options, engine="inprocess", only=["01"], log=lambda _: None)
    rows = sweeps.sweep_status(sweep, ["01"])
    assert [r["state"] for r in rows] == ["done", "failed"]
    assert "StepConfigChanged" in rows[1]["error"] and "failed: data.n_people=26" in sweeps.status_text(rows)

    (broken.path / "config.json").unlink()  # the fix
    lines, log = quiet_lines()
    jobs = sweeps.submit(sweep, options, engine="inprocess", only=["01"], log=log)
    assert len(jobs) == 1 and "point:data.n_people=26" in lines[0]  # only the unfinished point
    assert [r["state"] for r in sweeps.sweep_status(sweep, ["01"])] == ["done", "done"]


def test_per_seed_jobs_place_the_shared_steps_first(tmp_path, capsys):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "perseed", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                                  runs_root=tmp_path), log=lambda _: None)
    jobs = sweeps.submit(sweep, sweeps.SlurmOptions(cluster="debug", unit="seed"), engine="inprocess", only=["01"],
                         log=lambda _: None)
    assert len(jobs) == 1  # one job for seed 0, every point in it
    out = capsys.readouterr().out.splitlines()
    computed = next(i for i, line in enumerate(out) if "computing shared 01_generate_data" in line)
    reused = next(i for i, line in enumerate(out) if "01_generate_data reused from cpt.synthetic_fraction=0.1" in line)
    first_point = next(i for i, line in enumerate(out) if line.startswith("[sweep] point "))
    assert computed < reused < first_point  # the shared steps of every point, then each point's own
    entry = json.loads((sweep.root / "sweep.json").read_text())["jobs"]["seed:0"]
    assert entry["last"]["state"] == "finished"
    assert [r["state"] for r in sweeps.sweep_status(sweep, ["01"])] == ["done", "done"]


def test_sbatch_file_carries_the_options(tmp_path, capsys):
    sweep = sweeps.define_sweep("smoke", "slurm", ["cpt.synthetic_fraction=0.1,0.3,0.5,0.7"], seeds=[0],
                                runs_root=tmp_path)
    options = sweeps.SlurmOptions(partition="gpu", time_min=90, gpus=2, cpus=8, array_parallelism=3)
    text = sweeps.sbatch_script(sweep, options, jobs=4)
    lines = set(text.splitlines())
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gres=gpu:2",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --array=0-3%3", "#SBATCH --job-name=synthflaw-slurm"):
        assert expected in lines, (expected, text)
    logs = str(sweep.root.resolve() / "slurm" / "%A_%a" / "%A_%a_0_log.out")
    assert f"#SBATCH --output={logs}" in lines
    assert "-m submitit.core._submit" in text

    # the CLI's dry run prints the same file and writes nothing
    assert cli.main(["sweep", "--preset", "smoke", "--run-id", "slurm", "--runs-root", str(tmp_path), "--grid",
                     "cpt.synthetic_fraction=0.1,0.3,0.5,0.7", "--seeds", "0", "--executor", "slurm",
                     "--slurm-partition", "gpu", "--slurm-time", "90", "--slurm-gpus", "2", "--slurm-cpus", "8",
                     "--slurm-array-parallelism", "3", "--slurm-dry-run"]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
    assert list(tmp_path.iterdir()) == []


def test_sbatch_parameters_are_what_submitit_gives_slurm(tmp_path, monkeypatch):
    """The dry run's names match what AutoExecutor hands SlurmExecutor (a fake srun makes it start)."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    options = sweeps.SlurmOptions(partition="gpu", time_min=90, gpus=2, cpus=8, array_parallelism=3)
    executor = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm")
    executor.update_parameters(**options.auto_parameters("synthflaw-x"))
    assert executor._executor.parameters == options.sbatch_parameters("synthflaw-x")


# --------------------------------------------------------------------------------------------------------------
# Figures and the trend test, on metrics written here (no training)
# --------------------------------------------------------------------------------------------------------------

FRACTIONS = (0.1, 0.3, 0.5)  # cpt.synthetic_fraction lies in (0, 1): natural is the 0 point
SLOPES = {0: -0.2, 1: -0.3, 2: -0.4}  # per seed: d(learnable_HSR(synthetic) - learnable_HSR(natural)) / d(fraction)


def write_metrics(sweep):
    """natural: 0.5 + 0.01 seed at every point; synthetic: natural + slope(seed) * fraction; benchmark: + 0.1 x."""
    for point in sweep.points:
        x = point.values["cpt.synthetic_fraction"]
        for seed in sweep.seeds:
            natural = 0.5 + 0.01 * seed
            for model, hsr, bench in (("natural", natural, 0.3), ("synthetic", natural + SLOPES[seed] * x, 0.3 + x)):
                step = Step(sweep.run_dir(point, seed), "07_evaluate", model).open(sweep.config(point, seed))
                (step.path / "metrics.json").write_text(json.dumps({"learnable_hard_satisfaction_rate": hsr,
                                                                    "pre_sft_benchmark_accuracy": bench}))
                step.run(lambda cfg, step: {})
                step.complete()  # a whole marker: only such a step counts as finished


@pytest.fixture
def written_sweep(tmp_path):
    sweep = sweeps.open_sweep(sweeps.define_sweep(
        "smoke", "figs", [f"cpt.synthetic_fraction={','.join(map(str, FRACTIONS))}",
                          "cpt.more_natural_from=synthetic,natural"], seeds=[0, 1, 2], runs_root=tmp_path),
        log=lambda _: None)
    write_metrics(sweep)
    return sweep


def test_figures_and_trend_test_from_the_files(written_sweep):
    made = sweeps.figures("figs", written_sweep.root.parent)
    out = written_sweep.root / "figures"
    assert made["metrics"] == ["learnable_HSR", "benchmark"]  # primary endpoints, in PRIMARY's order
    assert made["models"] == ["natural", "synthetic"]
    for metric in made["metrics"]:
        for key in written_sweep.grid:
            assert (out / f"{metric}__{key}.png").exists() and (out / f"{metric}__{key}.csv").exists()

    rows = read_csv(out / "learnable_HSR__cpt.synthetic_fraction.csv")
    first = next(r for r in rows if r["model"] == "natural" and r["value"] == "0.1"
                 and r["slice"] == "cpt.more_natural_from=synthetic")
    half = stdtrit(2, 0.975) * 0.01 / math.sqrt(3)  # values 0.50, 0.51, 0.52
    assert float(first["mean"]) == pytest.approx(0.51) and float(first["n"]) == 3
    assert float(first["high"]) - float(first["mean"]) == pytest.approx(half)

    trends = read_csv(out / "trend_tests.csv")
    hsr = [r for r in trends if r["metric"] == "learnable_HSR" and r["key"] == "cpt.synthetic_fraction"]
    assert [r["slice"] for r in hsr] == ["cpt.more_natural_from=synthetic", "cpt.more_natural_from=natural"]
    half = stdtrit(2, 0.975) * 0.1 / math.sqrt(3)  # slopes -0.2, -0.3, -0.4: mean -0.3, sd 0.1
    for row in hsr:
        assert float(row["slope"]) == pytest.approx(-0.3) and int(row["n_seeds"]) == 3
        assert float(row["high"]) == pytest.approx(-0.3 + half) and float(row["low"]) == pytest.approx(-0.3 - half)
        assert row["verdict"] == "slope < 0" and row["primary"] == "yes"
    bench = next(r for r in trends if r["metric"] == "benchmark" and r["key"] == "cpt.synthetic_fraction")
    assert float(bench["slope"]) == pytest.approx(1.0) and bench["verdict"] == "slope > 0"
    untested = [r for r in trends if r["key"] == "cpt.more_natural_from"]
    assert untested and all(r["verdict"].startswith("not tested: its values are not numbers") for r in untested)
    assert "Stated in sweep.json at" in (out / "trend_tests.md").read_text()


def test_figures_are_the_same_bytes_when_drawn_again(written_sweep):
    out = written_sweep.root / "figures"
    sweeps.figures("figs", written_sweep.root.parent)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".md", ".png")}
    sweeps.figures("figs", written_sweep.root.parent)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".md", ".png")} == first
    # 2 metrics x 2 keys (CSV and PNG), values.csv, trend_tests.csv/.md, README.md (the index)
    assert len(first) == 2 * 2 * 2 + 4 and "learnable_HSR__cpt.synthetic_fraction.png" in first


def test_ols_slope_by_hand():
    assert sweep_figures.ols_slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert sweep_figures.ols_slope([0.0, 0.2, 0.4], [0.0, -0.04, -0.08]) == pytest.approx(-0.2)


def test_notebook_09_renders_the_sweep(written_sweep, capsys):
    assert cli.main(["sweep", "--run-id", "figs", "--runs-root", str(written_sweep.root.parent),
                     "--figures-only"]) == 0  # papermill: notebooks/09_sweep.ipynb into figures/notebook.ipynb
    out = written_sweep.root / "figures"
    executed = json.loads((out / "notebook.ipynb").read_text())
    shown = json.dumps([c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code"])
    assert "slope < 0" in shown and "image/png" in shown and "not started" not in shown
    assert (out / "learnable_HSR__cpt.synthetic_fraction.png").exists()
    source = json.loads((REPO / "notebooks" / "09_sweep.ipynb").read_text())
    assert all(not c.get("outputs") for c in source["cells"] if c["cell_type"] == "code")
    assert not any("def " in "".join(c["source"]) for c in source["cells"])


# --------------------------------------------------------------------------------------------------------------
# Exporting a finished sweep, and redrawing it from the export
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_exported_sweep_redraws_its_figures_and_tables_byte_for_byte(tmp_path, capsys, sweep_tables):
    started = time.time()
    sweep = sweeps.run_sweep("smoke", "whole", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0, 1], runs_root=tmp_path,
                             overrides=LEAN_POINT, **QUIET)
    wall = time.time() - started
    assert all(row["state"] == "done" for row in sweeps.sweep_status(sweep))
    exported = tmp_path / "exported"
    with pytest.raises(ValueError, match="outside the runs folder"):
        export_sweep(sweep.root, tmp_path.parent / "elsewhere", runs_root=tmp_path)
    cli_export = ["export", "--run-id", "whole", "--runs-root", str(tmp_path)]
    assert cli.main([*cli_export, "--to", str(exported)]) == 0
    assert cli.main([*cli_export, "--to", str(exported)]) == 2 and "exists" in capsys.readouterr().err

    files = [p for p in exported.rglob("*") if p.is_file()]
    assert (exported / "sweep.json").exists() and (exported / "figures" / "trend_tests.md").exists()
    assert not [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".jsonl", ".ipynb")]
    assert not [p for p in files if p.suffix in (".json", ".csv", ".md") and str(tmp_path) in p.read_text()]
    assert sorted(p.name for p in (exported / "points").iterdir()) == sorted(p.name for p in sweep.points)
    # the export is a sweep of its own: every step finished and current, so nothing would run again
    again = sweeps.load_sweep("exported", tmp_path)
    assert all(row["state"] == "done" for row in sweeps.sweep_status(again))
    assert all(unfinished_steps(again.point_dir(point)) == [] for point in again.points)

    before = sweep_tables(exported)
    assert any(k.startswith("figures/learnable_HSR__") for k in before) and "figures/trend_tests.csv" in before
    assert sum(k.endswith("seeds/findings.md") for k in before) == 2
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(exported), str(copy)], check=True)
    for gone in [copy / "figures", *copy.glob("points/*/seeds")]:
        subprocess.run(["rm", "-r", str(gone)], check=True)
    assert cli.main(["sweep", "--run-id", "copy", "--runs-root", str(tmp_path), "--figures-only",
                     "--engine", "inprocess"]) == 0
    after = sweep_tables(copy)
    assert sorted(after) == sorted(before)
    assert not [name for name in before if after[name] != before[name]]
    print(f"smoke sweep, 2 points x 2 seeds, every stage: {wall:.1f} s")


def test_an_unfinished_sweep_is_not_exported(tmp_path, capsys):
    sweeps.open_sweep(sweeps.define_sweep("smoke", "half", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                          runs_root=tmp_path), log=lambda _: None)
    assert cli.main(["export", "--run-id", "half", "--runs-root", str(tmp_path), "--to",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cpt.synthetic_fraction=0.1/seed-0: not started" in err and "--allow-unfinished" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
