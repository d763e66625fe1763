"""A study longer than one job: its seeds run in batches, each in a run folder of its own (another machine, another
job), each exported as it finishes; a later batch is added to the same export (`synthflaw export --add`). No
findings across seeds before every seed of the study is there ("k of K seeds"), and the study made in batches gives
the same tables and findings, byte for byte, as its seeds run as one."""

import json

import pytest
from test_run_integrity import fake_stages  # noqa: F401 - the stand-in stages, a fixture

from synthflaw import cli


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_batches_run_apart_and_join_in_one_export(tmp_path, fake_stages, capsys):
    common = ["--runs-root", tmp_path]
    study = ["run", "--preset", "smoke", "--seeds", "0", "1", "2", "--engine", "inprocess", *common]
    code, out, err = main(capsys, *study, "--run-id", "b1", "--batch", "0", "1")
    assert code == 0, err
    assert "2 of 3 seeds have evaluated" in out and "other batches" in out and ": 2" in out, out
    assert json.loads((tmp_path / "b1" / "seeds.json").read_text())["batch"] == [0, 1]
    assert not (tmp_path / "b1" / "seed-2").exists()
    code, out, err = main(capsys, "export", "--run-id", "b1", "--to", tmp_path / "study", *common)
    assert code == 0, err  # the batch is finished: the seeds of other batches are not this folder's to hold
    code, out, err = main(capsys, "figures", "--run-id", "study", "--engine", "inprocess", *common)
    assert code == 2 and "2 of 3 have evaluated" in err and "seed-2 is missing" in err, err  # no interim verdict

    code, out, err = main(capsys, *study, "--run-id", "b2", "--batch", "2")
    assert code == 0, err
    code, out, err = main(capsys, "export", "--run-id", "b2", "--to", tmp_path / "study", "--add", *common)
    assert code == 0, err
    assert "3 of 3 seeds have evaluated" in out and "complete" in out, out
    record = json.loads((tmp_path / "study" / "seeds.json").read_text())
    assert record == {"seeds": [0, 1, 2], "preset": "smoke", "overrides": {}, "registered": False}
    assert all((tmp_path / "study" / f"seed-{s}" / "07_evaluate" / "natural" / "done.json").exists()
               for s in (0, 1, 2))
    code, out, err = main(capsys, "status", "--run-id", "study", *common)
    assert code == 0 and "3 of 3 seeds have evaluated" in out, err

    # a seed is added once; another study is refused; nothing is written either time
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "study").rglob("*"))
    code, out, err = main(capsys, "export", "--run-id", "b2", "--to", tmp_path / "study", "--add", *common)
    assert code == 2 and "already holds seed-2" in err, err
    code, out, err = main(capsys, "run", "--preset", "smoke", "--seeds", "0", "5", "--batch", "5", "--engine",
                          "inprocess", "--run-id", "other", *common)
    assert code == 0, err
    code, out, err = main(capsys, "export", "--run-id", "other", "--to", tmp_path / "study", "--add", *common)
    assert code == 2 and "not the same study" in err, err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "study").rglob("*")) == before


def test_a_batch_outside_the_studys_seeds_is_refused(tmp_path, capsys):
    code, out, err = main(capsys, "run", "--preset", "smoke", "--seeds", "0", "1", "--batch", "7", "--run-id", "b",
                          "--runs-root", tmp_path)
    assert code == 2 and "among the study's seeds 0 1" in err, err
    code, out, err = main(capsys, "run", "--preset", "smoke", "--batch", "0", "--run-id", "c", "--runs-root",
                          tmp_path)
    assert code == 2 and "--batch runs some seeds of a multi-seed study" in err, err


@pytest.mark.slow
def test_a_study_in_two_batches_gives_the_tables_of_its_seeds_run_as_one(tmp_path, capsys, sweep_tables):
    """Two batches on two run folders, joined in one export, against the same seeds run as one and exported."""
    common = ["--runs-root", tmp_path, "--engine", "inprocess"]
    small = ["--set", "cpt.branches=natural,synthetic", "--set", "unlearn.methods=", "--set",
             "sft.positive_control=false"]
    study = ["run", "--preset", "smoke", "--seeds", "0", "1", *small, *common]
    for argv in ([*study, "--run-id", "b1", "--batch", "0"], [*study, "--run-id", "b2", "--batch", "1"],
                 [*study, "--run-id", "one"]):
        assert cli.main([str(a) for a in argv]) == 0
    for argv in (["export", "--run-id", "b1", "--to", tmp_path / "batched"],
                 ["export", "--run-id", "b2", "--to", tmp_path / "batched", "--add"],
                 ["export", "--run-id", "one", "--to", tmp_path / "whole"],
                 ["figures", "--run-id", "batched", "--engine", "inprocess"],
                 ["figures", "--run-id", "whole", "--engine", "inprocess"]):
        assert cli.main([str(a) for a in [*argv, "--runs-root", tmp_path]]) == 0, argv
    capsys.readouterr()

    def tables(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in (root / "seeds").rglob("*")
                if p.is_file() and p.suffix in (".csv", ".md") or p.name == "findings.json"}

    batched, whole = tables(tmp_path / "batched"), tables(tmp_path / "whole")
    assert "seeds/findings.md" in batched and "seeds/tables/headline_ci.csv" in batched
    assert batched == whole
    aggregate = [json.loads((tmp_path / name / "seeds" / "aggregate.json").read_text()) for name in ("batched",
                                                                                                     "whole")]
    assert [{k: v for k, v in a.items() if k != "runs"} for a in aggregate][0] == \
        [{k: v for k, v in a.items() if k != "runs"} for a in aggregate][1]


def test_a_study_stopped_part_way_is_exported_as_a_batch_and_completed_by_another(tmp_path, fake_stages, capsys):
    """A run of every seed stopped after some of them (a session's end): its finished seeds go out as a batch
    (export --batch), the rest run elsewhere and are added; without --batch the partial study is refused."""
    from synthflaw.runs import record_seeds

    common = ["--runs-root", tmp_path]
    record_seeds(tmp_path / "whole", [0, 1, 2], preset="smoke", overrides={}, registered=False)  # asked for all
    study = ["run", "--preset", "smoke", "--seeds", "0", "1", "2", "--engine", "inprocess", *common]
    code, out, err = main(capsys, *study, "--run-id", "whole", "--batch", "0", "1")  # stopped after two seeds
    assert code == 0, err
    assert "batch" not in json.loads((tmp_path / "whole" / "seeds.json").read_text())
    code, out, err = main(capsys, "export", "--run-id", "whole", "--to", tmp_path / "ref", *common)
    assert code == 2 and "seed-2: listed in seeds.json, missing" in err, err
    code, out, err = main(capsys, "export", "--run-id", "whole", "--to", tmp_path / "ref", "--batch", "0", "1",
                          *common)
    assert code == 0 and "2 of 3 seeds have evaluated" in out, err
    assert json.loads((tmp_path / "ref" / "seeds.json").read_text())["batch"] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name.startswith("seed")) == \
        ["seed-0", "seed-1", "seeds.json"]
    code, out, err = main(capsys, "export", "--run-id", "whole", "--to", tmp_path / "bad", "--batch", "2", *common)
    assert code == 2 and "seed-2: not started" in err, err

    code, out, err = main(capsys, *study, "--run-id", "later", "--batch", "2")
    assert code == 0, err
    code, out, err = main(capsys, "export", "--run-id", "later", "--to", tmp_path / "ref", "--add", *common)
    assert code == 0 and "3 of 3 seeds have evaluated" in out, err
    assert "batch" not in json.loads((tmp_path / "ref" / "seeds.json").read_text())
