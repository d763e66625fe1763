"""The committed reference result (runs/reference/): stage 08 regenerates its tables exactly from its JSON/CSV files.

The reference is the default study (seeds 0-4) exported with `synthflaw export` (no weights, no data sets).
`synthflaw figures` on a copy must rewrite every table and the cross-seed intervals and findings byte for byte.
"""

import shutil
from pathlib import Path

import pytest

from synthflaw.runner import regenerate

pytestmark = pytest.mark.slow  # end to end

REFERENCE = Path(__file__).resolve().parent.parent / "runs" / "reference"


def tables(root: Path) -> dict[str, bytes]:
    """Every table and findings file the figures stage and the cross-seed summary write (not the PNGs)."""
    paths = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".csv", ".md")
             and ("08_figures" in p.parts or "seeds" in p.parts)]
    paths.append(root / "seeds" / "findings.json")  # aggregate.json also records the run folders' paths
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def test_reference_exists_with_seeds_and_no_weights():
    assert (REFERENCE / "seeds" / "findings.md").exists(), "runs/reference is committed with the repository"
    seed_dirs = sorted(p.name for p in REFERENCE.glob("seed-*"))
    assert seed_dirs == [f"seed-{k}" for k in range(5)]  # the default preset's seeds
    assert not [p for p in REFERENCE.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt") or p.name == "model"]
    assert (REFERENCE / "notebooks" / "07_evaluate.html").exists()


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
