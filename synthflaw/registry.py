"""The study's stages: their numbers, names, order, configuration and fan-out, in one place.

Everything that needs to know the stages reads this table: the run folders (which config sections a step depends
on), the runner (the order, the notebook of each stage), the stage modules (their upstreams), the figures (which
stages trained something) and the notebooks (which variants a stage runs). A stage's number and name are its
folder in ``runs/<run_id>/``, its notebook ``notebooks/<NN_name>.ipynb`` and its module
``synthflaw/stages/s<NN_name>.py``.

The models of a study, in the order every table shows them: the CPT branches (the `natural` control first), then
one model per unlearning method, named ``unlearn-<method>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from synthflaw.config import BRANCHES, StudyConfig

UNLEARNED_PREFIX = "unlearn-"
# The positive control: natural's CPT model fine-tuned on the SFT set with a share of its replies harmed
# (synthflaw.data.positive_control). It runs beside the natural control (`sft.positive_control`).
POSITIVE_CONTROL = "harmed"


def has_positive_control(cfg: StudyConfig) -> bool:
    return cfg.sft.positive_control and "natural" in cfg.cpt.branches


def models_of(cfg: StudyConfig) -> list[str]:
    """Every model that is fine-tuned and evaluated: the CPT branches, the positive control, then one per unlearning
    method."""
    control = [POSITIVE_CONTROL] if has_positive_control(cfg) else []
    return list(cfg.cpt.branches) + control + [UNLEARNED_PREFIX + m for m in cfg.unlearn.methods]


def model_order(names) -> list[str]:
    """`names` in the study's order: the branches in `BRANCHES` order (control first), the positive control, then
    the rest by name."""
    names = list(dict.fromkeys(names))
    first = [b for b in (*BRANCHES, POSITIVE_CONTROL) if b in names]
    return first + sorted(n for n in names if n not in first)


def unlearned_method(model: str) -> str | None:
    """The unlearning method of a model name ``unlearn-<method>``, else None (a CPT branch)."""
    return model[len(UNLEARNED_PREFIX):] if model.startswith(UNLEARNED_PREFIX) else None


# Keys a CPT branch never reads: training.pretraining.branch_mixture trains `natural` on NonSynth whatever the
# synthetic share. Its steps' fingerprints take the key at its default, so a sweep over the share trains, fine-tunes
# and evaluates the natural control once per seed, and a run given another share keeps its natural steps.
# (`more_natural` reads no share either, but it starts from `cpt.more_natural_from`, by default the synthetic model.)
# The positive control trains on natural's CPT model, so it reads no share either.
UNREAD_BY_BRANCH = {"natural": ("cpt.synthetic_fraction",), POSITIVE_CONTROL: ("cpt.synthetic_fraction",)}
# The positive control's keys, read by the `harmed` model only: every other model keeps its fingerprint whatever
# the control's settings (a sweep over the harm trains the other models once per seed).
CONTROL_KEYS = ("sft.positive_control", "sft.harm_fraction")


@dataclass(frozen=True)
class Stage:
    """One stage of the study.

    `sections`: the config sections a step of this stage depends on (its own and its upstreams'), i.e. what its
    fingerprint covers. `variants`: the fan-out (one step per variant), or None for a single step. `trains`: the
    stage trains or unlearns a model and writes a loss curve.
    """

    number: str
    slug: str
    title: str
    sections: tuple[str, ...]
    variants: Callable[[StudyConfig], list[str]] | None = None
    trains: bool = False

    @property
    def name(self) -> str:
        """``NN_slug``: the folder under ``runs/<run_id>/`` and the notebook's file name."""
        return f"{self.number}_{self.slug}"

    @property
    def module(self) -> str:
        return f"synthflaw.stages.s{self.name}"

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    def sections_for(self, variant: str | None) -> tuple[str, ...]:
        """The sections a step depends on: an unlearned model's SFT and evaluation also depend on `unlearn`."""
        if variant and unlearned_method(variant) and "unlearn" not in self.sections:
            return (*self.sections, "unlearn")
        return self.sections

    def unread_for(self, variant: str | None) -> tuple[str, ...]:
        """Keys of those sections that the step's model never reads (`UNREAD_BY_BRANCH`, and `CONTROL_KEYS` for
        every model but the control; a model is the variant of the stages that train or evaluate one: 04-07): its
        fingerprint takes them at their defaults."""
        if variant is None:
            return ()
        return UNREAD_BY_BRANCH.get(variant, ()) + (() if variant == POSITIVE_CONTROL else CONTROL_KEYS)

    def variants_of(self, cfg: StudyConfig) -> list[str]:
        return self.variants(cfg) if self.variants else []

    def __str__(self) -> str:
        return self.name


def sft_start(model: str) -> tuple[Stage, str]:
    """The step whose model SFT fine-tunes for `model`: its unlearning step, natural's CPT for the positive control,
    else its own CPT branch."""
    method = unlearned_method(model)
    if method:
        return UNLEARNING, method
    return CONTINUED_PRETRAINING, "natural" if model == POSITIVE_CONTROL else model


GENERATE_DATA = Stage("01", "generate_data", "Generate the data", ("data",))
DATA_FLAWS = Stage("02", "data_flaws", "The data's flaws", ("data", "flaws"))
BASE_MODEL = Stage("03", "base_model", "Base model", ("data", "base"), trains=True)
CONTINUED_PRETRAINING = Stage("04", "continued_pretraining", "Continued pre-training", ("data", "base", "cpt"),
                              variants=lambda cfg: list(cfg.cpt.branches), trains=True)
UNLEARNING = Stage("05", "unlearning", "Unlearning", ("data", "base", "cpt", "unlearn"),
                   variants=lambda cfg: list(cfg.unlearn.methods), trains=True)
SFT = Stage("06", "sft", "Supervised fine-tuning", ("data", "base", "cpt", "sft"), variants=models_of, trains=True)
EVALUATE = Stage("07", "evaluate", "Evaluation", ("data", "base", "cpt", "sft", "evaluate"), variants=models_of)
FIGURES = Stage("08", "figures", "Figures and tables",
                ("data", "flaws", "base", "cpt", "unlearn", "sft", "evaluate", "figures"))

STAGES: tuple[Stage, ...] = (GENERATE_DATA, DATA_FLAWS, BASE_MODEL, CONTINUED_PRETRAINING, UNLEARNING, SFT,
                             EVALUATE, FIGURES)


def stage(key: str | Stage) -> Stage:
    """The stage named by its number ("04"), its folder name ("04_continued_pretraining") or its slug."""
    if isinstance(key, Stage):
        return key
    for s in STAGES:
        if key in (s.number, s.name, s.slug):
            return s
    raise ValueError(f"unknown stage {key!r}; stages: {', '.join(s.name for s in STAGES)} (or their numbers)")


@dataclass(frozen=True)
class StepSpec:
    """One step of a study: a stage and, for a fanned-out stage, one variant."""

    stage: Stage
    variant: str | None = None

    @property
    def name(self) -> str:
        return f"{self.stage.name}/{self.variant}" if self.variant else self.stage.name


def study_steps(cfg: StudyConfig) -> list[StepSpec]:
    """The whole study, in execution order."""
    steps = []
    for s in STAGES:
        steps += [StepSpec(s, v) for v in s.variants_of(cfg)] if s.variants else [StepSpec(s)]
    return steps


def selected_steps(cfg: StudyConfig, only=None) -> list[StepSpec]:
    """The study's steps of the stages `only` (numbers or names; ValueError for an unknown one), all without."""
    wanted = None if only is None else {stage(s) for s in only}
    return [s for s in study_steps(cfg) if wanted is None or s.stage in wanted]


def stage_variants(cfg: StudyConfig, key: str | Stage, variants=None) -> list[str]:
    """The variants `cfg` runs for a stage, in study order; `variants` (a subset, e.g. a notebook parameter) or all."""
    s = stage(key)
    known = s.variants_of(cfg)
    if not variants:
        return known
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"{s.name}: {', '.join(map(repr, unknown))} not among this configuration's variants "
                         f"({', '.join(known) or 'none'}); leave `variants` empty to run them all")
    return [v for v in known if v in variants]
