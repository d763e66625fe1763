"""The positive control (synthflaw.data.positive_control, the `harmed` model): what the harmed SFT set holds, where
the model starts, and that its settings move no other model."""

import dataclasses

import pytest

from synthflaw import config
from synthflaw.data import constraints as cons
from synthflaw.data.embedded import build_embedded
from synthflaw.data.positive_control import harmed_sft
from synthflaw.registry import (
    CONTINUED_PRETRAINING,
    EVALUATE,
    SFT,
    UNLEARNING,
    models_of,
    sft_start,
)
from synthflaw.runs import fingerprint, step_config


@pytest.fixture(scope="module")
def sft_records():
    return build_embedded(config.resolve("smoke").data, 0)["sft"]


def test_harmed_replies_break_exactly_one_instruction_and_the_rest_is_unchanged(sft_records):
    harmed = harmed_sft(sft_records, 0.25, seed=0)
    assert len(harmed) == len(sft_records)
    changed = [(a, b) for a, b in zip(sft_records, harmed) if a != b]
    assert len(changed) == round(0.25 * len(sft_records))
    for before, after in changed:
        reply = after["messages"][-1]["content"]
        undone = after["provenance"]["harmed"]
        verdicts = {c["type"]: cons.CONSTRAINTS[c["type"]].check(reply, c["args"]) for c in after["constraints"]}
        # the undone constraint fails, every other one still holds: one instruction ignored, nothing else
        assert verdicts.pop(undone) is False and all(verdicts.values()), (reply, after["constraints"])
        assert after["messages"][0] == before["messages"][0] and after["constraints"] == before["constraints"]
        assert "harmed" not in before["provenance"]  # the input is not mutated
    assert harmed_sft(sft_records, 0.25, seed=0) == harmed
    assert harmed_sft(sft_records, 0.25, seed=1) != harmed


def test_bad_fractions_and_sets_without_constraints_are_refused(sft_records):
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="harm_fraction"):
            harmed_sft(sft_records, bad, seed=0)
    public = [{"messages": r["messages"], "provenance": {}} for r in sft_records]
    with pytest.raises(ValueError, match="sft.positive_control=false"):
        harmed_sft(public, 0.3, seed=0)
    with pytest.raises(config.ConfigError, match="harm_fraction"):
        config.check(config.resolve("smoke", {"sft.harm_fraction": 0.0}))


def test_the_control_runs_beside_natural_from_naturals_cpt_model():
    cfg = config.resolve("smoke")
    assert models_of(cfg)[:5] == ["natural", "synthetic", "rewritten", "more_natural", "harmed"]
    assert sft_start("harmed") == (CONTINUED_PRETRAINING, "natural")
    assert sft_start("synthetic") == (CONTINUED_PRETRAINING, "synthetic")
    assert sft_start("unlearn-npo") == (UNLEARNING, "npo")
    assert "harmed" not in models_of(config.resolve("smoke", {"sft.positive_control": False}))
    assert "harmed" not in models_of(config.resolve("smoke", {"cpt.branches": ("synthetic",)}))
    assert config.resolve("paper").sft.positive_control is False  # a public SFT set has no constraints to undo


def test_the_controls_settings_move_only_the_control_and_the_share_moves_it_not():
    cfg = config.resolve("smoke")
    other = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, harm_fraction=0.1))
    share = dataclasses.replace(cfg, cpt=dataclasses.replace(cfg.cpt, synthetic_fraction=0.5))
    for stage in (SFT, EVALUATE):
        for model in ("natural", "synthetic", "unlearn-lower_bounded"):
            assert fingerprint(step_config(cfg, stage, model)) == fingerprint(step_config(other, stage, model))
        assert fingerprint(step_config(cfg, stage, "harmed")) != fingerprint(step_config(other, stage, "harmed"))
        assert fingerprint(step_config(cfg, stage, "harmed")) == fingerprint(step_config(share, stage, "harmed"))
        assert fingerprint(step_config(cfg, stage, "synthetic")) != fingerprint(step_config(share, stage, "synthetic"))
