"""Run folders one can trust: the provenance chain (digests in done.json, stale steps refused or redone), run ids
checked before anything is written, the lock on a run folder, partial states named, progress lines.

Most tests run the real runner on stand-in stages (tests' `FakeStage`): each reads its upstreams through the same
Step calls as the real stage and writes a small product derived from what it read and its configuration, in
milliseconds. The tests marked slow run the real smoke study.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from synthflaw import cli, config, runner, runs, stages
from synthflaw.registry import models_of, sft_start, study_steps
from synthflaw.registry import stage as stage_named
from synthflaw.runner import StepFailed, regenerate, run_study
from synthflaw.runs import Step, StepConfigChanged

# What this module adds to the library is used through its module (runs.StepStale, runner.DoneWatcher): the tests
# also collect, and fail each for its own reason, on the code before it.

SUITE_LINES = 24


# --------------------------------------------------------------------------------------------------------------
# Stand-in stages
# --------------------------------------------------------------------------------------------------------------

def _product(step, inputs: list[Path]) -> str:
    """What a stand-in step 'computes': its configuration fingerprint and the products it read."""
    text = json.dumps(runs.step_config(step.cfg, step.stage, step.variant), sort_keys=True, default=str)
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        text += "".join(f.read_text() for f in files if f.name == "out.txt" or f.suffix == ".jsonl")
    return str(abs(hash(text)))


class FakeStage:
    """A stage module whose run() reads what the real stage reads (same Step calls) and writes small products."""

    def __init__(self, number: str, calls: list[str]):
        self.number, self.calls = number, calls

    def run(self, cfg, step) -> dict:
        self.calls.append(step.name)
        n, v = self.number, step.variant
        extra = {}
        if n == "01":
            data = step.path / "data"
            data.mkdir(parents=True, exist_ok=True)
            (data / "instruction_suite.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(SUITE_LINES)))
            inputs = []
        elif n in ("02", "03"):
            inputs = [step.upstream("01") / "data"]
        elif n == "04":
            start = step.upstream("04", cfg.cpt.more_natural_from) if v == "more_natural" else step.upstream("03")
            inputs = [step.upstream("01") / "data", start / "model"]
            extra["started_from"] = str((start / "model").relative_to(step.run_dir))
        elif n == "05":
            inputs = [step.upstream("01") / "data", step.upstream("04", "synthetic") / "model"]
            # like a diverged unlearning run, the result names a folder by its absolute path
            extra["message"] = f"kept the last good checkpoint, {step.path.resolve()}/checkpoints/checkpoint-2"
        elif n == "06":
            start = step.upstream(*sft_start(v)) / "model"
            inputs = [step.upstream("01") / "data", start]
            extra["started_from"] = str(start.relative_to(step.run_dir))
        elif n == "07":
            data = step.upstream("01") / "data"
            sft = step.upstream("06", v)
            pre_sft = step.read(json.loads((sft / "result.json").read_text())["started_from"])
            natural = step.read_step("06", "natural")
            inputs = [data, sft / "model", pre_sft] + ([natural / "model"] if natural else [])
            items = len((data / "instruction_suite.jsonl").read_text().splitlines())
            (step.path / "metrics.json").write_text(json.dumps({"items": items}))
            extra["items"] = items
        else:  # 08: everything finished before it
            finished = step.read_run()
            inputs = [s.path for s in finished]
            extra["models"] = sorted(s.variant for s in finished if s.stage.number == "07")
        value = _product(step, inputs)
        (step.path / "out.txt").write_text(value)
        if n in ("03", "04", "05", "06"):
            (step.path / "model").mkdir(exist_ok=True)
            (step.path / "model" / "weights.bin").write_text(value)
            (step.path / "checkpoints").mkdir(exist_ok=True)  # never part of the digest
            (step.path / "checkpoints" / "state.bin").write_text(str(time.time()))
        return {"value": value, **extra}


class Calls(list):
    """The steps the stand-ins ran, in order; `keep`: stage numbers that run their real module instead."""

    keep: set[str]


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace every stage module by a FakeStage (or keep the real ones listed); returns the list of steps run."""
    calls = Calls()
    real = stages.stage_module
    keep: set[str] = set()

    def stage_module(stage):
        number = stage_named(stage).number
        return real(stage) if number in keep else FakeStage(number, calls)

    monkeypatch.setattr(stages, "stage_module", stage_module)
    calls.keep = keep  # a test may keep a real stage: calls.keep.add("08")
    return calls


def fake_run(root, run_id="r", overrides=None, **kw):
    kw.setdefault("log", lambda _: None)
    return run_study("smoke", run_id, overrides, runs_root=root, engine="inprocess", **kw)


def marker(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "done.json").read_text())


def test_the_lifecycle_decides_skip_reset_resume_and_refuse_for_both_engines(tmp_path, fake_stages):
    from synthflaw.runs import decide

    run_dir = fake_run(tmp_path)
    cfg = config.resolve("smoke")
    sft = Step(run_dir, "06", "natural")
    assert decide(sft, cfg).action == "skip"
    # an upstream it read ran again in this run (the runner's case): it runs again, the reason named
    again = decide(sft, cfg, ran={"04_continued_pretraining/natural"})
    assert (again.action, again.reason) == ("reset", "04_continued_pretraining/natural ran again in this run")
    # its own products edited: stale; refused unless overwrite (a notebook asks with the products' digests)
    (sft.path / "model" / "weights.bin").write_text("edited")
    fresh = runs.Freshness(run_dir)
    with pytest.raises(runs.StepStale, match="06_sft/natural is stale: model/weights.bin changed"):
        decide(sft, cfg, causes=lambda step, marker: fresh.causes(step.name))
    assert decide(sft, cfg, overwrite=True, causes=lambda step, marker: fresh.causes(step.name)).action == "reset"
    # another configuration: refused unless overwrite
    other = config.resolve("smoke", {"sft.learning_rate": 0.123})
    with pytest.raises(StepConfigChanged, match="ran with a different configuration"):
        decide(sft, other)
    assert decide(sft, other, overwrite=True).action == "reset"
    # started, not finished: resumed, unless what it may read ran again since it started
    (sft.path / "done.json").unlink()
    assert decide(sft, cfg).action == "resume"
    assert decide(sft, cfg, ran={"03_base_model"}, restart_after=["03_base_model"]).action == "reset"
    assert decide(Step(run_dir, "06", "elsewhere"), cfg).action == "run"
    assert decide(sft, cfg, reset=True).action == "reset"


# --------------------------------------------------------------------------------------------------------------
# 1. The provenance chain
# --------------------------------------------------------------------------------------------------------------

def test_done_json_records_products_and_every_upstream_read(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path)
    evaluate = marker(run_dir, "07_evaluate/unlearn-npo")
    assert evaluate["digest"] and set(evaluate["products"]) == {"metrics.json", "out.txt", "result.json"}
    # read through upstream(), read() (result.json's started_from) and read_step() (the natural reference)
    assert set(evaluate["upstream"]) == {"01_generate_data", "06_sft/unlearn-npo", "05_unlearning/npo",
                                         "06_sft/natural"}
    assert evaluate["upstream"]["06_sft/natural"] == marker(run_dir, "06_sft/natural")["digest"]
    sft = marker(run_dir, "06_sft/natural")
    assert "model/weights.bin" in sft["products"] and not any(p.startswith("checkpoints") for p in sft["products"])
    figures = marker(run_dir, "08_figures")
    assert figures["reads_run"] and len(figures["upstream"]) == len(study_steps(config.resolve("smoke"))) - 1


def test_product_files_leave_out_bookkeeping_notebooks_pictures_and_working_folders(tmp_path, monkeypatch):
    step = tmp_path / "03_base_model"
    for rel in ("done.json", "meta.json", "config.json", "notebook.ipynb", "notebook-20260101-000000.ipynb",
                "loss.png", "launch.log", "checkpoints/checkpoint-8/model.safetensors", "rejected/x.bin",
                "init/model.safetensors", ".result.json.tmp", ".ipynb_checkpoints/a.ipynb",
                "result.json", "loss.csv", "model/config.json", "model/model.safetensors", "tokenizer/tokenizer.json"):
        (step / rel).parent.mkdir(parents=True, exist_ok=True)
        (step / rel).write_text(rel)
    assert [p.as_posix() for p in runs.product_files(step)] == [
        "loss.csv", "model/config.json", "model/model.safetensors", "result.json", "tokenizer/tokenizer.json"]
    digests = runs.product_digests(step)
    assert digests["loss.csv"].startswith("sha256:")
    monkeypatch.setattr(runs.markers, "LARGE_FILE_BYTES", 10)  # over the limit: size and modification time stand for it
    assert runs.product_digests(step)["model/model.safetensors"].startswith("size:23:mtime_ns:")


def test_changed_upstream_configuration_outside_the_stages_asked_is_refused(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path)
    before = (run_dir / "07_evaluate" / "natural" / "result.json").read_text()
    new_lr = {"sft.learning_rate": 1e-3}
    for overwrite in (False, True):  # --overwrite cannot redo 06 when --stages leaves it out
        with pytest.raises(StepConfigChanged) as err:
            fake_run(tmp_path, overrides=new_lr, only=["07", "08"], overwrite=overwrite)
        assert re.search(r"06_sft/natural, 06_sft/synthetic, .* ran with a different configuration "
                         r"\(sft.learning_rate: 0.002 -> 0.001\)", str(err.value))
        assert "--stages 06 07 08" in str(err.value)
    assert (run_dir / "07_evaluate" / "natural" / "result.json").read_text() == before  # nothing touched
    fake_stages.clear()
    fake_run(tmp_path, overrides=new_lr, overwrite=True)  # every stage: 06 and what reads it run again
    assert set(fake_stages) == {s.name for s in study_steps(config.resolve("smoke")) if s.stage.number >= "06"}
    assert json.loads((run_dir / "06_sft" / "natural" / "config.json").read_text())["study"]["sft"][
        "learning_rate"] == 1e-3
    assert (run_dir / "07_evaluate" / "natural" / "result.json").read_text() != before


def test_another_synthetic_share_runs_again_only_what_reads_it(tmp_path, fake_stages):
    # natural and more_natural never read cpt.synthetic_fraction: their steps stay current when it changes
    run_dir = fake_run(tmp_path)
    natural = {name: marker(run_dir, name) for name in ("04_continued_pretraining/natural", "06_sft/natural",
                                                        "07_evaluate/natural")}
    fake_stages.clear()
    fake_run(tmp_path, overrides={"cpt.synthetic_fraction": 0.1}, overwrite=True)
    cfg = config.resolve("smoke")
    assert cfg.cpt.more_natural_from == "synthetic"  # so more_natural's upstream runs again, and so does it
    assert set(fake_stages) == {s.name for s in study_steps(cfg) if s.stage.number >= "04" and s.variant not in ("natural", "harmed")}
    assert {name: marker(run_dir, name) for name in natural} == natural  # not touched
    saved = json.loads((run_dir / "04_continued_pretraining" / "synthetic" / "config.json").read_text())
    assert saved["study"]["cpt"]["synthetic_fraction"] == 0.1


def test_a_cut_data_file_is_refused_then_redone_with_everything_downstream(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path)
    suite = run_dir / "01_generate_data" / "data" / "instruction_suite.jsonl"
    suite.write_text("".join(suite.read_text().splitlines(keepends=True)[:5]))  # cut at a line boundary
    study_before = (run_dir / "study.json").stat().st_mtime_ns
    fake_stages.clear()
    with pytest.raises(runs.StepStale) as err:
        fake_run(tmp_path)
    message = str(err.value)
    assert "01_generate_data is stale: data/instruction_suite.jsonl changed since it finished" in message
    assert "--overwrite" in message and fake_stages == []
    assert (run_dir / "study.json").stat().st_mtime_ns == study_before  # refused before anything was written
    with pytest.raises(runs.StepStale, match="01_generate_data"):  # also when the stages asked for only read it
        fake_run(tmp_path, only=["07", "08"], overwrite=True)
    fake_run(tmp_path, overwrite=True)
    assert len(fake_stages) == len(study_steps(config.resolve("smoke")))  # 01 and everything downstream
    assert json.loads((run_dir / "07_evaluate" / "natural" / "metrics.json").read_text())["items"] == SUITE_LINES
    fake_stages.clear()
    fake_run(tmp_path)
    assert fake_stages == []  # current again: nothing runs


def test_figures_before_evaluation_are_made_again_when_the_evaluations_finish(tmp_path, fake_stages):
    fake_run(tmp_path, only=["01", "02", "03", "04", "05", "06"])
    run_dir = regenerate("r", runs_root=tmp_path, engine="inprocess", log=lambda _: None)
    assert json.loads((run_dir / "08_figures" / "result.json").read_text())["models"] == []
    lines = []
    fake_run(tmp_path, log=lines.append)
    assert any("08_figures" in line and "runs again" in line and "07_evaluate/natural" in line for line in lines)
    models = json.loads((run_dir / "08_figures" / "result.json").read_text())["models"]
    assert models == sorted(models_of(config.resolve("smoke")))


def test_an_upstream_run_again_makes_its_readers_run_again_in_the_same_run(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path)
    # a step deleted by hand runs again, and so does every finished step that read it (not the others)
    shutil.rmtree(run_dir / "04_continued_pretraining" / "rewritten")
    fake_stages.clear()
    fake_run(tmp_path)
    assert fake_stages == ["04_continued_pretraining/rewritten", "06_sft/rewritten", "07_evaluate/rewritten",
                           "08_figures"]
    fake_stages.clear()
    fake_run(tmp_path)
    assert fake_stages == []


def test_a_half_done_step_starts_over_when_its_upstream_ran_again(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path, only=["01", "02", "03", "04"])
    half = run_dir / "04_continued_pretraining" / "natural"
    (half / "done.json").unlink()  # killed after its products were written, before it was marked done
    (half / "checkpoints" / "old").write_text("trained on the old base model")
    (run_dir / "03_base_model" / "model" / "weights.bin").write_text("edited")
    lines = []
    fake_run(tmp_path, only=["01", "02", "03", "04"], overwrite=True, log=lines.append)
    assert not (half / "checkpoints" / "old").exists()
    assert any("04_continued_pretraining/natural" in line and "starts over" in line for line in lines)


def test_a_stale_step_is_refused_by_the_notebook_entry_point_too(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path, only=["01", "02"])
    (run_dir / "02_data_flaws" / "out.txt").write_text("edited by hand")
    cfg = config.resolve("smoke")
    with pytest.raises(runs.StepStale, match="out.txt changed"):
        stages.run_stage("02", run_dir, cfg, log=lambda _: None)
    stages.run_stage("02", run_dir, cfg, overwrite=True, log=lambda _: None)
    assert (run_dir / "02_data_flaws" / "out.txt").read_text() != "edited by hand"


def test_the_digest_check_of_a_large_run_is_cheap(tmp_path, fake_stages):
    """31 steps, the 18 model folders ~10 MB each (the default preset's size): the check at the start of a run whose
    steps are all done must stay well under the seconds a step takes."""
    run_dir = fake_run(tmp_path)
    for model in run_dir.glob("0[3-6]_*/**/model"):
        (model / "model.safetensors").write_bytes(os.urandom(10 * 2**20))
        step_dir = model.parent
        done = json.loads((step_dir / "done.json").read_text())
        done["products"] = runs.product_digests(step_dir)
        done["digest"] = runs.combined_digest(done["products"])
        (step_dir / "done.json").write_text(json.dumps(done))
    fake_run(tmp_path, overwrite=True)  # the readers take the new digests
    started = time.perf_counter()
    fake_run(tmp_path)
    assert time.perf_counter() - started < 10


# --------------------------------------------------------------------------------------------------------------
# 2. Run ids and where commands write
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id, expected", [("", "empty"), ("../../evil", "path separator"),
                                              ("/abs/dir", "path separator"), (".hidden", "starts with '.'"),
                                              ("x" * 300, "300 bytes long in UTF-8 \\(300 characters\\); at most 100"),
                                              ("a\nb", "non-printable"), ("a\\b", "path separator"),
                                              (" ", "white space"), (" a", "white space"), ("~", "starts with '~'"),
                                              ("研" * 100, "300 bytes long in UTF-8 \\(100 characters\\)")])
def test_bad_run_ids_are_refused_naming_the_problem(run_id, expected):
    with pytest.raises(ValueError, match=expected):
        runs.check_run_id(run_id)


def test_every_command_checks_the_run_id_before_writing_or_deleting(tmp_path, capsys):
    root = tmp_path / "a" / "b" / "runs"
    root.mkdir(parents=True)
    victim = tmp_path / "victim"
    (victim / "08_figures").mkdir(parents=True)
    (victim / "study.json").write_text("{}")
    commands = [["run", "--preset", "smoke", "--seeds", "0", "1", "--run-id", "../../evil"],
                ["run", "--preset", "smoke", "--run-id", "../../evil"],
                ["run", "--preset", "smoke", "--run-id", ""],
                ["run", "--preset", "smoke", "--run-id", "x" * 300],
                ["figures", "--run-id", str(victim)],
                ["export", "--run-id", "../../evil", "--to", str(root / "out")]]
    for command in commands:
        assert cli.main([*command, "--runs-root", str(root)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("synthflaw: error:") and "run id" in err and "Traceback" not in err, err
    assert (victim / "08_figures").exists()  # `figures` deleted nothing
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", "b", "runs", "victim", "08_figures",
                                                                  "study.json"])


def test_a_run_folder_must_resolve_inside_the_runs_root(tmp_path, capsys):
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere)
    assert cli.main(["run", "--preset", "smoke", "--run-id", "linked", "--runs-root", str(root)]) == 2
    assert "outside the runs folder" in capsys.readouterr().err and list(elsewhere.iterdir()) == []


def test_export_target_must_be_inside_the_runs_root_and_new(tmp_path, fake_stages, capsys):
    fake_run(tmp_path)
    for target, expected in ((tmp_path.parent / "out", "outside the runs folder"), (tmp_path / "r", "exists")):
        assert cli.main(["export", "--run-id", "r", "--to", str(target), "--runs-root", str(tmp_path)]) == 2
        assert expected in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# 3. The lock
# --------------------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from synthflaw.runs import run_lock
with run_lock(sys.argv[1]):
    Path(sys.argv[2]).write_text("held")
    time.sleep(600)
"""


def test_a_second_process_on_the_same_run_fails_at_once_naming_the_holder(tmp_path):
    run_dir, ready = tmp_path / "runs" / "same", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ready)])
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline, "the holder did not take the lock"
            time.sleep(0.1)
        started = time.time()
        second = subprocess.run([sys.executable, "-m", "synthflaw.cli", "run", "--preset", "smoke", "--run-id",
                                 "same", "--runs-root", str(tmp_path / "runs"), "--engine", "inprocess"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"in use by another synthflaw process (pid {holder.pid})" in second.stderr
        assert time.time() - started < 60 and not (run_dir / "01_generate_data").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the OS releases the lock, nothing is left to clean up
        holder.wait()
    with runs.run_lock(run_dir):
        assert (run_dir / ".lock.pid").read_text().strip() == str(os.getpid())
    assert not (run_dir / ".lock.pid").exists()


def _lockable(run_dir) -> bool:
    """Whether another open file could take the run's lock now (flock locks of two open files conflict, even in
    one process)."""
    import fcntl

    fd = os.open(run_dir / runs.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    run_dir = tmp_path / "r"
    with runs.run_lock(run_dir):
        with runs.run_lock(run_dir):  # the same process again: entered at once, no RunLocked
            assert not _lockable(run_dir)
        # leaving the inner one keeps the outer one's lock and its pid file
        assert not _lockable(run_dir) and len(runs.held_lock_fds()) == 1
        assert (run_dir / runs.PID_NAME).read_text().split() == [str(os.getpid())]
    assert _lockable(run_dir) and runs.held_lock_fds() == [] and not (run_dir / runs.PID_NAME).exists()


def test_run_figures_and_export_refuse_a_run_held_by_another_process(tmp_path, fake_stages):
    from synthflaw.export import export_run

    run_dir = fake_run(tmp_path, "same")
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ready)])
    try:
        while not ready.exists():
            assert holder.poll() is None, "the holder did not take the lock"
            time.sleep(0.1)
        for command in (lambda: fake_run(tmp_path, "same"),
                        lambda: regenerate("same", runs_root=tmp_path, engine="inprocess", log=lambda _: None),
                        lambda: export_run(run_dir, tmp_path / "exported", html=False, runs_root=tmp_path)):
            with pytest.raises(runs.RunLocked, match=f"pid {holder.pid}"):
                command()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runs.run_lock(run_dir):  # this process holds it: a nested run goes on (figures of a multi-seed run)
        fake_run(tmp_path, "same")


# --------------------------------------------------------------------------------------------------------------
# 4. Partial states, named
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [("{not json", "is not valid JSON"),
                                               ('{"finished": 1}', "lacks the keys fingerprint, finished")])
def test_a_garbage_done_json_counts_as_not_done_and_is_named(tmp_path, fake_stages, content, expected):
    run_dir = fake_run(tmp_path, only=["01", "02"])
    (run_dir / "02_data_flaws" / "done.json").write_text(content)
    assert not Step(run_dir, "02").done
    lines = []
    fake_stages.clear()
    fake_run(tmp_path, only=["01", "02"], log=lines.append)
    assert fake_stages == ["02_data_flaws"]
    assert any(str(run_dir / "02_data_flaws" / "done.json") in line and expected in line for line in lines)
    assert Step(run_dir, "02").done


def test_a_broken_config_json_names_the_file_and_the_fix(tmp_path, fake_stages, capsys):
    run_dir = fake_run(tmp_path, only=["01", "02", "03"])
    (run_dir / "03_base_model" / "config.json").write_text("{")
    with pytest.raises(StepConfigChanged) as err:
        fake_run(tmp_path, only=["01", "02", "03"])
    assert str(run_dir / "03_base_model" / "config.json") in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(runs.BrokenStepFile, match="config.json cannot be read"):
        Step(run_dir, "03").status(config.resolve("smoke"))
    fake_run(tmp_path, only=["01", "02", "03"], overwrite=True)
    assert Step(run_dir, "03").done


def test_an_upstream_finished_again_with_new_products_makes_its_readers_stale(tmp_path, fake_stages):
    # 01 ran again and finished (a valid done.json) with other products: a new digest. Not deleted, not edited
    # after finishing: only the digest its readers recorded tells them it is not what they read.
    run_dir = fake_run(tmp_path, only=["01", "02", "03"])
    suite = run_dir / "01_generate_data" / "data" / "instruction_suite.jsonl"
    old = marker(run_dir, "01_generate_data")["digest"]
    suite.write_text(suite.read_text() + '{"id": 99}\n')
    (run_dir / "01_generate_data" / "done.json").unlink()
    assert Step(run_dir, "01").complete()["digest"] != old
    fresh = runs.Freshness(run_dir)
    assert fresh.causes("01_generate_data") == []  # itself current: its products are what its marker says
    for reader in ("02_data_flaws", "03_base_model"):
        assert [(c.kind, c.upstream) for c in fresh.causes(reader)] == [("upstream changed", "01_generate_data")]
        assert str(fresh.causes(reader)[0]) == (f"{reader} is stale: 01_generate_data ran again or changed since "
                                                "it was read")
    fake_stages.clear()
    with pytest.raises(runs.StepStale) as err:  # a plain run refuses, before running anything
        fake_run(tmp_path, only=["01", "02", "03"])
    assert "02_data_flaws, 03_base_model are stale: 01_generate_data ran again or changed" in str(err.value)
    assert fake_stages == []
    fake_run(tmp_path, only=["01", "02", "03"], overwrite=True)  # --overwrite runs the readers again
    assert fake_stages == ["02_data_flaws", "03_base_model"]
    new = marker(run_dir, "01_generate_data")["digest"]
    assert marker(run_dir, "02_data_flaws")["upstream"] == {"01_generate_data": new}
    assert runs.Freshness(run_dir).causes("02_data_flaws") == []


def test_describe_changes_names_folders_and_files_deleted_changed_and_added(tmp_path):
    (tmp_path / "kept").mkdir()  # "gone/" no longer exists; "kept/" does, with one file of it deleted
    recorded = {"a.txt": "1", "b.txt": "2", "d.txt": "2", "gone/x": "3", "gone/y": "4", "kept/z": "5", "kept/w": "6"}
    current = {"a.txt": "1", "b.txt": "changed", "kept/w": "6", "new/p": "7", "new/q": "8", "kept/v": "9", "c.txt": "0"}
    assert runs.describe_changes(tmp_path, recorded, current) == [
        "gone/ was deleted", "d.txt was deleted", "kept/z was deleted", "b.txt changed", "new/ was added",
        "c.txt was added", "kept/v was added"]
    assert runs.describe_changes(tmp_path, recorded, dict(recorded)) == []


def test_freshness_names_every_cause_of_staleness(tmp_path, fake_stages, monkeypatch):
    run_dir = fake_run(tmp_path)
    data = run_dir / "01_generate_data" / "data"
    for k in range(4):  # four products added: three named, the rest counted
        (data / f"extra{k}.jsonl").write_text("{}\n")
    hashed = []
    real = runs.product_digests
    monkeypatch.setattr(runs.staleness, "product_digests", lambda path: hashed.append(path) or real(path))
    fresh = runs.Freshness(run_dir)
    assert [str(c) for c in fresh.causes("01_generate_data")] == [
        "01_generate_data is stale: data/extra0.jsonl was added; data/extra1.jsonl was added; data/extra2.jsonl "
        "was added (and 1 more) since it finished"]
    assert [(c.kind, c.upstream) for c in fresh.causes("01_generate_data")] == [("products", None)]
    assert [(c.step, c.kind, c.upstream, c.text) for c in fresh.causes("02_data_flaws")] == [
        ("02_data_flaws", "upstream stale", "01_generate_data", "it read 01_generate_data, which is stale")]
    fresh.causes("03_base_model")
    assert hashed.count(run_dir / "01_generate_data") == 1  # each step's products hashed once per instance
    assert fresh.causes("07_evaluate/absent") == []  # not finished: nothing to be stale
    # an upstream no longer finished: named with why
    (data / "extra3.jsonl").unlink()  # three changes: all named, with no count
    assert [c.text for c in runs.Freshness(run_dir).causes("01_generate_data")] == [
        "data/extra0.jsonl was added; data/extra1.jsonl was added; data/extra2.jsonl was added since it finished"]
    for k in range(3):
        (data / f"extra{k}.jsonl").unlink()
    (run_dir / "06_sft" / "natural" / "done.json").unlink()
    (run_dir / "06_sft" / "synthetic" / "done.json").write_text("not json")
    fresh = runs.Freshness(run_dir)
    assert [c.text for c in fresh.causes("07_evaluate/natural")] == [
        "06_sft/natural was read but is no longer finished (no done.json)"]
    [cause] = [c for c in fresh.causes("07_evaluate/synthetic") if c.upstream == "06_sft/synthetic"]
    assert cause.kind == "upstream unfinished" and cause.upstream == "06_sft/synthetic"
    assert cause.step == "07_evaluate/synthetic"
    assert cause.text.startswith("06_sft/synthetic was read but is no longer finished (")
    assert "done.json is not valid JSON" in cause.text
    # a step that reads the whole run: the steps that finished after it, three named and the rest counted
    figures = run_dir / "08_figures" / "done.json"
    done = json.loads(figures.read_text())
    later = [name for name in done["upstream"] if name.startswith("07_evaluate/")][:4]
    done["upstream"] = {k: v for k, v in done["upstream"].items() if k not in later}
    figures.write_text(json.dumps(done))
    new = [c for c in runs.Freshness(run_dir).causes("08_figures") if c.kind == "new steps"]
    assert [(c.step, c.upstream, c.text) for c in new] == [
        ("08_figures", None, f"{', '.join(later[:3])} and 1 more finished after it ran")]
    done["upstream"][later[3]] = "x"  # three new steps: all named
    figures.write_text(json.dumps(done))
    new = [c for c in runs.Freshness(run_dir).causes("08_figures") if c.kind == "new steps"]
    assert [c.text for c in new] == [f"{', '.join(later[:3])} finished after it ran"]
    # a marker from before upstreams were recorded: no upstream to check
    flaws = json.loads((run_dir / "02_data_flaws" / "done.json").read_text())
    del flaws["upstream"]
    (run_dir / "02_data_flaws" / "done.json").write_text(json.dumps(flaws))
    assert runs.Freshness(run_dir).causes("02_data_flaws") == []
    # a marker from before products were recorded: nothing to check its products against
    del done["products"]
    figures.write_text(json.dumps(done))
    (run_dir / "08_figures" / "out.txt").write_text("edited")
    assert runs.Freshness(run_dir).product_changes(Step(run_dir, "08"), done) == []


def test_a_deleted_model_folder_is_stale_naming_model(tmp_path, fake_stages):
    run_dir = fake_run(tmp_path)
    shutil.rmtree(run_dir / "06_sft" / "natural" / "model")
    with pytest.raises(runs.StepStale) as err:
        fake_run(tmp_path)
    assert "06_sft/natural is stale: model/ was deleted since it finished" in str(err.value)


def test_figures_state_the_models_without_a_finished_evaluation(tmp_path, fake_stages, monkeypatch):
    from synthflaw.stages import s08_figures

    fake_stages.keep.add("08")  # the real stage 08, drawing nothing (the stand-ins' files are not real metrics)
    monkeypatch.setattr(s08_figures, "make_figures", lambda run_dir, out, dpi: {"figures": [], "models": []})
    run_dir = fake_run(tmp_path, only=["01", "02", "03", "04", "05", "06", "07"])
    shutil.rmtree(run_dir / "07_evaluate" / "synthetic")
    lines = []
    regenerate("r", runs_root=tmp_path, engine="inprocess", log=lines.append)
    result = json.loads((run_dir / "08_figures" / "result.json").read_text())
    assert result["missing_models"] == ["synthetic"] and result["unfinished_steps"] == ["07_evaluate/synthetic"]
    assert any(line.startswith("08_figures: no finished evaluation for synthetic") for line in lines)


def test_export_refuses_an_unfinished_run_and_writes_paths_relative_to_the_run(tmp_path, fake_stages):
    from synthflaw.export import export_run

    run_dir = fake_run(tmp_path)
    (run_dir / "07_evaluate" / "natural" / "done.json").unlink()
    with pytest.raises(ValueError, match="07_evaluate/natural: not finished"):
        export_run(run_dir, tmp_path / "exported", html=False, runs_root=tmp_path)
    assert not (tmp_path / "exported").exists()
    fake_run(tmp_path)  # finishes it (and what reads it)
    export_run(run_dir, tmp_path / "exported", html=False, runs_root=tmp_path)
    result = (tmp_path / "exported" / "05_unlearning" / "npo" / "result.json").read_text()
    assert str(run_dir.resolve()) not in result and "05_unlearning/npo/checkpoints/checkpoint-2" in result
    # the export is a run of its own: its steps are current, so its figures can be made again
    fake_stages.clear()
    regenerate("exported", runs_root=tmp_path, engine="inprocess", log=lambda _: None)
    assert fake_stages == ["08_figures"]


def test_export_with_allow_unfinished(tmp_path, fake_stages, capsys):
    fake_run(tmp_path, only=["01", "02"])
    args = ["export", "--run-id", "r", "--to", str(tmp_path / "e"), "--runs-root", str(tmp_path)]
    assert cli.main(args) == 2 and "03_base_model: not finished" in capsys.readouterr().err
    assert cli.main(args + ["--allow-unfinished"]) == 0 and (tmp_path / "e" / "02_data_flaws" / "done.json").exists()


# --------------------------------------------------------------------------------------------------------------
# 5. Progress lines
# --------------------------------------------------------------------------------------------------------------

def test_a_line_per_step_as_its_done_json_appears(tmp_path):
    cfg = config.resolve("smoke")
    specs = [s for s in study_steps(cfg) if s.stage.number == "06"][:3]
    todo = [(spec, Step(tmp_path, spec.stage, spec.variant)) for spec in specs]
    lines = []

    def finish_all():
        for _, step in todo:
            time.sleep(0.3)
            step.path.mkdir(parents=True)
            (step.path / "config.json").write_text('{"fingerprint": "x"}')
            (step.path / "done.json").write_text(json.dumps({"fingerprint": "x", "finished": 0, "products": {},
                                                             "digest": runs.combined_digest({}), "upstream": {}}))

    with runner.DoneWatcher(todo, lambda spec, s: f"{spec.name} done in {s:.1f} s", lines.append, interval=0.05):
        worker = threading.Thread(target=finish_all)
        worker.start()
        time.sleep(0.5)
        assert [line.split(" done")[0] for line in lines] == ["06_sft/natural"]  # while the execution still runs
        worker.join()
    assert [line.split(" done")[0] for line in lines] == [spec.name for spec in specs]


@pytest.mark.slow
def test_papermill_runs_log_each_variant_as_it_finishes(smoke_study, tmp_path, capfd):
    run = tmp_path / smoke_study.name  # a copy of the session's smoke study without stage 04
    shutil.copytree(smoke_study, run)
    shutil.rmtree(run / "04_continued_pretraining")
    capfd.readouterr()
    lines = []
    run_study("smoke", run.name, runs_root=tmp_path, engine="papermill", only=["04"], log=lines.append)
    # the kernel listens on local sockets (IPC), so IPKernelApp has no TCP-without-encryption warning to print
    console = "".join(capfd.readouterr())
    assert "encryption" not in console and "IPKernelApp" not in console, console
    branches = config.resolve("smoke").cpt.branches
    labels = [re.search(r"\] (\S+)", line).group(1) for line in lines if "done in" in line]
    assert labels == [f"04_continued_pretraining/{b}" for b in branches] + ["04_continued_pretraining"]


# --------------------------------------------------------------------------------------------------------------
# The smoke study itself (slow): the defects as first found
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(smoke_study):
    """conftest's session smoke study: the tests below put back what they change."""
    return smoke_study


@pytest.mark.slow
def test_smoke_new_sft_rate_with_stages_07_08_is_refused(smoke_run):
    with pytest.raises(StepConfigChanged, match=r"06_sft/natural, .* ran with a different configuration \(sft"):
        run_study("smoke", smoke_run.name, {"sft.learning_rate": 1e-3}, runs_root=smoke_run.parent, engine="inprocess",
                  only=["07", "08"], overwrite=True, log=lambda _: None)


@pytest.mark.slow
def test_smoke_cut_suite_and_deleted_model_are_refused(smoke_run):
    suite = smoke_run / "01_generate_data" / "data" / "instruction_suite.jsonl"
    original = suite.read_bytes()
    model = smoke_run / "06_sft" / "synthetic" / "model"
    model.rename(model.with_name("model.away"))
    try:
        suite.write_text("".join(suite.read_text().splitlines(keepends=True)[:5]))
        with pytest.raises(runs.StepStale) as err:
            run_study("smoke", smoke_run.name, runs_root=smoke_run.parent, engine="inprocess", log=lambda _: None)
        assert "01_generate_data is stale: data/instruction_suite.jsonl changed" in str(err.value)
        assert "06_sft/synthetic is stale: model/ was deleted" in str(err.value)
    finally:
        suite.write_bytes(original)
        model.with_name("model.away").rename(model)
    lines = []
    run_study("smoke", smoke_run.name, runs_root=smoke_run.parent, engine="inprocess", log=lines.append)
    assert all("skipped" in line for line in lines[:-1])  # restored: current again


@pytest.mark.slow
def test_smoke_two_real_runs_on_one_id(tmp_path):
    command = [sys.executable, "-m", "synthflaw.cli", "run", "--preset", "smoke", "--run-id", "twice", "--runs-root",
               str(tmp_path), "--engine", "inprocess", "--stages", "01", "02", "03"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "twice" / ".lock.pid").exists():
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
    steps = [row.split(",")[0] for row in (tmp_path / "twice" / "03_base_model" / "loss.csv").read_text().split()[1:]]
    assert len(steps) == len(set(steps))


def test_step_failed_is_still_raised_for_a_missing_upstream(tmp_path, fake_stages):
    with pytest.raises(StepFailed, match="needs 01_generate_data, which has not finished"):
        fake_run(tmp_path, only=["02"])
