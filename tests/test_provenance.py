"""Every step records the code that ran (commit, clean or dirty and which files, the package's source digest), and
the registered study refuses a checkout that is not one clean commit, before it writes anything."""

import json
import shutil
import subprocess

import pytest

from synthflaw import cli
from synthflaw.reporting import preregistration
from synthflaw.runner import run_study
from synthflaw.runs import provenance


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture()
def checkout(tmp_path):
    """A git checkout holding a copy of the package, committed and clean."""
    repo = tmp_path / "repo"
    shutil.copytree(provenance.PACKAGE_DIR, repo / "synthflaw", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text("runs/\n__pycache__/\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "x")
    return repo


def test_the_git_state_names_the_commit_and_every_changed_file(checkout):
    state = provenance.git_state(checkout / "synthflaw")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    assert state == {"git_commit": head, "git_dirty": False, "dirty_files": []}
    (checkout / "runs").mkdir()
    (checkout / "runs" / "x.json").write_text("{}")  # an ignored run folder leaves the tree clean
    assert provenance.git_state(checkout / "synthflaw")["git_dirty"] is False
    (checkout / ".gitignore").write_text("__pycache__/\n")  # runs/ tracked, as committed exports are
    _git(checkout, "add", "-A")
    _git(checkout, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "track runs")
    (checkout / "runs" / "x.json").write_text('{"redrawn": 1}')  # results edited: the code is still clean
    assert provenance.git_state(checkout / "synthflaw")["git_dirty"] is False
    (checkout / "synthflaw" / "config.py").write_text("# edited\n")
    (checkout / "synthflaw" / "new_module.py").write_text("")
    state = provenance.git_state(checkout / "synthflaw")
    assert state["git_dirty"] is True and state["dirty_files"] == ["synthflaw/config.py", "synthflaw/new_module.py"]
    with pytest.raises(provenance.DirtyCheckout, match="config.py, synthflaw/new_module.py.*Commit them"):
        provenance.require_clean({**state, "source_digest": "x"})


def test_outside_git_the_state_is_unknown_and_a_registered_run_refused(tmp_path):
    (tmp_path / "pkg").mkdir()
    state = provenance.git_state(tmp_path / "pkg")
    assert state == {"git_commit": None, "git_dirty": None, "dirty_files": None}
    with pytest.raises(provenance.DirtyCheckout, match="not in a git checkout.*clone the repository"):
        provenance.require_clean({**state, "source_digest": "x"})


def test_the_source_digest_changes_with_any_edit_and_not_with_bytecode(checkout):
    package = checkout / "synthflaw"
    before = provenance.source_digest(package)
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert provenance.source_digest(package) == before
    text = (package / "config.py").read_text()
    (package / "config.py").write_text(text + "\n")
    assert provenance.source_digest(package) != before
    (package / "config.py").write_text(text)
    assert provenance.source_digest(package) == before


def test_each_steps_meta_records_the_code_that_ran(tmp_path):
    run_dir = run_study("smoke", "t", runs_root=tmp_path, engine="inprocess", only=["01"], log=lambda _: None)
    meta = json.loads((run_dir / "01_generate_data" / "meta.json").read_text())
    state = provenance.code_state()
    assert {k: meta[k] for k in state} == state
    assert meta["source_digest"] == provenance.source_digest()


def test_a_registered_run_refuses_a_dirty_tree_and_writes_nothing(tmp_path, monkeypatch, capsys):
    dirty = {"git_commit": "a" * 40, "git_dirty": True, "dirty_files": ["synthflaw/config.py"], "source_digest": "x"}
    monkeypatch.setattr(provenance, "code_state", lambda: dirty)
    code = cli.main(["run", "--registered", "--run-id", "ref", "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "synthflaw/config.py" in err and "Commit them" in err, err
    assert list(tmp_path.iterdir()) == []
    code = cli.main(["run", "--registered", "--seeds", "1", "2", "--run-id", "ref", "--runs-root", str(tmp_path)])
    assert code == 2 and "--registered runs the study" in capsys.readouterr().err


def test_a_registered_run_from_a_clean_tree_runs_the_registered_seeds(tmp_path, monkeypatch):
    clean = {"git_commit": "a" * 40, "git_dirty": False, "dirty_files": [], "source_digest": "x"}
    monkeypatch.setattr(provenance, "code_state", lambda: clean)
    calls = []
    monkeypatch.setattr(cli, "run_study", lambda study, run_id, **kw: calls.append(study.cfg.seed))
    assert cli.main(["run", "--registered", "--run-id", "ref", "--runs-root", str(tmp_path)]) == 0
    assert calls == list(preregistration.REFERENCE_SEEDS)
    record = json.loads((tmp_path / "ref" / "seeds.json").read_text())
    assert record == {"seeds": list(preregistration.REFERENCE_SEEDS), "preset": "default", "overrides": {},
                      "registered": True}
