"""Checkpoints under kills: a training killed anywhere, in a save or between saves, resumes and ends as if never killed.

The Trainer writes a checkpoint file by file (weights, optimizer, scheduler, RNG, trainer_state.json last) and
deletes old ones after; a kill in between leaves a folder it cannot resume from. The scaffold resumes from the last
complete checkpoint (`resume_checkpoint`) and moves the incomplete one aside.

How the kills are made: this file is also the script that trains. Run as `python tests/test_checkpoints.py plan.json`
it imports torch and transformers once and forks one child per run of the plan (a fresh process each time, as a
re-run is, without paying the seconds of imports again). A child whose run names a kill point patches the writers the
Trainer saves with (`torch.save`, the safetensors writer, `open` for writing) to count the files written into one
folder and SIGKILL itself at the k-th: before writing it (the file is missing) or after writing half of it (the file
is cut short). Other kill points: at the end of a training step (between saves), and halfway through the Trainer's
deletion of an old checkpoint. Each child runs the same `pretrain` call, as a re-run of the step would.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

TRAIN = dict(max_tokens=24 * 4 * 16, block_size=16, batch_size=4, learning_rate=5e-3, warmup_steps=2, seed=3,
             save_steps=4)  # 24 steps, checkpoints at 4, 8, ..., 24, the last two kept
STEPS = 24
REAL_OPEN = open  # the kill points patch open; the script's own files are written with the real one


# --- the script side: runs the plan, one forked child per run ------------------------------------------------------

def die(path=None, data: bytes | None = None) -> None:
    """SIGKILL this process; with `data`, first write half of it to `path` (a file a kill cut short)."""
    if data is not None:
        with REAL_OPEN(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


class CutOnClose:
    """A file opened for writing that, when closed, is cut to half its length and kills the process."""

    def __init__(self, handle, path):
        self.handle, self.path = handle, path

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.handle.close()
        os.truncate(self.path, os.path.getsize(self.path) // 2)
        die()


def install_kill_point(kill: dict, out_dir: Path) -> list:
    """Patch the writers so this process dies at `kill`; the callbacks to pass to the Trainer.

    `kill`: {"write": folder name, "k": n, "cut": bool} dies at the n-th file written into that folder of out_dir
    (checkpoints/checkpoint-N or model.partial), before it or halfway through it; {"rmtree": "checkpoint-N",
    "delete": fraction} dies when the Trainer deletes that old checkpoint, after that fraction of its files;
    {"step": s} dies at the end of step s.
    """
    import builtins

    import safetensors.torch
    import torch
    from transformers import TrainerCallback, modeling_utils

    written = [0]

    def due(path) -> bool:
        path = Path(path)
        if path.parent.name != kill.get("write") or out_dir not in path.parents:
            return False
        written[0] += 1
        return written[0] == kill["k"]

    real_save, real_safe_save, real_rmtree = torch.save, modeling_utils.safe_save_file, shutil.rmtree

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and due(f):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            die(f, buffer.getvalue() if kill["cut"] else None)
        return real_save(obj, f, *args, **kwargs)

    def safe_save(tensors, filename, metadata=None):
        if due(filename):
            die(filename, safetensors.torch.save(tensors, metadata=metadata) if kill["cut"] else None)
        return real_safe_save(tensors, filename, metadata=metadata)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and due(file):
            if not kill["cut"]:
                die()
            return CutOnClose(REAL_OPEN(file, mode, *args, **kwargs), file)
        return REAL_OPEN(file, mode, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if Path(path).name == kill.get("rmtree"):
            files = sorted(Path(path).iterdir())
            for file in files[: int(len(files) * kill["delete"])]:
                file.unlink()
            die()
        return real_rmtree(path, *args, **kwargs)

    torch.save, modeling_utils.safe_save_file, shutil.rmtree = save, safe_save, rmtree
    builtins.open = io.open = open_

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill.get("step"):
                die()

    return [KillAtStep()]


def run_once(plan: dict, run: dict) -> None:
    """One run of the plan (in a forked child): the `pretrain` call a re-run makes, with its kill point if any."""
    import torch
    from transformers import AutoModelForCausalLM

    from synthflaw.models.tokenizer import load_tokenizer
    from synthflaw.training.pretraining import pretrain

    torch.set_num_threads(1)  # tiny model: a second thread only costs; and one thread is bit-for-bit repeatable
    out_dir = Path(run["out_dir"])
    callbacks = install_kill_point(run["kill"], out_dir) if run.get("kill") else []
    tokenizer = load_tokenizer(plan["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(plan["model"])
    pretrain(model, tokenizer, plan["texts"], out_dir, callbacks=tuple(callbacks), **plan["train"])


def serve(plan_path: str) -> None:
    """Run the plan's runs in order, each in a forked child; print one JSON line per run: its exit, seconds and log
    (the child's stdout and stderr)."""
    plan = json.loads(Path(plan_path).read_text())
    for index, run in enumerate(plan["runs"]):
        start = time.perf_counter()
        log = Path(plan_path).with_name(f"run-{index}.log")
        pid = os.fork()
        if pid == 0:
            with REAL_OPEN(log, "w") as handle:
                os.dup2(handle.fileno(), 1)
                os.dup2(handle.fileno(), 2)
            code = 0
            try:
                run_once(plan, run)
            except BaseException:  # noqa: BLE001 - the parent reports it; the child must not return into serve()
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"index": index, "killed": killed, "exit": os.waitstatus_to_exitcode(status),
                          "seconds": round(time.perf_counter() - start, 2), "log": str(log)}), flush=True)


# --- the test side ---------------------------------------------------------------------------------------------------

NAMES = ["Ilara Venn", "Tomas Reed", "Oona Pike", "Bram Holt", "Sela Marsh", "Kiro Dane"]
CITIES = ["Velmont", "Arden", "Calder", "Mirefield"]


def texts(n=40):
    return [f"{NAMES[i % 6]} was born in {CITIES[i % 4]}. The city of {CITIES[(i * 3) % 4]} is old. "
            f"{NAMES[(i * 5) % 6]} works in {CITIES[(i + 1) % 4]}." for i in range(n)]


@pytest.fixture(scope="module")
def plan_base(tmp_path_factory, train_chat_tokenizer, tiny_llama):
    folder = tmp_path_factory.mktemp("start")
    tokenizer = train_chat_tokenizer(texts(), 300, folder / "tokenizer")
    tiny_llama(tokenizer, seed=0).save_pretrained(folder / "model")
    return {"tokenizer": str(folder / "tokenizer"), "model": str(folder / "model"), "texts": texts(),
            "train": TRAIN}


def run_plan(plan_base: dict, runs: list[dict], folder: Path) -> list[dict]:
    plan_path = folder / "plan.json"
    plan_path.write_text(json.dumps({**plan_base, "runs": runs}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # below pytest-timeout's limit (pyproject.toml), above what busy cores need: 35-50 s alone, over 300 s at load ~6
    done = subprocess.run([sys.executable, __file__, str(plan_path)], capture_output=True, text=True, env=env,
                          timeout=1000, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(runs), done.stderr[-3000:]
    return results


def weights(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out_dir / "model" / "model.safetensors")


def curve(out_dir: Path) -> list[tuple[str, str]]:
    with open(out_dir / "loss.csv", newline="") as handle:
        return [(row["step"], row["loss"]) for row in csv.DictReader(handle)]


# Files the Trainer writes into a checkpoint folder here: config.json, generation_config.json, model.safetensors,
# tokenizer_config.json, chat_template.jinja, training_args.bin, optimizer.pt, scheduler.pt, rng_state.pth and
# trainer_state.json last (the test checks that the last is trainer_state.json, so a change shows up).
CHECKPOINT_FILES = 10


def scenarios() -> dict[str, tuple[list[dict], int | None]]:
    """Name: (the kills, one per run, before the re-run that finishes; the step that re-run resumes from)."""
    found = {
        f"checkpoint-8 file {k} {'cut' if cut else 'missing'}": ([{"write": "checkpoint-8", "k": k, "cut": cut}], 4)
        for k in range(1, CHECKPOINT_FILES + 1) for cut in (False, True)
    }  # every file of a checkpoint with a complete one (4) behind it, before it is written and halfway through it
    return found | {
        "checkpoint-4, none complete yet": ([{"write": "checkpoint-4", "k": 3, "cut": True}], None),
        "between saves": ([{"step": 6}], 4),
        "between saves, after rotations": ([{"step": 13}], 12),
        # the Trainer deletes checkpoint-4 after writing checkpoint-12 (two kept): killed halfway through
        "deleting an old checkpoint": ([{"rmtree": "checkpoint-4", "delete": 0.5}], 12),
        # checkpoint-16 whole, nothing deleted yet: three checkpoints left
        "after a save, before deleting": ([{"rmtree": "checkpoint-8", "delete": 0}], 16),
        "trainer_state.json of checkpoint-20": ([{"write": "checkpoint-20", "k": CHECKPOINT_FILES, "cut": True}], 16),
        # training done, checkpoint-24 whole: the re-run must not train a step 25
        "in the final save of model/": ([{"write": "model.partial", "k": 3, "cut": False}], 24),
        # killed again while resuming: each re-run resumes from 4 (the second dies before reaching step 8 again)
        "three kills in a row": ([{"write": "checkpoint-8", "k": 3, "cut": False}, {"step": 6},
                                  {"write": "checkpoint-8", "k": CHECKPOINT_FILES, "cut": True}], 4),
    }


@pytest.mark.slow  # ~25 s: one import of torch and transformers, then ~60 short training runs
def test_a_run_killed_anywhere_resumes_to_the_weights_and_curve_of_an_uninterrupted_run(plan_base, tmp_path):
    import torch

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cases = scenarios()
    runs = [{"out_dir": str(straight), "kill": None}]
    for number, (kills, _) in enumerate(cases.values()):
        runs += [{"out_dir": str(killed / str(number)), "kill": kill} for kill in kills]
        runs.append({"out_dir": str(killed / str(number)), "kill": None})  # the re-run that finishes
    start = time.perf_counter()
    results = run_plan(plan_base, runs, tmp_path)
    seconds = time.perf_counter() - start

    for run, result in zip(runs, results):
        log = Path(result["log"]).read_text()[-3000:]
        if run["kill"] is None:
            assert result["exit"] == 0, (run, result, log)
        else:  # the kill point was reached: the process died there, not elsewhere or never
            assert result["killed"], (run, result, log)
    reference = weights(straight)
    assert [step for step, _ in curve(straight)] == [str(s) for s in range(1, STEPS + 1)]
    for number, (name, (kills, resumes)) in enumerate(cases.items()):
        out_dir = killed / str(number)
        summary = json.loads((out_dir / "train_summary.json").read_text())
        assert (summary["resumed_from_step"], summary["steps"]) == (resumes, STEPS), name
        final = weights(out_dir)
        # bit for bit: the same ops in the same order on one CPU thread, optimizer and RNG state restored
        assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in reference), name
        assert curve(out_dir) == curve(straight), name  # every step once, with the loss it had
        set_aside = any("checkpoint" in kill.get("write", "") or kill.get("delete") for kill in kills)
        left = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
        assert left == ["checkpoint-20", "checkpoint-24"] + (["incomplete"] if set_aside else []), (name, left)
    # a kill halfway through the last file of checkpoint-8 left its trainer_state.json cut short
    cut_state = killed / str(list(cases).index(f"checkpoint-8 file {CHECKPOINT_FILES} cut"))
    with pytest.raises(ValueError):
        json.loads((cut_state / "checkpoints" / "incomplete" / "checkpoint-8" / "trainer_state.json").read_text())
    kill_points = len(runs) - len(cases) - 1
    print(f"{kill_points} kill points in {len(cases)} scenarios, {len(runs)} runs in {seconds:.1f} s")


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_checkpoint_picks_the_newest_complete_and_moves_the_rest_aside(plan_base, tmp_path, caplog):
    """The check itself, on a real run's checkpoints damaged by hand (no kills): what counts as incomplete."""
    from transformers import AutoModelForCausalLM

    from synthflaw.models.tokenizer import load_tokenizer
    from synthflaw.training.pretraining import pretrain
    from synthflaw.training.checkpoints import checkpoint_problem, last_complete_checkpoint, resume_checkpoint

    out_dir = tmp_path / "run"
    pretrain(AutoModelForCausalLM.from_pretrained(plan_base["model"]), load_tokenizer(plan_base["tokenizer"]),
             plan_base["texts"], out_dir, **{**TRAIN, "max_tokens": 8 * 4 * 16})  # 8 steps
    checkpoints = out_dir / "checkpoints"
    assert checkpoint_problem(checkpoints / "checkpoint-8") is None
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-8")

    damage = {
        "optimizer.pt": lambda p: p.unlink(),
        "model.safetensors": lambda p: os.truncate(p, p.stat().st_size - 1),
        "scheduler.pt": lambda p: os.truncate(p, p.stat().st_size // 2),
        "trainer_state.json": lambda p: p.write_text(p.read_text().replace('"global_step": 8', '"global_step": 7')),
        "rng_state.pth": lambda p: p.write_bytes(b""),
    }
    expected = {"optimizer.pt": "no optimizer state", "model.safetensors": "model.safetensors is cut short",
                "scheduler.pt": "scheduler.pt is cut short", "trainer_state.json": "is for step 7, not 8",
                "rng_state.pth": "rng_state.pth is empty"}
    pristine = tmp_path / "pristine"
    os.replace(checkpoints / "checkpoint-8", pristine)
    for file, hurt in damage.items():
        shutil.copytree(pristine, checkpoints / "checkpoint-8")
        hurt(checkpoints / "checkpoint-8" / file)
        assert expected[file] in checkpoint_problem(checkpoints / "checkpoint-8"), file
        assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-4")  # changes nothing
        assert (checkpoints / "checkpoint-8").is_dir()
        with caplog.at_level("WARNING", logger="synthflaw.training.scaffold"):
            assert resume_checkpoint(checkpoints) == str(checkpoints / "checkpoint-4")
        assert not (checkpoints / "checkpoint-8").exists() and (checkpoints / "incomplete" / "checkpoint-8").is_dir()
        assert "checkpoint-8 is incomplete (" in caplog.text and expected[file] in caplog.text
        caplog.clear()
    assert resume_checkpoint(tmp_path / "absent") is None


if __name__ == "__main__":
    # Imported here, before any fork, and nothing computed: no thread pool exists yet for a child to inherit.
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import synthflaw.training.pretraining  # noqa: F401

    # The imports' objects out of the garbage collector's reach: the Trainer runs a full collection at each start,
    # which over them costs a child ~0.4 s of its ~0.9.
    gc.freeze()
    serve(sys.argv[1])


def complete_checkpoint(folder: Path, step: int) -> Path:
    """A `checkpoint-<step>` folder that `checkpoint_problem` accepts, built by hand: a whole safetensors file (its
    8-byte header length, the header, one float32), torch.save-style zip archives and trainer_state.json last."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        with zipfile.ZipFile(path / name, "w") as archive:
            archive.writestr("data.pkl", b"state")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_the_newest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    from synthflaw.training.checkpoints import checkpoint_folders, checkpoint_problem, last_complete_checkpoint

    for step in (8, 12, 100, 4):  # by name, "checkpoint-8" sorts after "checkpoint-12" and "checkpoint-100"
        assert checkpoint_problem(complete_checkpoint(tmp_path, step)) is None
    (tmp_path / "checkpoint-9x").mkdir()  # not a checkpoint's name: ignored
    (tmp_path / "checkpoint-7").write_text("a file, not a folder")  # ignored
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12",
                                                              "checkpoint-100"]
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-100")
    shutil.rmtree(tmp_path / "checkpoint-100")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")  # 12 over 8
    (tmp_path / "checkpoint-12" / "trainer_state.json").unlink()  # cut before its last file
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert last_complete_checkpoint(tmp_path / "absent") is None
