"""The rules of docs/preregistration.md as code, in one place: `findings` and `verdicts` read them, and nothing
else defines them. Changing a value here is a new pre-registration (docs/preregistration.md says how)."""

from __future__ import annotations

# Two-sided level of every interval; a directional claim is tested one-sided at ALPHA / 2.
ALPHA = 0.05
# The paper's instruction-following loss, relative: FollowBench HSR 27.58 (natural) -> 24.00 (2% SynthQA).
PAPER_RELATIVE_EFFECT = (27.58 - 24.00) / 27.58
# Power at which a minimum detectable difference is stated and the seed count is chosen.
POWER = 0.8

# The positive control's model and the endpoints its detection validates.
CONTROL = "harmed"

# Per finding, its primary family (<= 2 checks, by the check names `findings` gives them); Holm within it, every
# other check exploratory. A check absent from a run (its model not run) leaves the family smaller.
PRIMARY = {
    "C": ("learnable_HSR: harmed - natural", "compliance_margin: harmed - natural"),
    "1": ("benchmark: synthetic - natural", "benchmark_synthqa_only: synthetic - natural"),
    "2": ("learnable_HSR: synthetic - natural", "compliance_margin: synthetic - natural"),
    "2c": ("chat_preference: synthetic - natural",),
    "3": ("template_pull: synthetic - natural", "kl_from_natural: synthetic - rewritten"),
    "3b": ("pre_sft_template_pull: synthetic - natural", "pre_sft_ppl_std: synthetic - natural"),
    "4": ("learnable_HSR: unlearn-lower_bounded - natural", "benchmark: unlearn-lower_bounded - (synthetic + natural)/2"),
    "5": ("learnable_HSR: more_natural - synthetic", "learnable_HSR: natural - more_natural"),
    "6": ("benchmark: rewritten - natural", "learnable_HSR: rewritten - natural"),
}
# The endpoints a reader looks at first, in findings.md's header.
PRIMARY_ENDPOINTS = ("learnable_HSR", "compliance_margin", "template_pull", "pre_sft_template_pull", "benchmark",
                     "chat_preference")

# The preset these values were measured on; a run of another preset derives its margins from itself and says so.
REGISTERED_PRESET = "default"
# The paper-sized effect in each endpoint's units, from natural pilot seeds 100-102 and the positive control at
# sft.harm_fraction = 0.05 (benchmarks/calibrate_positive_control.py; docs/calibration_positive_control.json):
# learnable HSR 13% of natural's 0.2356 above its best null; chat preference 13% of natural's. Compliance margin
# (amendment 1): the smallest of its five derivations from the same pilot, the control's exchange rate at each
# grid fraction (1.49-2.42 nats/token per unit HSR) times delta(HSR) and 13% of natural's margin above its null
# (0.0456-0.0742): the exchange rate is a ratio of two noisy contrasts, and a larger delta would make "paper-sized
# effect excluded" easier to reach.
MARGINS = {"learnable_HSR": 0.0306, "compliance_margin": 0.0456, "chat_preference": 0.217}
# Seeds of a reference: the smallest count whose MDD on learnable HSR (harmed - natural, clustered, random effects)
# is at most its margin at 80% power, from the same pilot.
SEEDS = 7
# The registered reference's seeds (amendment 1): used by no committed run, pilot or benchmark before it (those used
# 0-7, 100-106 and 200-202). `synthflaw run --registered` and `make study` run exactly these.
REFERENCE_SEEDS = (300, 301, 302, 303, 304, 305, 306)
# The findings that make the study-wide family (amendment 1): each finding's p is that of its primary family read as
# an intersection-union test (the largest Holm-adjusted p of its primary checks, 1 where the finding's verdict is
# not "reproduces"), and Holm across these findings at ALPHA / 2 says which reproduce study-wide. The positive
# control is the instrument's check, not a claim of the paper, and stays out.
STUDY_FINDINGS = ("1", "2", "2c", "3", "3b", "4", "5", "6")
