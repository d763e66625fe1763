"""What a notebook shows after a stage runs: its result as a table in words, a row per step, no raw key."""

import json
from pathlib import Path

import IPython.display

from synthflaw.reporting import display, labels

REFERENCE = Path(__file__).resolve().parent.parent / "runs" / "reference"


def shown(monkeypatch, call) -> str:
    out = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects: out.extend(o.data for o in objects))
    call()
    return "\n".join(out)


def test_a_stages_result_is_a_table_in_words_with_a_row_per_step(monkeypatch):
    result = {"natural": {"learnable_hard_satisfaction_rate": 0.405, "learnable_hsr_above_null": 0.318,
                          "compliance_margin": 0.7036, "model": "natural", "sft_curve": [1, 2], "wall_s": 29.6},
              "synthetic": {"learnable_hard_satisfaction_rate": 0.39, "compliance_margin": 0.61, "wall_s": 31.0}}
    text = shown(monkeypatch, lambda: display.summary(result))
    lines = text.splitlines()
    assert lines[0] == ("| step | instructions fully followed, learnable tier (share of prompts) | instructions fully "
                        "followed, learnable tier, above the best null (share of prompts) | compliance margin: log "
                        "p(compliant) - log p(violating reply) (nats per token) | wall time (s) |")
    assert lines[2] == "| natural | 0.405 | 0.318 | 0.7036 | 29.6 |"
    assert lines[3] == "| synthetic | 0.39 |  | 0.61 | 31 |"
    assert "learnable_hsr_above_null" not in text and "wall_s" not in text


def test_every_number_the_committed_results_hold_has_words_of_its_own():
    """Each numeric result.json field a stage writes is named by the label table (`RESULT_FIELDS`, or the metric
    label of its headline column), not by the fallback that only swaps underscores for spaces."""
    from synthflaw.reporting.tables import HEADLINE

    keys = {k for p in REFERENCE.glob("seed-*/*/**/result.json") for k, v in json.loads(p.read_text()).items()
            if isinstance(v, (bool, int, float))}
    assert len(keys) > 20
    fallback = sorted(k for k in keys if k not in labels.RESULT_FIELDS and HEADLINE.get(k) not in labels.METRICS
                      and k not in labels.METRICS)
    assert fallback == [], fallback
    assert labels.result_field("an_unknown_key") == "an unknown key"
