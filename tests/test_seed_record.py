"""A multi-seed run records the seeds it was asked for (seeds.json), and every reader of its cross-seed results
checks against that record: a listed seed that is missing or unfinished is named, never silently dropped; an
aggregate over other seeds is refused; a single run and a multi-seed run refuse each other's folders."""

import json
import shutil

import pytest

from synthflaw import cli, runs
from synthflaw.reporting import aggregate
from synthflaw.runner import summarize_seeds
from synthflaw.runs import SeedsIncomplete, record_seeds


def _fake_seed(run_dir, seed, done=True):
    """seed-<k> as stage 07 leaves it for natural and synthetic (metrics.json and, when done, done.json)."""
    for model in ("natural", "synthetic"):
        path = run_dir / f"seed-{seed}" / "07_evaluate" / model
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({"pre_sft_benchmark_accuracy": 0.4 + 0.01 * seed,
                                                       "learnable_hard_satisfaction_rate": 0.3}))
        if done:
            (path / "config.json").write_text('{"fingerprint": "x"}')
            (path / "done.json").write_text(json.dumps({"fingerprint": "x", "finished": 0, "products": {},
                                                        "upstream": {}, "digest": runs.combined_digest({})}))


def test_the_record_is_written_once_and_other_seeds_are_refused(tmp_path):
    record_seeds(tmp_path / "r", [0, 1], preset="smoke", overrides={}, registered=False)
    assert json.loads((tmp_path / "r" / "seeds.json").read_text())["seeds"] == [0, 1]
    record_seeds(tmp_path / "r", [0, 1], preset="smoke")  # the same seeds: continues
    with pytest.raises(ValueError, match=r"study of seeds 0 1.*asks for seeds 0 1 2.*--seeds 0 1"):
        record_seeds(tmp_path / "r", [0, 1, 2])


def test_a_deleted_seed_is_refused_by_every_reader_not_dropped(tmp_path):
    run_dir = tmp_path / "r"
    record_seeds(run_dir, [0, 1], preset="smoke")
    _fake_seed(run_dir, 0)
    _fake_seed(run_dir, 1)
    assert aggregate.summarize(run_dir)["seeds"] == ["0", "1"]
    shutil.rmtree(run_dir / "seed-1")
    with pytest.raises(SeedsIncomplete, match="1 of 2 have evaluated, and seed-1 is missing"):
        aggregate.summarize(run_dir)
    assert summarize_seeds(run_dir) is None  # the runner between seeds: no cross-seed result yet, no error


def test_an_unfinished_or_unlisted_seed_is_named(tmp_path):
    run_dir = tmp_path / "r"
    record_seeds(run_dir, [0, 1], preset="smoke")
    _fake_seed(run_dir, 0)
    _fake_seed(run_dir, 1, done=False)
    with pytest.raises(SeedsIncomplete, match="seed-1 has not finished 07_evaluate"):
        aggregate.summarize(run_dir)
    _fake_seed(run_dir, 5)
    with pytest.raises(SeedsIncomplete, match="seed-5 is not among them"):
        aggregate.summarize(run_dir)


def test_a_run_made_before_records_is_held_to_the_seeds_of_its_aggregate(tmp_path):
    run_dir = tmp_path / "old"
    _fake_seed(run_dir, 0)
    _fake_seed(run_dir, 1)
    aggregate.summarize(run_dir)  # no seeds.json: an export made before records existed
    shutil.rmtree(run_dir / "seed-1")
    with pytest.raises(SeedsIncomplete, match="seed-1 is missing"):
        aggregate.summarize(run_dir)


def test_single_and_multi_seed_layouts_refuse_each_other(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_study", lambda study, run_id, **kw: calls.append(run_id))
    assert cli.main(["run", "--preset", "smoke", "--seeds", "0", "1", "--run-id", "m", "--runs-root",
                     str(tmp_path), "--stages", "01"]) == 0
    assert "0 of 2 seeds have evaluated" in capsys.readouterr().out  # partial stages: a status, not an error
    monkeypatch.undo()  # the real runner, which refuses before it writes
    code = cli.main(["run", "--preset", "smoke", "--run-id", "m", "--runs-root", str(tmp_path), "--stages", "01",
                     "--engine", "inprocess"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a multi-seed run, not a single run" in err and "--seeds" in err, err
    assert not (tmp_path / "m" / "study.json").exists()

    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "study.json").write_text("{}")
    code = cli.main(["run", "--preset", "smoke", "--seeds", "0", "1", "--run-id", "single", "--runs-root",
                     str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "holds a single run, not a multi-seed run" in err, err
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["study.json"]


def test_a_new_study_is_refused_in_a_folder_holding_another_studys_seeds(tmp_path):
    """Before its first seed runs, not at its end: a study asked into a committed export's folder (seeds 0-4, no
    record) would otherwise run for hours and then be refused when its findings are made."""
    _fake_seed(tmp_path / "old", 0)
    _fake_seed(tmp_path / "old", 1)
    aggregate.summarize(tmp_path / "old")
    with pytest.raises(ValueError, match="holds seeds 0 1 of another study.*pick another --run-id"):
        record_seeds(tmp_path / "old", [300, 301], preset="default")
    assert not (tmp_path / "old" / "seeds.json").exists()
    record_seeds(tmp_path / "old", [0, 1], preset="smoke")  # the same seeds: that study continued
