"""The second round of hostile probes (issue 23), each as the command a new user would type: an export deletes
nothing it did not make, a broken sweep manifest is named, every command checks before it locks or writes, run ids
and folder kinds, one trust rule for run, figures and export, errors of the runs folder as messages, one writer per
run even when the runner is killed, and no machine path in an export.

Most tests run the CLI in this process on the stand-in stages of tests/test_run_integrity.py (`fake_stages`).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_run_integrity import fake_run, fake_stages  # noqa: F401 - the stand-in stages, a fixture

from synthflaw import cli, runs
from synthflaw import sweep as sweeps
from synthflaw.runs import Step

REPO = Path(__file__).resolve().parent.parent


def main(capsys, *argv) -> tuple[int, str]:
    """`synthflaw <argv>` in this process: (exit code, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def open_smoke_sweep(root: Path, sweep_id: str = "sw"):
    """A sweep's manifest and nothing else (no point has run)."""
    return sweeps.open_sweep(sweeps.define_sweep("smoke", sweep_id, ["cpt.synthetic_fraction=0.1,0.5"], seeds=[0],
                                                 runs_root=root), log=lambda _: None)


# --------------------------------------------------------------------------------------------------------------
# 1. An export deletes nothing it did not make
# --------------------------------------------------------------------------------------------------------------

def test_export_refuses_a_partial_folder_it_did_not_make_and_keeps_it(tmp_path, fake_stages, capsys):
    fake_run(tmp_path, "base")
    open_smoke_sweep(tmp_path)
    for run_id, target, extra in (("base", "victim", []), ("sw", "sweep-victim", ["--allow-unfinished"])):
        victim = tmp_path / f"{target}.partial"  # `foo.partial` is a valid run id: someone's run
        (victim / "01_generate_data").mkdir(parents=True)
        (victim / "01_generate_data" / "result.json").write_text("{}")
        code, err = main(capsys, "export", "--run-id", run_id, "--to", tmp_path / target, "--runs-root", tmp_path,
                         *extra)
        assert code == 2 and f"{victim} exists" in err and "remove it yourself" in err, err
        assert files_under(victim) == ["01_generate_data", "01_generate_data/result.json"]
        assert not (tmp_path / target).exists()


def test_a_failed_export_removes_only_its_own_staging_folder(tmp_path, fake_stages, monkeypatch):
    from synthflaw import export

    run_dir = fake_run(tmp_path, "base")
    monkeypatch.setattr(export, "reseal", lambda folder, **_: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        export.export_run(run_dir, tmp_path / "out", html=False, runs_root=tmp_path)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# 2. A malformed sweep.json is named
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest, expected", [
    ("{}", "lacks 'preset'"),
    ("", "is not valid JSON"),
    ("[]", "is not a JSON object"),
    (None, "has 'run' '../../elsewhere'"),  # a point's folder given as a path out of the sweep
])
def test_a_malformed_manifest_is_refused_naming_it(tmp_path, capsys, manifest, expected):
    sweep = open_smoke_sweep(tmp_path, "swbad")
    path = sweep.root / "sweep.json"
    if manifest is None:
        good = json.loads(path.read_text())
        good["points"][0]["run"] = "../../elsewhere"
        manifest = json.dumps(good)
    path.write_text(manifest)
    before = files_under(tmp_path)
    common = ["--run-id", "swbad", "--runs-root", tmp_path]
    for command in (["sweep", *common, "--status"], ["sweep", *common, "--engine", "inprocess"],
                    ["sweep", *common, "--figures-only", "--engine", "inprocess"],
                    ["export", *common, "--to", tmp_path / "out"]):
        code, err = main(capsys, *command)
        assert code == 2 and str(path) in err and expected in err and "Traceback" not in err, (command, err)
    assert files_under(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 4. Every command checks everything before it locks or writes
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--seeds", "0", "1", "--set", "unlearn.methods=nope"], "unknown method 'nope'"),
    (["--seeds", "4294967296", "0"], "seed=4294967296 must be an integer in [0, 4294967295]"),
    (["--seeds", "0", "1", "--stages", "99"], "unknown stage '99'"),
])
def test_a_multi_seed_run_checks_every_seed_before_it_locks(tmp_path, capsys, extra, expected):
    code, err = main(capsys, "run", "--preset", "smoke", "--run-id", "ms", "--runs-root", tmp_path,
                     "--engine", "inprocess", *extra)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "ms").exists()  # no folder, no .lock


def test_a_sweep_with_an_unknown_stage_writes_nothing(tmp_path, capsys):
    code, err = main(capsys, "sweep", "--preset", "smoke", "--run-id", "sw", "--runs-root", tmp_path, "--grid",
                     "cpt.synthetic_fraction=0.1,0.3", "--seeds", "0", "--stages", "99", "--engine", "inprocess")
    assert code == 2 and "unknown stage '99'" in err, err
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("override, expected", [
    ("cpt.branches=natural,natural", "cpt.branches lists natural more than once"),
    ("cpt.branches=", "cpt.branches is empty"),
    ("unlearn.methods=npo,npo", "unlearn.methods lists npo more than once"),
    ("evaluate.judge=/nowhere/judge", "evaluate.judge='/nowhere/judge' is not an existing file or folder"),
    ("evaluate.judge=someone/judge", "evaluate.judge='someone/judge' is not a local path"),  # the hub is off
    ("base.model_name_or_path=./no-such-model", "base.model_name_or_path='./no-such-model' is not an existing"),
    ("compute.accelerate_config=nope.yaml", "compute.accelerate_config='nope.yaml' is not a file"),
])
def test_config_refuses_what_a_run_would_fail_on_later(capsys, monkeypatch, override, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = main(capsys, "config", "--preset", "smoke", "--set", override)
    assert code == 2 and expected in err, err


# --------------------------------------------------------------------------------------------------------------
# 5. Run ids and what a folder holds
# --------------------------------------------------------------------------------------------------------------

def test_a_long_run_id_in_bytes_is_refused_without_a_traceback(tmp_path, capsys):
    code, err = main(capsys, "run", "--preset", "smoke", "--run-id", "研" * 100, "--runs-root", tmp_path,
                     "--engine", "inprocess", "--stages", "01")
    assert code == 2 and "300 bytes long" in err and "Traceback" not in err, err
    assert files_under(tmp_path) == []


def test_run_refuses_a_sweeps_folder_and_sweep_a_runs(tmp_path, fake_stages, capsys):
    open_smoke_sweep(tmp_path, "sw")
    before = files_under(tmp_path)
    code, err = main(capsys, "run", "--preset", "smoke", "--run-id", "sw", "--runs-root", tmp_path,
                     "--engine", "inprocess", "--stages", "01")
    assert code == 2 and "holds a sweep, not a single run" in err and "synthflaw sweep --run-id sw" in err, err
    code, err = main(capsys, "run", "--preset", "smoke", "--run-id", "sw", "--runs-root", tmp_path,
                     "--engine", "inprocess", "--stages", "01", "--seeds", "0", "1")
    assert code == 2 and "holds a sweep, not a multi-seed run" in err, err
    assert files_under(tmp_path) == before

    fake_run(tmp_path, "plain", only=["01"])
    before = files_under(tmp_path)
    code, err = main(capsys, "sweep", "--preset", "smoke", "--run-id", "plain", "--runs-root", tmp_path, "--grid",
                     "cpt.synthetic_fraction=0.1,0.3", "--seeds", "0", "--stages", "01", "--engine", "inprocess")
    assert code == 2 and "holds a single run, not a sweep" in err and "synthflaw run --run-id plain" in err, err
    assert files_under(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 6. One trust rule for run, figures and export
# --------------------------------------------------------------------------------------------------------------

def test_figures_and_export_refuse_an_empty_config_json_as_run_does(tmp_path, fake_stages, capsys):
    run_dir = fake_run(tmp_path)
    broken = run_dir / "03_base_model" / "config.json"
    broken.write_text("")
    common = ["--run-id", "r", "--runs-root", tmp_path]
    for command in (["run", "--preset", "smoke", "--engine", "inprocess", *common],
                    ["figures", "--engine", "inprocess", *common],
                    ["export", "--to", tmp_path / "out", *common]):
        code, err = main(capsys, *command)
        assert code == 2 and str(broken) in err, (command, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("forged", [
    {"finished": 1},  # the forgery (with the step's own fingerprint, below)
    {"finished": 1, "products": {"out.txt": "sha256:0"}, "upstream": {}, "digest": "0"},  # not its products' digest
])
def test_a_forged_done_json_is_not_finished(tmp_path, fake_stages, capsys, forged):
    run_dir = fake_run(tmp_path, only=["01", "02"])
    step = run_dir / "02_data_flaws"
    fingerprint = json.loads((step / "config.json").read_text())["fingerprint"]
    (step / "out.txt").write_text("forged")
    (step / "done.json").write_text(json.dumps({"fingerprint": fingerprint, **forged}))
    code, err = main(capsys, "export", "--run-id", "r", "--runs-root", tmp_path, "--to", tmp_path / "out")
    assert code == 2 and str(step / "done.json") in err, err
    assert not Step(run_dir, "02").done
    lines = []
    fake_stages.clear()
    fake_run(tmp_path, only=["01", "02"], log=lines.append)
    assert fake_stages == ["02_data_flaws"]
    assert any(str(step / "done.json") in line and "runs again" in line for line in lines), lines


def test_a_done_json_whose_upstream_names_a_path_is_not_trusted_and_named(tmp_path, fake_stages, capsys):
    run_dir = fake_run(tmp_path, only=["01", "02", "03"])
    done = run_dir / "03_base_model" / "done.json"
    marker = json.loads(done.read_text())
    marker["upstream"]["../../elsewhere"] = marker["upstream"]["01_generate_data"]
    done.write_text(json.dumps(marker))
    fake_stages.clear()
    code = cli.main(["run", "--preset", "smoke", "--run-id", "r", "--runs-root", str(tmp_path), "--engine",
                     "inprocess", "--stages", "01", "02", "03"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert fake_stages == ["03_base_model"] and Step(run_dir, "03").done
    assert f"{done}: its upstream record '../../elsewhere' is not a step of the run" in out, out


def test_an_empty_study_json_is_named(tmp_path, fake_stages, capsys):
    run_dir = fake_run(tmp_path)
    (run_dir / "study.json").write_text("")
    for command in (["figures", "--engine", "inprocess"], ["export", "--to", tmp_path / "out"]):
        code, err = main(capsys, *command, "--run-id", "r", "--runs-root", tmp_path)
        assert code == 2 and str(run_dir / "study.json") in err and "Traceback" not in err, (command, err)


@pytest.fixture
def read_only_root(tmp_path):
    """A runs folder nothing may be written into: a read-only mount where this process could write anyway (root)."""
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    probe = root / "probe"
    try:
        probe.mkdir()
    except PermissionError:
        yield root
        root.chmod(0o755)
        return
    probe.rmdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode != 0:
        root.chmod(0o755)
        pytest.skip("this process can write into a read-only folder and cannot mount one")
    yield root
    subprocess.run(["umount", str(root)], check=True)
    root.chmod(0o755)


def test_a_read_only_runs_root_is_a_message_and_other_os_errors_a_traceback(read_only_root, capsys, monkeypatch):
    code, err = main(capsys, "run", "--preset", "smoke", "--run-id", "r", "--runs-root", read_only_root,
                     "--engine", "inprocess", "--stages", "01")
    assert code == 2 and str(read_only_root / "r") in err and "Traceback" not in err, err
    assert "pick another --runs-root" in err or "pick a --runs-root" in err, err

    def broken(*args, **kwargs):  # a fault of the program, not of the runs folder: its traceback stays
        raise OSError(errno.EIO, "input/output error", "/somewhere/else/module.py")

    monkeypatch.setattr(cli, "run_study", broken)
    with pytest.raises(OSError, match="input/output error"):
        cli.main(["run", "--preset", "smoke", "--run-id", "r", "--runs-root", str(read_only_root), "--seeds", "0"])


# --------------------------------------------------------------------------------------------------------------
# 3. One writer per run: the papermill kernel does not outlive a killed runner
# --------------------------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie no init has reaped yet counts as gone: it executes nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_runner_leaves_no_kernel_writing_to_the_run(tmp_path):
    run_dir = tmp_path / "k"
    runner = subprocess.Popen([sys.executable, "-m", "synthflaw.cli", "run", "--preset", "smoke", "--run-id", "k",
                               "--runs-root", str(tmp_path), "--stages", "01", "02"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (kernels := _children(runner.pid)) or not (run_dir / "01_generate_data" / "notebook.ipynb").exists():
            assert runner.poll() is None and time.time() < deadline, "the runner did not start its kernel"
            time.sleep(0.05)
        time.sleep(1.0)  # into the execution of stage 01
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    # From the kill on: whenever the run can be locked, no kernel of the killed runner is running
    deadline = time.time() + 30
    while True:
        try:
            with runs.run_lock(run_dir):
                assert not [pid for pid in kernels if _alive(pid)], "the lock was free while the kernel ran"
            break
        except runs.RunLocked as error:
            assert "notebook kernel" in str(error)
            assert time.time() < deadline, "the kernel kept the run locked for 30 s"
            time.sleep(0.01)
    markers = sorted(run_dir.rglob("done.json"))
    time.sleep(2)
    assert sorted(run_dir.rglob("done.json")) == markers  # nothing is written after the lock is free


LAUNCHER = """
import sys
from synthflaw.training import launch
# a stand-in for `accelerate launch` (and a worker of it): writes its pid, then trains for ten minutes
child = "import os, sys, time, pathlib; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(600)"
launch.accelerate_command = lambda *args, **kwargs: [sys.executable, "-c", child, sys.argv[1]]
launch.launch_job({"out_dir": sys.argv[2]}, sys.argv[2], num_processes=2, echo=lambda line: None)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_leaves_no_launched_training_running(tmp_path):
    """Stages 03, 04 and 06 run `accelerate launch` with compute.num_processes > 1: the launch writes into the run
    too, and must end with the process that started it (the kernel, or the runner in process)."""
    pid_file = tmp_path / "child.pid"
    runner = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(pid_file), str(tmp_path / "job")],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert runner.poll() is None and time.time() < deadline, "the launch did not start"
            time.sleep(0.05)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child):
        assert time.time() < deadline, "the launched process outlived its killed runner"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------------------
# 7. No absolute path of the machine in an export
# --------------------------------------------------------------------------------------------------------------

def test_the_runners_kernel_shows_no_missing_widget_warning(tmp_path):
    from synthflaw.runner.notebooks import _reset_namespace, notebook_kernel

    output = []
    with notebook_kernel(REPO) as km:
        _reset_namespace(km)
        client = km.blocking_client()
        client.start_channels()
        try:
            client.execute_interactive("import sys; sys.modules['ipywidgets'] = None; import tqdm.auto",
                                       timeout=120, output_hook=lambda msg: output.append(msg["content"]))
        finally:
            client.stop_channels()
    text = "".join(c.get("text", "") for c in output)
    assert "IProgress" not in text and sys.prefix not in text, text


def test_an_export_holds_no_absolute_path_of_the_machine(tmp_path, fake_stages):
    from synthflaw.export import export_run

    run_dir = fake_run(tmp_path)
    warning = f"{sys.prefix}/lib/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"
    notebook = {"cells": [{"cell_type": "code", "execution_count": 1, "id": "a", "metadata": {}, "source": "x = 1",
                           "outputs": [{"output_type": "stream", "name": "stderr",
                                        "text": warning + f"read {REPO / 'notebooks'}\n"}]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (run_dir / "02_data_flaws" / "notebook.ipynb").write_text(json.dumps(notebook))
    export_run(run_dir, tmp_path / "out", runs_root=tmp_path)
    html = (tmp_path / "out" / "notebooks" / "02_data_flaws.html").read_text()
    assert "{python}/lib/site-packages/tqdm/auto.py" in html and "{repository}/notebooks" in html
    for path in (sys.prefix, str(REPO), str(tmp_path)):
        assert path not in html


def test_no_committed_run_file_holds_an_absolute_path():
    listed = subprocess.run(["git", "ls-files", "runs"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the committed files are unknown")
    machine = ("/home/", "/work/", "/root/", "/Users/", "/tmp/", ".venv/lib")
    found = [f"{name}: {marker}" for name in listed.stdout.split("\n") if name.endswith((".json", ".csv", ".md", ".html"))
             for marker in machine if marker in (REPO / name).read_text(encoding="utf-8", errors="replace")]
    assert found == []


# --------------------------------------------------------------------------------------------------------------
# 9. Third round (issue 43): an export never hides a stale step
# --------------------------------------------------------------------------------------------------------------

def test_an_allow_unfinished_export_says_what_was_stale_and_keeps_it_stale(tmp_path, fake_stages, capsys):
    run_dir = fake_run(tmp_path)
    edited = run_dir / "07_evaluate" / "natural" / "metrics.json"
    edited.write_text(edited.read_text()[:-1] + ', "items_2": NaN}')  # a finished product changed by hand
    common = ["--runs-root", tmp_path]
    code, err = main(capsys, "export", "--run-id", "r", "--to", tmp_path / "out", *common)
    assert code == 2 and "07_evaluate/natural is stale" in err, err
    code, err = main(capsys, "export", "--run-id", "r", "--to", tmp_path / "out", "--allow-unfinished", *common)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "unfinished.json").read_text())
    assert "07_evaluate/natural" in record["steps"] and any("07_evaluate/natural is stale" in line
                                                              for line in record["unfinished"])
    # the stale step was not sealed again over the edited file: the export is as stale as its source
    code, err = main(capsys, "export", "--run-id", "out", "--to", tmp_path / "again", *common)
    assert code == 2 and "07_evaluate/natural is stale" in err, err
    code, err = main(capsys, "figures", "--run-id", "out", "--engine", "inprocess", *common)
    assert code == 2 and "07_evaluate/natural" in err, err


def test_an_export_of_a_multi_seed_run_refuses_a_missing_listed_seed(tmp_path, fake_stages, capsys):
    code, err = main(capsys, "run", "--preset", "smoke", "--seeds", "0", "1", "--run-id", "m", "--runs-root",
                     tmp_path, "--engine", "inprocess", "--stages", "01", "02")
    assert code == 0, err
    shutil.rmtree(tmp_path / "m" / "seed-1")
    code, err = main(capsys, "export", "--run-id", "m", "--to", tmp_path / "out", "--runs-root", tmp_path)
    assert code == 2 and "seed-1: listed in seeds.json, missing" in err, err
    code, err = main(capsys, "figures", "--run-id", "m", "--engine", "inprocess", "--runs-root", tmp_path)
    assert code == 2 and "seed-1 is missing" in err, err
