"""The committed reference results: stage 08 and the sweeps' figures regenerate their tables and figures exactly.

The reference (runs/reference/) is the registered default study (seeds 300-306, docs/preregistration.md) exported
with `synthflaw export` (no weights, no data sets). `synthflaw figures` on a copy must rewrite every table and the cross-seed intervals and findings byte for
byte. The reference sweeps (runs/reference-fraction/, runs/reference-templates/) are sweeps on the default preset
exported the same way; `synthflaw sweep --figures-only` on a copy must rewrite the sweep's figures' tables, its trend
tests and every point's cross-seed tables and findings byte for byte.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from synthflaw import cli
from synthflaw.reporting.preregistration import PRIMARY_ENDPOINTS, REFERENCE_SEEDS
from synthflaw.runner import regenerate

pytestmark = pytest.mark.slow  # end to end

RUNS = Path(__file__).resolve().parent.parent / "runs"
REFERENCE = RUNS / "reference"
# each committed sweep: its swept key and the values the issue asked for (natural is the fraction's 0 point)
SWEEPS = {"reference-fraction": ("cpt.synthetic_fraction", [0.02, 0.1, 0.3, 0.5]),
          "reference-templates": ("data.synthetic_templates", [1, 3, 10]),
          # the positive control's pilots (natural and harmed only, stages 01, 03, 04, 06, 07)
          "pilot-control": ("sft.harm_fraction", [0.05, 0.1, 0.2, 0.35]),
          "pilot-control-power": ("sft.harm_fraction", [0.05]),
          # the paper's-regime pilots (docs/regime-pilot.md; natural and harmed only, stages 01, 03, 04, 06, 07)
          "pilot-regime": ("sft.epochs", [0.05, 0.1, 0.14]),
          "pilot-regime-longer": ("sft.epochs", [0.3, 0.6, 1.0])}


def tables(root: Path) -> dict[str, bytes]:
    """Every table and findings file the figures stage and the cross-seed summary write (not the PNGs)."""
    paths = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".csv", ".md")
             and ("08_figures" in p.parts or "seeds" in p.parts)]
    paths.append(root / "seeds" / "findings.json")  # aggregate.json also records the run folders' paths
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def figures(root: Path, regenerated: Path) -> list[str]:
    """The committed figures of stage 08, the cross-seed summary and a sweep's figures/ that a regeneration into
    `regenerated` drew with other bytes (same files in, same bytes out: rendering is deterministic)."""
    committed = [p.relative_to(root) for p in root.rglob("*.png")
                 if {"08_figures", "seeds", "figures"} & set(p.relative_to(root).parts)]
    assert committed
    return [str(rel) for rel in committed if (regenerated / rel).read_bytes() != (root / rel).read_bytes()]


def test_reference_exists_with_seeds_and_no_weights():
    assert (REFERENCE / "seeds" / "findings.md").exists(), "runs/reference is committed with the repository"
    seed_dirs = sorted(p.name for p in REFERENCE.glob("seed-*"))
    assert seed_dirs == [f"seed-{k}" for k in REFERENCE_SEEDS]  # the registered seeds, each once
    record = json.loads((REFERENCE / "seeds.json").read_text())
    assert record == {"seeds": list(REFERENCE_SEEDS), "preset": "default", "overrides": {}, "registered": True}
    assert not [p for p in REFERENCE.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt") or p.name == "model"]
    assert (REFERENCE / "notebooks" / "07_evaluate.html").exists()


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=RUNS.parent, capture_output=True, text=True, check=True).stdout.strip()


def test_every_step_of_the_reference_ran_code_committed_after_its_preregistration():
    """Rules before data: each step's meta.json names a commit that already held the pre-registration as it stands
    (docs/preregistration.md and the constants' file byte for byte: the rules that judge the reference are the
    ones its steps ran under, unchanged since), with clean code (a dirty file, if any, is a result under runs/,
    never code); the steps of stages 01-07 share one source digest."""
    registered = {path: (RUNS.parent / path).read_text() for path in
                  ("docs/preregistration.md", "synthflaw/reporting/preregistration.py")}
    metas = [json.loads(p.read_text()) for p in sorted(REFERENCE.glob("seed-*/**/meta.json"))]
    assert len(metas) == 24 * len(REFERENCE_SEEDS)
    for commit in {m["git_commit"] for m in metas}:
        for path, text in registered.items():
            assert _git("show", f"{commit}:{path}") == text.strip(), f"{path} changed after {commit} ran"
    assert all(f.startswith("runs/") for m in metas for f in m["dirty_files"])
    trained = {m["source_digest"] for m in metas if not m["step"].startswith("08")}
    assert len(trained) == 1


def test_figures_regenerate_the_reference_tables_exactly(tmp_path):
    before = tables(REFERENCE)
    assert any(k.endswith("headline.csv") for k in before) and "seeds/findings.json" in before
    shutil.copytree(REFERENCE, tmp_path / "reference")
    for path in tmp_path.glob("reference/seed-*/08_figures"):
        shutil.rmtree(path)
    shutil.rmtree(tmp_path / "reference" / "seeds")
    regenerate("reference", runs_root=tmp_path, engine="inprocess")
    after = tables(tmp_path / "reference")
    assert sorted(after) == sorted(before)
    different = [name for name in before if after[name] != before[name]]
    assert not different, f"regenerated tables differ from the committed ones: {different}"
    assert not figures(REFERENCE, tmp_path / "reference"), "regenerated figures differ from the committed ones"


@pytest.mark.parametrize("name", SWEEPS)
def test_reference_sweep_has_its_grid_every_point_and_no_weights(name):
    root = RUNS / name
    manifest = json.loads((root / "sweep.json").read_text())
    key, values = SWEEPS[name]
    assert manifest["grid"] == {key: values} and manifest["preset"] == "default"
    assert len(manifest["seeds"]) >= 3
    for point in manifest["points"]:
        assert sorted(p.name for p in (root / point["run"]).glob("seed-*")) == [f"seed-{s}" for s in manifest["seeds"]]
        assert (root / point["run"] / "seeds" / "findings.md").exists()
    assert not [p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".jsonl")
                or p.name == "model"]
    drawn = {p.stem.split("__")[0] for p in (root / "figures").glob("*.png")}
    assert set(PRIMARY_ENDPOINTS) <= drawn and (root / "figures" / "trend_tests.md").exists()


@pytest.mark.parametrize("name", SWEEPS)
def test_reference_sweep_tables_regenerate_exactly(name, tmp_path, sweep_tables):
    before = sweep_tables(RUNS / name)
    assert "figures/trend_tests.csv" in before and "figures/values.csv" in before
    shutil.copytree(RUNS / name, tmp_path / name)
    shutil.rmtree(tmp_path / name / "figures")
    for path in (tmp_path / name).glob("points/*/seeds"):
        shutil.rmtree(path)
    assert cli.main(["sweep", "--run-id", name, "--runs-root", str(tmp_path), "--figures-only",
                     "--engine", "inprocess"]) == 0
    after = sweep_tables(tmp_path / name)
    assert sorted(after) == sorted(before)
    different = [k for k in before if after[k] != before[k]]
    assert not different, f"regenerated tables differ from the committed ones: {different}"
    drawn = [f for f in figures(RUNS / name, tmp_path / name) if "08_figures" not in f]  # --figures-only: no stage 08
    assert not drawn, f"regenerated figures differ from the committed ones: {drawn}"


@pytest.mark.parametrize("name, decision", [("pilot-regime", "regime_pilot.json"),
                                            ("pilot-regime-longer", "regime_pilot_longer.json")])
def test_the_regime_pilots_decision_comes_from_its_committed_runs(name, decision, tmp_path):
    """docs/regime_pilot*.json is what benchmarks/regime_pilot.py computes from the exported pilot, byte for byte."""
    import importlib.util
    script = RUNS.parent / "benchmarks" / "regime_pilot.py"
    spec = importlib.util.spec_from_file_location("regime_pilot", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copytree(RUNS / name, tmp_path / name)
    assert module.main([str(tmp_path / name), "--out", str(tmp_path / decision)]) == 0
    assert (tmp_path / decision).read_bytes() == (RUNS.parent / "docs" / decision).read_bytes()
