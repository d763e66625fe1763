"""The findings' forest plot (synthflaw.reporting.forest): its rows, units and files, from hand-built findings."""

from synthflaw.records import read_csv
from synthflaw.reporting.forest import forest_rows, write_forest


def check(name, value, ci, *, delta=None, mdd=None, primary=True, verdict="inconclusive", kind="directional"):
    return {"check": name, "value": value, "ci": ci, "delta": delta, "mdd": mdd, "primary": primary,
            "verdict": verdict, "kind": kind, "sign": -1}


FOUND = [
    {"id": "C", "claim": "a harm is seen", "checks": [
        check("learnable_HSR: harmed - natural", -0.02, [-0.04, -0.01], delta=0.03, mdd=0.02, verdict="reproduces"),
        check("compliance_margin: harmed - natural", -0.01, [-0.02, 0.0], delta=0.06, kind="non_inferior")]},
    {"id": "3", "checks": [check("template_pull: synthetic - natural", 9.0, [4.0, 14.0], mdd=7.0),
                           check("kl_from_natural: synthetic - rewritten", None, None),  # not run: no row
                           check("leakage: synthetic - natural", 0.1, [0.0, 0.2], primary=False)]},  # no unit
]


def test_each_check_with_an_interval_is_a_row_in_its_own_unit():
    rows = forest_rows(FOUND)
    assert [(r["finding"], r["check"]) for r in rows] == [("C", "learnable_HSR: harmed - natural"),
                                                         ("C", "compliance_margin: harmed - natural"),
                                                         ("3", "template_pull: synthetic - natural")]
    assert (rows[0]["scale"], rows[0]["scale_kind"]) == (0.03, "paper-sized effect")  # the registered effect first
    assert (rows[2]["scale"], rows[2]["scale_kind"]) == (7.0, "MDD")  # else what these seeds resolve
    assert rows[0]["verdict"] == "reproduces" and rows[2]["family"] == "primary"
    assert rows[1]["kind"] == "non_inferior" and rows[0]["claim"] == "a harm is seen"  # its margin band, its header


def test_each_row_reads_in_words_with_its_unit():
    rows = forest_rows(FOUND)
    assert rows[0]["label"] == "instructions fully followed, learnable tier: harmed - natural"
    assert [r["unit"] for r in rows] == ["share of prompts", "nats per token", "nats per reply"]


def test_the_forest_is_written_and_redrawn_from_its_csv(tmp_path):
    assert write_forest(FOUND, tmp_path) == "findings_forest.png"
    assert (tmp_path / "findings_forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "again").mkdir()
    write_forest(FOUND, tmp_path / "again")  # the same findings, the same bytes
    assert (tmp_path / "again" / "findings_forest.png").read_bytes() == (tmp_path / "findings_forest.png").read_bytes()
    assert [r["check"] for r in read_csv(tmp_path / "findings_forest.csv")] == [r["check"] for r in forest_rows(FOUND)]
    assert write_forest([{"id": "1", "checks": [check("x: a - b", 0.1, None)]}], tmp_path / "none") is None
