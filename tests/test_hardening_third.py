"""The third round of hostile probes, each as the command a user would type where one can: a step folder that is a
link, a hand-edited sweep.json, advice a sweep cannot follow, a notebook that lost its parameters tag,
compute.precision=auto on a CPU that emulates bf16, and a --set value that is not UTF-8.

The CLI runs in this process on the stand-in stages of tests/test_run_integrity.py (`fake_stages`).
"""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from test_run_integrity import fake_run, fake_stages  # noqa: F401 - the stand-in stages, a fixture
from transformers import AutoModelForCausalLM, LlamaConfig

from synthflaw import cli, config, stages
from synthflaw.registry import stage as find_stage
from synthflaw import sweep as sweeps
from synthflaw.runner import study as study_module
from synthflaw.runner.notebooks import NOTEBOOKS_DIR, NotebookRefused, check_parameters_cell
from synthflaw.runs import Step
from synthflaw.training import precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def main(capsys, *argv) -> tuple[int, str]:
    """`synthflaw <argv>` in this process: (exit code, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes, every link with its target (links not followed)."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top, name)
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_file():
                found[rel] = path.read_bytes()
    return found


def advised(text: str, pattern: str) -> list[str]:
    """The `synthflaw ...` command a message advises (the first match of `pattern`'s group), as argv without the
    program name; argparse must accept it (SystemExit otherwise) and it must not be --overwrite for a sweep."""
    found = re.search(pattern, text)
    assert found, text
    argv = shlex.split(found.group(1))
    assert argv[0] == "synthflaw" and "--overwrite" not in argv, argv
    cli.build_parser().parse_args(argv[1:])
    return argv[1:]


# --------------------------------------------------------------------------------------------------------------
# 1. A step folder that is a link is refused, naming it, before anything is written
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("linked", ["03_base_model", "04_continued_pretraining/natural", "04_continued_pretraining"])
def test_a_step_folder_that_is_a_link_is_refused_before_anything_is_written(tmp_path, fake_stages, capsys, linked):
    root = tmp_path / "runs"
    run_dir = fake_run(root)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_dir / linked, elsewhere)
    (run_dir / linked).symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(tmp_path)
    common = ["--run-id", "r", "--runs-root", root]
    run = ["run", "--preset", "smoke", "--engine", "inprocess", *common]
    for command in (run, [*run, "--overwrite"], ["figures", "--engine", "inprocess", *common],
                    ["export", "--to", root / "out", *common], ["export", "--to", root / "out2", "--allow-unfinished",
                                                                 *common]):
        code, err = main(capsys, *command)
        assert code == 2 and f"{run_dir / linked} is a symbolic link" in err and "remove the link" in err, (command,
                                                                                                             err)
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before, command

    # a stale step behind the link: --overwrite would delete it, and failed with a traceback on the link
    (elsewhere / "out.txt").write_text("edited")
    before = snapshot(tmp_path)
    code, err = main(capsys, *run, "--overwrite")
    assert code == 2 and "remove the link" in err and snapshot(tmp_path) == before, err


def test_a_step_folder_resolving_outside_its_run_is_refused(tmp_path, fake_stages):
    from synthflaw.runs.step import StepFolderRefused

    run_dir = fake_run(tmp_path / "runs", only=["01", "02"])
    (tmp_path / "outside").mkdir()
    with pytest.raises(StepFolderRefused, match="resolves to .*outside, outside its run folder"):
        Step(run_dir, "04", "../../../outside").open(config.resolve("smoke"))
    assert list((tmp_path / "outside").iterdir()) == []
    link = run_dir / "03_base_model"
    link.symlink_to(run_dir / "02_data_flaws")  # inside the run, and still another step's folder
    with pytest.raises(StepFolderRefused, match="03_base_model is a symbolic link"):
        Step(run_dir, "03").marker()
    link.unlink()
    (run_dir / "03_base_model").mkdir()  # a real folder: nothing to refuse
    assert Step(run_dir, "03").marker() is None


def test_a_sweep_points_step_folder_that_is_a_link_is_refused(tmp_path, fake_stages, capsys):
    common = ["--run-id", "sw", "--runs-root", tmp_path, "--engine", "inprocess", "--stages", "01", "02"]
    code, err = main(capsys, "sweep", *common, "--preset", "smoke", "--grid", "cpt.synthetic_fraction=0.1,0.5",
                     "--seeds", "0")
    assert code == 0, err
    step = tmp_path / "sw" / "points" / "cpt.synthetic_fraction=0.5" / "seed-0" / "02_data_flaws"
    shutil.move(step, tmp_path / "elsewhere")
    step.symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    for command in (["sweep", *common], ["sweep", *common, "--status"]):
        code, err = main(capsys, *command)
        assert code == 2 and f"{step} is a symbolic link" in err, (command, err)
        assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 2. A hand-edited sweep.json is checked when it is read, naming the file, the point and the key
# --------------------------------------------------------------------------------------------------------------

def _edit_point_value(manifest):
    manifest["points"][1]["values"]["cpt.synthetic_fraction"] = "abc"


def _edit_point_off_grid(manifest):
    manifest["points"][1]["values"]["cpt.synthetic_fraction"] = 0.7


def _edit_grid(manifest):
    manifest["grid"]["cpt.synthetic_fraction"] = [0.1, "abc"]


@pytest.mark.parametrize("edit, expected", [
    (_edit_point_value, "point 'cpt.synthetic_fraction=0.5', key cpt.synthetic_fraction: cpt.synthetic_fraction "
                        "expects float, got 'abc'"),
    (_edit_point_off_grid, "point 'cpt.synthetic_fraction=0.5', key cpt.synthetic_fraction: 0.7 is not one of the "
                           "grid's values"),
    (lambda m: m.update(preset="nosuch"), "'preset' 'nosuch' is not a preset"),
    (_edit_grid, "'grid': cpt.synthetic_fraction expects float, got 'abc'"),
    (lambda m: m.update(overrides={"sft.epochs": "many"}), "'overrides', key sft.epochs: sft.epochs expects float"),
    (lambda m: m.update(reuse_from=["../../elsewhere"]), "'reuse_from': run id '../../elsewhere' contains a path"),
    (lambda m: m["points"].pop(), "1 points, but the grid makes 2"),
])
def test_a_hand_edited_manifest_is_refused_naming_the_point_and_key(tmp_path, fake_stages, capsys, edit, expected):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "sw", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                                  runs_root=tmp_path), log=lambda _: None)
    path = sweep.root / "sweep.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    before = snapshot(tmp_path)
    common = ["--run-id", "sw", "--runs-root", tmp_path]
    for command in (["sweep", *common, "--status"], ["sweep", *common, "--engine", "inprocess", "--stages", "01"],
                    ["sweep", *common, "--figures-only", "--engine", "inprocess"],
                    ["export", *common, "--to", tmp_path / "out", "--allow-unfinished"]):
        code, err = main(capsys, *command)
        assert code == 2 and f"{path} is not a valid sweep manifest" in err and expected in err, (command, err)
        assert "point cpt.synthetic_fraction=0.1 failed" not in err and "Traceback" not in err
    assert fake_stages == [] and snapshot(tmp_path) == before


def test_the_committed_sweep_manifests_are_valid():
    for manifest in sorted(Path(__file__).resolve().parent.parent.glob("runs/*/sweep.json")):
        sweeps.read_manifest(manifest.parent)


# --------------------------------------------------------------------------------------------------------------
# 3. A sweep's advice is a command `synthflaw sweep` takes, and that helps
# --------------------------------------------------------------------------------------------------------------

def test_a_stale_step_of_a_point_is_refused_with_advice_a_sweep_can_follow(tmp_path, fake_stages, capsys):
    common = ["--run-id", "sw", "--runs-root", tmp_path, "--engine", "inprocess", "--stages", "01", "02"]
    code, err = main(capsys, "sweep", *common, "--preset", "smoke", "--grid", "cpt.synthetic_fraction=0.1,0.5",
                     "--seeds", "0")
    assert code == 0, err
    product = tmp_path / "sw" / "points" / "cpt.synthetic_fraction=0.5" / "seed-0" / "02_data_flaws" / "out.txt"
    product.unlink()  # its own copy (the points share the step by hard link), edited
    product.write_text("edited")
    code, err = main(capsys, "sweep", *common)
    assert code == 2 and "02_data_flaws is stale" in err and "--overwrite" not in err, err
    assert "run the same command" not in err
    folders = re.search(r"rm -r ([^)]+)\)", err).group(1).split()
    assert folders == [str(product.parent)]
    argv = advised(err, r"continue the sweep \((synthflaw sweep [^)]+)\)")
    for folder in folders:  # the advice, followed
        shutil.rmtree(folder)
    code, err = main(capsys, *argv)
    assert code == 0 and Step(product.parent.parent, "02").done, err  # placed again from the other point
    assert product.read_text() != "edited"

    # a stale step outside the stages asked for: the advice runs the stages that redo it
    data = product.parent.parent / "01_generate_data" / "out.txt"
    data.unlink()
    data.write_text("edited")
    code, err = main(capsys, "sweep", *common[:-2], "02")  # --stages 02
    assert code == 2 and "01_generate_data is stale" in err and "--overwrite" not in err, err
    argv = advised(err, r"continue the sweep \((synthflaw sweep [^)]+)\)")
    assert argv[argv.index("--stages") + 1:][:3] == ["01", "02", "--engine"]
    for folder in re.search(r"rm -r ([^)]+)\)", err).group(1).split():
        shutil.rmtree(folder)
    code, err = main(capsys, *argv)
    assert code == 0 and data.read_text() != "edited", err


def test_a_failed_point_advises_the_command_that_continues_the_sweep(tmp_path, fake_stages, capsys, monkeypatch):
    real = stages.stage_module

    class Full:
        def run(self, cfg, step):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages, "stage_module", lambda stage: Full() if find_stage(stage).number == "02"
                        else real(stage))
    grid = ["--preset", "smoke", "--grid", "cpt.synthetic_fraction=0.1,0.5", "--seeds", "0"]
    common = ["--run-id", "sw", "--runs-root", tmp_path, "--engine", "inprocess", "--stages", "01", "02"]
    code, err = main(capsys, "sweep", *common, *grid)
    # a full disk is the user's to fix: exit 2, the step's folder and the file system's fix beside the sweep's
    assert code == 2 and "point cpt.synthetic_fraction=0.1 failed" in err and "free some space" in err, err
    argv = advised(err, r"continue the sweep \((synthflaw sweep [^)]+)\)")
    assert "--grid" not in argv and argv[argv.index("--stages") + 1:][:2] == ["01", "02"]
    monkeypatch.setattr(stages, "stage_module", real)  # the cause, fixed
    code, err = main(capsys, *argv)
    assert code == 0, err
    assert all(Step(run, "02").done for run in (tmp_path / "sw" / "points").glob("*/seed-0"))


def test_status_advises_the_command_that_submits_again_not_itself(tmp_path, fake_stages, capsys):
    sweep = sweeps.open_sweep(sweeps.define_sweep("smoke", "sw", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                                  runs_root=tmp_path), log=lambda _: None)
    label = f"point:{sweep.points[1].name}"
    sweeps.update_manifest(sweep.root, lambda m: m["jobs"].update(
        {label: {"submitted": ["7"], "last": {"state": "failed", "error": "OSError: disk full", "job_id": "7",
                                              "stdout": "log"}}}))
    code = cli.main(["sweep", "--run-id", "sw", "--runs-root", str(tmp_path), "--status"])
    out = capsys.readouterr().out
    assert code == 0 and "failed: cpt.synthetic_fraction=0.5" in out and "the same" not in out, out
    argv = advised(out, r"submit what is not finished again: (synthflaw sweep .*?) \(with")
    assert "--status" not in argv and argv[-2:] == ["--executor", "slurm"]


def test_a_sweep_with_another_definition_advises_what_continues_it(tmp_path, fake_stages, capsys):
    sweeps.open_sweep(sweeps.define_sweep("smoke", "sw", ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                          runs_root=tmp_path), log=lambda _: None)
    common = ["--run-id", "sw", "--runs-root", tmp_path, "--engine", "inprocess", "--stages", "01"]
    code, err = main(capsys, "sweep", *common, "--preset", "smoke", "--grid", "cpt.synthetic_fraction=0.1,0.3",
                     "--seeds", "0")
    assert code == 2 and "leave out --grid, --preset, --seeds and --set" in err, err
    code, err = main(capsys, "sweep", *common)  # the advice, followed
    assert code == 0, err
    code, err = main(capsys, "sweep", "--run-id", "nosuch", "--runs-root", tmp_path, "--status")
    assert code == 2, err
    advised(err, r"start one with (synthflaw sweep .*)$")
    code, err = main(capsys, "sweep", *common, "--reuse-from", "nosuch")
    assert code == 2 and "--reuse-from nosuch:" in err and "leave the --reuse-from out" in err, err


# --------------------------------------------------------------------------------------------------------------
# 4. A notebook whose parameters cell lost its tag is refused before it runs
# --------------------------------------------------------------------------------------------------------------

def test_every_shipped_notebook_has_one_tagged_parameters_cell():
    notebooks = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    assert len(notebooks) == 9
    for notebook in notebooks:
        check_parameters_cell(notebook)


def test_a_notebook_without_a_tagged_parameters_cell_is_refused_before_it_runs(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook = json.loads((NOTEBOOKS_DIR / "01_generate_data.ipynb").read_text())
    parameters = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    parameters["metadata"]["tags"].remove("parameters")  # the tag lost in an edit
    outside = tmp_path / "outside" / "notebook"  # the notebook's own default: not the run's folder
    parameters["source"] = re.sub(r'run_dir = "[^"]*"', f'run_dir = "{outside}"', "".join(parameters["source"]))
    (folder / "01_generate_data.ipynb").write_text(json.dumps(notebook))
    monkeypatch.setattr(study_module, "NOTEBOOKS_DIR", folder)
    code, err = main(capsys, "run", "--preset", "smoke", "--run-id", "r", "--runs-root", tmp_path / "runs",
                     "--stages", "01")
    assert code == 2 and f"{folder / '01_generate_data.ipynb'} has no cell tagged 'parameters'" in err, err
    assert "Tag the one cell" in err and "nothing was executed" in err
    assert not outside.exists() and not Step(tmp_path / "runs" / "r", "01").path.joinpath("result.json").exists()

    parameters["metadata"]["tags"] = ["parameters"]
    notebook["cells"].insert(3, {**json.loads(json.dumps(parameters)), "id": "second-parameters"})  # a second one
    # would override the run's values as well
    (folder / "01_generate_data.ipynb").write_text(json.dumps(notebook))
    with pytest.raises(NotebookRefused, match=r"has 2 cells \(cells 2, 4\) tagged 'parameters'"):
        check_parameters_cell(folder / "01_generate_data.ipynb")


# --------------------------------------------------------------------------------------------------------------
# 6. compute.precision=auto stops timing bf16 once it is clearly slower, and knows CPUs by their bf16 features
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def model():
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA, vocab_size=64))


def fake_timer(monkeypatch, fp32_s: float, bf16_s: float) -> dict:
    """Replace `precision.step_seconds` by a clock: a step costs `fp32_s` or `bf16_s` seconds, a third of it its
    forward pass; a step over `give_up_s` is cut off at its first pass that ends past it, as the real one is.
    Returns {"spent": seconds the probe would have taken, "bf16_calls": ...}."""
    clock = {"spent": 0.0, "bf16_calls": 0}

    def step_seconds(model, batch_size, seq_len, bf16, steps=precision.TIMED_STEPS, give_up_s=None):
        cost = bf16_s if bf16 else fp32_s
        clock["bf16_calls"] += bf16
        times = []
        for _ in range(steps + 1):  # the warm-up, then the timed steps
            cut = next((t for t in (cost / 3, cost) if give_up_s is not None and t > give_up_s), None)
            clock["spent"] += cut or cost
            times.append(cut or cost)
            if cut:
                break
        return times[1:] or times

    monkeypatch.setattr(precision, "step_seconds", step_seconds)
    return clock


def test_auto_stops_timing_bf16_once_it_is_clearly_slower(model, monkeypatch, tmp_path):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    clock = fake_timer(monkeypatch, fp32_s=1.4, bf16_s=13.6)  # the fresh machine's stage 03: bf16 emulated
    chosen = precision.choose("auto", model, 8, 16)
    assert chosen["precision"] == "fp32" and chosen["clearly_slower"] == "bf16", chosen
    assert clock["bf16_calls"] == 1 and clock["spent"] <= 10, clock  # was 6 bf16 steps: ~90 s
    assert chosen["bf16_step_s"] >= precision.CLEARLY_SLOWER * chosen["fp32_step_s"]
    assert "timing stopped once bf16 was clearly slower" in chosen["reason"]

    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "close"))
    clock = fake_timer(monkeypatch, fp32_s=1.0, bf16_s=1.5)  # slower, not clearly: every step is timed
    chosen = precision.choose("auto", model, 8, 16)
    assert chosen["precision"] == "fp32" and "clearly_slower" not in chosen
    assert clock["bf16_calls"] == precision.TIMED_STEPS

    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "fast"))
    clock = fake_timer(monkeypatch, fp32_s=1.0, bf16_s=0.4)  # bf16 is kept on every step's evidence only
    chosen = precision.choose("auto", model, 8, 16)
    assert chosen["precision"] == "bf16" and clock["bf16_calls"] == precision.TIMED_STEPS


def test_a_real_step_cut_off_is_its_time_so_far_and_leaves_the_model_as_it_was(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = precision.step_seconds(model, 2, 8, bf16=True, steps=3, give_up_s=0.0)
    assert len(seconds) == 1 and seconds[0] > 0  # the warm-up's forward pass, cut off
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 {}\n\n"


def test_the_choice_is_cached_per_cpu_bf16_features_not_per_model_name(model, monkeypatch, tmp_path):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    keys = {}
    for flags in ("avx2 avx512f avx512_bf16", "avx2 avx512f", "avx2 avx512f avx512_bf16 amx_tile amx_bf16", ""):
        monkeypatch.setattr(precision, "_cpuinfo", lambda flags=flags: CPUINFO.format(flags))
        keys[flags] = precision.cpu_key()
    assert keys["avx2 avx512f avx512_bf16"] == "AMD EPYC [avx2 avx512f avx512_bf16]"
    assert keys["avx2 avx512f"] == "AMD EPYC [avx2 avx512f]" and keys[""] == "AMD EPYC [none]"
    assert len(set(keys.values())) == 4
    monkeypatch.setattr(precision, "_cpuinfo", lambda: "")  # no /proc/cpuinfo: the model name alone
    monkeypatch.setattr(precision.platform, "processor", lambda: "arm")
    assert precision.cpu_key() == "arm"

    # an entry of the old key (the model name alone) is kept, and missed: the machine is timed again
    monkeypatch.setattr(precision, "_cpuinfo", lambda: CPUINFO.format("avx2 avx512f"))
    shape = precision._cache_key(model, torch.device("cpu")).split("|", 1)[1]
    old = {f"AMD EPYC|{shape}": {"fp32_step_s": 1.0, "bf16_step_s": 0.5, "bf16_speedup": 2.0, "precision": "bf16",
                                 "timed_batch": [8, 16]}}
    (tmp_path / "precision.json").write_text(json.dumps(old))
    clock = fake_timer(monkeypatch, fp32_s=1.4, bf16_s=13.6)
    chosen = precision.choose("auto", model, 8, 16)
    assert chosen["precision"] == "fp32" and chosen["machine"] == f"AMD EPYC [avx2 avx512f]|{shape}"
    assert clock["bf16_calls"] == 1
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert saved[f"AMD EPYC|{shape}"] == old[f"AMD EPYC|{shape}"] and len(saved) == 2


# --------------------------------------------------------------------------------------------------------------
# 7. A --set or --grid value that is not UTF-8 is named by its key, and nothing is made
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["run", "--preset", "smoke", "--set"],
                                     ["sweep", "--preset", "smoke", "--grid"]])
def test_a_value_that_is_not_utf8_is_named_by_its_key(tmp_path, capsys, command):
    value = os.fsdecode(b"natural-\xff")  # what Python makes of a Latin-1 byte in argv
    code, err = main(capsys, *command, f"data.natural_dataset={value}", "--run-id", "u", "--runs-root", tmp_path,
                     "--engine", "inprocess", "--stages", "01")
    assert code == 2 and "data.natural_dataset" in err and "is not valid UTF-8" in err, err
    assert "surrogates not allowed" not in err and list(tmp_path.iterdir()) == []
