"""The runner: validation before writing, skip / refuse / overwrite, failures that say where."""

import json

import pytest

from synthflaw import cli
from synthflaw import config
from synthflaw.reporting import preregistration
from synthflaw.registry import stage_variants, study_steps
from synthflaw.runner import StepFailed, run_study
from synthflaw.runs import StepConfigChanged


@pytest.mark.parametrize("bad, expected", [("no_such_key=1", "Valid keys: seed"),
                                           ("seed=abc", "seed expects int, got 'abc'")])
def test_bad_override_fails_at_once_and_writes_nothing(tmp_path, capsys, bad, expected):
    code = cli.main(["run", "--preset", "smoke", "--run-id", "x", "--runs-root", str(tmp_path), "--set", bad])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_step_list_fans_out_per_branch_and_method():
    cfg = config.resolve("smoke")
    names = [s.name for s in study_steps(cfg)]
    assert names[:3] == ["01_generate_data", "02_data_flaws", "03_base_model"]
    assert "04_continued_pretraining/synthetic" in names and "05_unlearning/lower_bounded" in names
    assert "06_sft/unlearn-npo" in names and "07_evaluate/natural" in names and names[-1] == "08_figures"
    assert names.index("05_unlearning/npo") < names.index("06_sft/unlearn-npo") < names.index("07_evaluate/unlearn-npo")


def test_skip_refuse_overwrite(tmp_path):
    lines = []
    run_study("smoke", "r", runs_root=tmp_path, engine="inprocess", only=["01"], log=lines.append)
    step_dir = tmp_path / "r" / "01_generate_data"
    for name in ("config.json", "meta.json", "result.json", "done.json", "data"):
        assert (step_dir / name).exists(), name
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["packages"]["torch"] and "git_commit" in meta
    before = (step_dir / "done.json").read_text()

    lines.clear()
    run_study("smoke", "r", runs_root=tmp_path, engine="inprocess", only=["01"], log=lines.append)
    assert "skipped" in lines[0] and (step_dir / "done.json").read_text() == before

    with pytest.raises(StepConfigChanged, match="01_generate_data"):
        run_study("smoke", "r", {"data.n_people": 30}, runs_root=tmp_path, engine="inprocess", only=["01"])
    assert (step_dir / "done.json").read_text() == before  # refused: nothing touched

    run_study("smoke", "r", {"data.n_people": 30}, runs_root=tmp_path, engine="inprocess", only=["01"],
              overwrite=True, log=lambda _: None)
    saved = json.loads((step_dir / "config.json").read_text())
    assert saved["study"]["data"]["n_people"] == 30


def test_failed_step_names_cell_and_keeps_notebook(tmp_path):
    # Stage 02 without stage 01: the notebook fails in the cell that runs the stage.
    with pytest.raises(StepFailed) as err:
        run_study("smoke", "f", runs_root=tmp_path, engine="papermill", only=["02"], log=lambda _: None)
    notebook = tmp_path / "f" / "02_data_flaws" / "notebook.ipynb"
    assert "failed in cell" in str(err.value) and str(notebook) in str(err.value)
    assert "01_generate_data" in str(err.value)
    assert notebook.exists() and not (tmp_path / "f" / "02_data_flaws" / "done.json").exists()


def test_stage_variants_follow_the_config_and_reject_unknown_names():
    cfg = config.resolve("smoke", {"cpt.branches": ["natural", "synthetic"], "unlearn.methods": ["npo"]})
    assert stage_variants(cfg, "06_sft") == ["natural", "synthetic", "harmed", "unlearn-npo"]
    assert stage_variants(cfg, "06_sft", ["unlearn-npo", "natural"]) == ["natural", "unlearn-npo"]
    assert stage_variants(cfg, "01_generate_data") == []
    with pytest.raises(ValueError, match="rewritten.*not among"):
        stage_variants(cfg, "04_continued_pretraining", ["rewritten"])


def test_default_preset_runs_the_registered_seeds_unless_told(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_study", lambda study, run_id, **kw: calls.append((run_id, study.overrides)))
    assert cli.main(["run", "--run-id", "r", "--runs-root", str(tmp_path)]) == 0
    assert calls == [(f"seed-{k}", {"seed": k}) for k in preregistration.REFERENCE_SEEDS]
    assert json.loads((tmp_path / "r" / "seeds.json").read_text())["seeds"] == list(preregistration.REFERENCE_SEEDS)
    calls.clear()
    assert cli.main(["run", "--run-id", "one", "--seeds", "4", "--runs-root", str(tmp_path)]) == 0
    assert calls == [("one", {"seed": 4})]  # one seed: an ordinary run folder
    calls.clear()
    assert cli.main(["run", "--preset", "smoke", "--run-id", "s", "--runs-root", str(tmp_path)]) == 0
    assert calls == [("s", {})]


def test_list_valued_overrides_reach_the_notebooks_as_lists(tmp_path):
    # `--set unlearn.methods=a,b` resolves to a tuple; papermill writes values it has no translator for (tuples) as
    # their str(), so the notebook read "('npo', 'simnpo')" and split it into "('npo'" and "'simnpo')".
    overrides = config.parse_overrides(["unlearn.methods=npo,simnpo", "cpt.branches=natural,synthetic"])
    run_study("smoke", "t", overrides, runs_root=tmp_path, engine="papermill", only=["01"], log=lambda _: None)
    notebook = json.loads((tmp_path / "t" / "01_generate_data" / "notebook.ipynb").read_text())
    injected = next("".join(c["source"]) for c in notebook["cells"]
                    if "injected-parameters" in c["metadata"].get("tags", []))
    namespace = {}
    exec(injected, namespace)  # the cell papermill wrote: plain assignments
    assert namespace["overrides"]["unlearn.methods"] == ["npo", "simnpo"]
    assert config.resolve("smoke", namespace["overrides"]) == config.resolve("smoke", overrides)
