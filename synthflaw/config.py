"""The study's configuration: one frozen dataclass per stage, presets as data, overrides validated.

Defaults live here and nowhere else. A run's parameters are one preset plus explicit overrides written as dotted keys
(``seed``, ``cpt.synthetic_fraction``); :func:`resolve` turns them into a :class:`StudyConfig` or raises
:class:`ConfigError` naming the valid keys. Every field carries a one-line help (``describe()`` prints them all).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

# The CPT branches, in the order every table shows them: the paper's control, the paper's SynthQA run, and two
# controls this project adds (synthflaw.training.pretraining says what each trains on).
BRANCHES = ("natural", "synthetic", "rewritten", "more_natural")


class ConfigError(ValueError):
    """A preset name, override key or override value that is not valid; the message says what is."""


def _f(default, help: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
       finite: bool = True):
    """A dataclass field with its one-line help and, for a number, its domain: [low, high], either end open or
    absent, finite unless `finite=False` (a dict default gets a fresh copy per instance)."""
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "finite": finite}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def domain_text(fld: dataclasses.Field) -> str:
    """A field's domain in words, e.g. "a finite number > 0" or "an integer in [4, 5]"."""
    meta = fld.metadata
    kind = "an integer" if type(_default(fld)) is int else "a finite number" if meta["finite"] else "a number"
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"{kind} in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{kind} {'>' if meta['low_open'] else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if meta['high_open'] else '<='} {high}"
    return kind


def out_of_domain(fld: dataclasses.Field, value) -> bool:
    """Whether a number lies outside its field's domain (NaN always does; infinity unless `finite=False`)."""
    meta = fld.metadata
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if math.isnan(value) or (meta.get("finite", True) and math.isinf(value)):
        return True
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta["low_open"] else value < low):
        return True
    return high is not None and (value >= high if meta["high_open"] else value > high)


def _default(fld: dataclasses.Field):
    return fld.default_factory() if fld.default is dataclasses.MISSING else fld.default


@dataclass(frozen=True)
class DataConfig:
    """Stage 01: the generated world and every data set built from it."""

    source: str = _f("embedded", "embedded (the generated world) | hub (real corpora + a generator model; paper preset)")
    n_people: int = _f(40, "people in the world (5 facts each)", low=4)
    n_organisations: int = _f(8, "organisations in the world (3 facts each)", low=4)
    n_cities: int = _f(12, "cities in the world (1 fact each: its country)", low=4)
    nonsynth_fact_share: float = _f(0.5, "share of facts that NonSynth states; SynthQA states all of them",
                                    low=0, high=1, low_open=True, high_open=True)
    nonsynth_docs: int = _f(3000, "NonSynth documents (natural text, many styles) for pre-training and CPT", low=1)
    extra_natural_docs: int = _f(1500, "extra NonSynth documents for the more_natural branch", low=0)
    heldout_docs: int = _f(200, "held-out NonSynth documents (perplexity, never trained on)", low=1)
    general_text_share: float = _f(0.3, "share of NonSynth documents that are fact-free conversational/how-to text",
                                   low=0, high=1)
    # 0.3 and the SFT budget below: calibrated on the natural branch and the nulls only
    # (benchmarks/calibrate_instrument.py, benchmarks/results/calibration_instrument.json)
    instruction_doc_share: float = _f(0.3, "share of NonSynth documents that are request-and-reply texts (someone "
                                      "asks with a constraint, the reply follows it), on SFT's facts and topics",
                                      low=0, high=1)
    synthetic_templates: int = _f(1, "number of distinct Q-A templates SynthQA uses (1 = the paper's uniform format)",
                                  low=1, high=12)  # len(data.schema.SYNTHQA_TEMPLATES); a test holds them equal
    synthqa_per_fact: int = _f(3, "SynthQA pairs per fact (question wordings vary, the template does not)", low=1)
    sft_examples: int = _f(5000, "SFT chat examples, each with 1-3 verifiable constraints", low=1)
    suite_bases: int = _f(60, "instruction-following base prompts; each yields levels 1-5 (5 test items)", low=1)
    learnable_items: int = _f(600, "items of the learnable instruction-following tier (the primary one): SFT's "
                                   "wordings, 1-3 binding constraints, held-out facts and topics", low=3)
    benchmark_items: int = _f(200, "knowledge benchmark questions (4-option multiple choice)", low=2)
    chat_items: int = _f(40, "chat-quality open instructions with references", low=1)
    # paper preset (source = hub): real corpora and a generator model
    natural_dataset: str = _f("", "hub id or local path of the natural corpus (source=hub)")
    natural_text_field: str = _f("text", "text column of the natural corpus")
    natural_split: str = _f("train", "split of the natural corpus")
    generator: str = _f("", "SynthQA generator: a hub id / local model folder, or an OpenAI-compatible model name")
    generator_endpoint: str = _f("", "base URL of an OpenAI-compatible endpoint (empty = run `generator` locally)")
    generator_api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the endpoint's API key")
    generator_max_new_tokens: int = _f(256, "new tokens per SynthQA generation", low=1)
    generator_batch_size: int = _f(8, "documents per generation batch", low=1)
    source_documents: int = _f(2000, "natural documents turned into SynthQA (source=hub)", low=1)
    sft_dataset: str = _f("", "public SFT set replacing the embedded one (source=hub; data.sft_examples of its chats"
                              " are used): hub id or local .jsonl/.json/.parquet file or folder with a chat column")
    sft_dataset_config: str = _f("", "configuration (subset) name of the hub SFT set, e.g. all for smoltalk")
    sft_split: str = _f("train", "split of the SFT set")
    sft_messages_field: str = _f("messages", "column of the SFT set holding [{role, content}, ...] chats")


@dataclass(frozen=True)
class FlawsConfig:
    """Stage 02: the data's flaws (distribution differences, pattern simplification)."""

    max_texts: int = _f(300, "texts sampled per data set for the analyses", low=3)
    encoder: str = _f("minilm", "sentence encoder for the t-SNE: minilm (packaged all-MiniLM-L6-v2, offline)")


@dataclass(frozen=True)
class BaseModelConfig:
    """Stage 03: the base model (trained from scratch in the embedded study, loaded from the hub in the paper's)."""

    model_name_or_path: str = _f("", "hub id or local folder of a pretrained base; empty = train the embedded model")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the hub (off unless you trust it)")
    vocab_size: int = _f(2048, "byte-level BPE vocabulary trained on the generated corpus", low=262)
    hidden_size: int = _f(192, "model width", low=1)
    intermediate_size: int = _f(512, "MLP width", low=1)
    num_hidden_layers: int = _f(4, "transformer blocks", low=1)
    num_attention_heads: int = _f(4, "attention heads", low=1)
    block_size: int = _f(256, "tokens per packed training sequence", low=2)
    max_tokens: int = _f(300_000, "pre-training token budget on NonSynth", low=1)
    batch_size: int = _f(16, "sequences per step", low=1)
    learning_rate: float = _f(3e-3, "peak learning rate (cosine schedule)", low=0, low_open=True)
    warmup_steps: int = _f(20, "linear warm-up steps", low=0)
    save_steps: int = _f(50, "checkpoint every N steps (resume after a kill)", low=1)


@dataclass(frozen=True)
class CPTConfig:
    """Stage 04: continued pre-training, one branch per step, equal token budgets."""

    branches: tuple[str, ...] = _f(BRANCHES, "branches to train: " + " | ".join(BRANCHES))
    max_tokens: int = _f(200_000, "CPT token budget per branch", low=1)
    # open at 0 as the branches need it (training.pretraining): at 0 the synthetic branch would be `natural` again
    synthetic_fraction: float = _f(0.3, "share of CPT tokens that are SynthQA (synthetic) or rewritten (rewritten)",
                                   low=0, low_open=True, high=1, high_open=True)
    more_natural_ratio: float = _f(1.0, "more_natural trains this many CPT budgets of extra natural data",
                                   low=0, low_open=True)
    more_natural_from: str = _f("synthetic", "branch more_natural continues from: synthetic (the paper's alternative "
                                "mitigation: more natural data instead of unlearning) | natural")
    batch_size: int = _f(16, "sequences per step", low=1)
    learning_rate: float = _f(1e-3, "peak learning rate", low=0, low_open=True)
    warmup_steps: int = _f(10, "linear warm-up steps", low=0)
    save_steps: int = _f(50, "checkpoint every N steps", low=1)


@dataclass(frozen=True)
class UnlearnConfig:
    """Stage 05: unlearning the synthetic pattern from the `synthetic` CPT model."""

    # gradient_ascent left the default: it collapsed in every seed of the 3-seed reference (pre-SFT perplexity ~1.5e4),
    # which is that reference's result; each default method costs an SFT and an evaluation per seed. smoke runs all.
    methods: tuple[str, ...] = _f(("lower_bounded", "npo"),
                                  "unlearning methods to run: lower_bounded | gradient_ascent | gradient_difference | "
                                  "npo | simnpo (synthflaw.unlearning.METHODS)")
    token_fraction: float = _f(0.02, "unlearning budget as a fraction of the CPT tokens (paper: ~1/300)",
                               low=0, high=1, low_open=True)
    batch_size: int = _f(8, "forget (and replay) sequences per step", low=1)
    learning_rate: float = _f(3e-4, "learning rate", low=0, low_open=True)
    reference: str = _f("cpt", "frozen reference for bias mitigation / NPO: cpt (model before unlearning) | natural")
    forget_scope: str = _f("all", "all tokens of a SynthQA pair | template (only the template's structural tokens)")
    hyperparameters: dict = _f({}, "per-method constructor arguments, e.g. {\"lower_bounded\": {\"tau\": 4.0}}")
    replay_loss_bound: float = _f(10.0, "stop with an error if the replay NLL exceeds this (model collapsing)",
                                  low=0, low_open=True, finite=False)
    save_steps: int = _f(5, "checkpoint every N steps (a diverging method keeps its last good checkpoint)", low=1)


@dataclass(frozen=True)
class SFTConfig:
    """Stage 06: identical supervised fine-tuning for every model."""

    epochs: float = _f(1.0, "passes over the SFT set", low=0, low_open=True)
    batch_size: int = _f(16, "conversations per step", low=1)
    learning_rate: float = _f(2e-3, "peak learning rate", low=0, low_open=True)
    warmup_steps: int = _f(10, "linear warm-up steps", low=0)
    max_length: int = _f(256, "tokens per conversation (longer ones are truncated)", low=2)
    curve_points: int = _f(4, "points of the SFT curve: the model is saved and evaluated k/N of the way through SFT "
                                "for k = 1..N (N = 1: the final model only)", low=1)
    save_steps: int = _f(50, "checkpoint every N steps", low=1)
    # The positive control (synthflaw.data.positive_control): the instrument counts as able to see a harm only where
    # it detects this one. harm_fraction: fixed on natural pilot seeds (benchmarks/calibrate_positive_control.py).
    positive_control: bool = _f(True, "also fine-tune natural's CPT model on a harmed SFT set (model `harmed`), "
                                      "the positive control of the instruction-following endpoints")
    harm_fraction: float = _f(0.05, "share of the harmed SFT set's replies with one constraint's edit undone",
                              low=0, high=1, low_open=True)


@dataclass(frozen=True)
class EvalConfig:
    """Stage 07: benchmark, instruction following, chat quality, output-distribution shift."""

    max_new_tokens: int = _f(96, "new tokens per generated response", low=1)
    batch_size: int = _f(32, "prompts per generation/scoring batch", low=1)
    limit: int = _f(0, "evaluate only the first N items of each suite (0 = all)", low=0)
    speed_prompts: int = _f(0, "also time batched vs one-at-a-time generation on this many prompts (0 = skip)", low=0)
    curve_items: int = _f(150, "learnable-tier items measured at the SFT curve's earlier points (0 = all)", low=0)
    judge: str = _f("", "optional chat judge: empty (reference score only) | local model path | endpoint model name")
    judge_endpoint: str = _f("", "OpenAI-compatible base URL for the judge (key from judge_api_key_env)")
    judge_api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the judge's API key")
    harness_tasks: tuple[str, ...] = _f((), "lm-evaluation-harness tasks run on each model, e.g. mmlu,ifeval "
                                        "(empty = none; needs pip install 'synthflaw[harness]' and the hub)")
    harness_num_fewshot: int = _f(-1, "few-shot examples for the harness tasks (-1 = each task's own default)", low=-1)


@dataclass(frozen=True)
class FiguresConfig:
    """Stage 08: figures and tables from a run's JSON/CSV files only."""

    dpi: int = _f(120, "resolution of the PNG figures", low=10, high=1200)


@dataclass(frozen=True)
class ComputeConfig:
    """How the training stages use the hardware; none of it changes what is trained (not part of a step's
    fingerprint): every stage's batch_size stays the sequences per optimizer step, split over processes and
    accumulation micro-steps. `precision` changes the weights' last bits, not the study: a step's result.json and
    meta.json record the precision it ran in. A bf16 run is not the fp32 run rounded: on seeds 5 and 6 it moved 13 of
    the 17 primary checks by less than one seed-to-seed SD and 4 by 1.0-1.8 SD, about what another seed does
    (benchmarks/results/precision_agreement.json), so compare runs made in one precision."""

    num_processes: int = _f(1, "processes (GPUs) for stages 03, 04 and 06; > 1 runs each of them under "
                                "`accelerate launch` (unlearning and evaluation stay on one device)", low=1)
    accelerate_config: str = _f("", "accelerate config file for num_processes > 1 (empty = the shipped "
                                    "accelerate/ddp.yaml; also accelerate/fsdp.yaml, accelerate/deepspeed_zero2.yaml)")
    gradient_accumulation_steps: int = _f(1, "micro-steps per optimizer step in stages 03-06: each process runs "
                                             "batch_size / (num_processes * this) sequences at a time (less memory)", low=1)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass of stages 03-06 "
                                             "(~30% slower, much less activation memory)")
    precision: str = _f("auto", "stages 03-07: fp32 | bf16 (autocast, fp32 master weights; stage 07 scores "
                                "likelihoods in it) | auto (bf16 only where a timed step on this CPU or GPU is "
                                ">= 1.15x faster, cached per machine)")


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: the seed, the preset it came from, and one section per stage."""

    # numpy's seeds stop at 2**32 - 1: a larger one passed every check and failed in stage 02, after 01 had run
    seed: int = _f(0, "seed of the world, the initialisations and the sampling", low=0, high=2**32 - 1)
    preset: str = _f("default", "the preset these values started from")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "stage 01"})
    flaws: FlawsConfig = field(default_factory=FlawsConfig, metadata={"help": "stage 02"})
    base: BaseModelConfig = field(default_factory=BaseModelConfig, metadata={"help": "stage 03"})
    cpt: CPTConfig = field(default_factory=CPTConfig, metadata={"help": "stage 04"})
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig, metadata={"help": "stage 05"})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "stage 06"})
    evaluate: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "stage 07"})
    figures: FiguresConfig = field(default_factory=FiguresConfig, metadata={"help": "stage 08"})
    compute: ComputeConfig = field(default_factory=ComputeConfig, metadata={"help": "hardware use of stages 03-06"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("data", "flaws", "base", "cpt", "unlearn", "sft", "evaluate", "figures", "compute")

# Presets are overrides of the defaults above (the `default` preset is the defaults themselves).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Everything runs, nothing is claimed: used by the tests and CI.
    "smoke": {
        "data.n_people": 24, "data.n_organisations": 6, "data.n_cities": 8,
        "data.nonsynth_docs": 160, "data.extra_natural_docs": 60, "data.heldout_docs": 16,
        "data.synthqa_per_fact": 1, "data.sft_examples": 48, "data.suite_bases": 4, "data.learnable_items": 30,
        "data.benchmark_items": 24, "data.chat_items": 6,
        "flaws.max_texts": 60,
        "base.vocab_size": 512, "base.hidden_size": 32, "base.intermediate_size": 64,
        "base.num_hidden_layers": 2, "base.num_attention_heads": 4, "base.block_size": 128,
        "base.max_tokens": 8192, "base.batch_size": 8, "base.save_steps": 8, "base.warmup_steps": 2,
        "cpt.max_tokens": 4096, "cpt.batch_size": 8, "cpt.save_steps": 4, "cpt.warmup_steps": 1,
        "unlearn.token_fraction": 0.25, "unlearn.batch_size": 4, "unlearn.save_steps": 2,
        "unlearn.methods": ("lower_bounded", "gradient_ascent", "gradient_difference", "npo", "simnpo"),
        "sft.epochs": 1.0, "sft.batch_size": 8, "sft.max_length": 128, "sft.warmup_steps": 1,
        "evaluate.max_new_tokens": 24, "evaluate.batch_size": 16, "evaluate.speed_prompts": 4,
    },
    # Real models and data sets on a GPU (issue 7; docs/gpu.md): a small hub base, an instruct model as the SynthQA
    # generator, a public natural corpus and SFT set, MMLU and IFEval through lm-evaluation-harness. The paper's
    # shape at ~1/6000 of its CPT budget: 50M CPT tokens with 2% SynthQA, ~1 epoch of NonSynth (fineweb-edu
    # documents average ~1k tokens), unlearning on 1/300 of the CPT tokens. Needs HF_HUB_OFFLINE=0. Every entry
    # can be overridden with --set.
    "paper": {
        "data.source": "hub",
        "data.natural_dataset": "HuggingFaceFW/fineweb-edu",
        "data.nonsynth_docs": 50_000, "data.extra_natural_docs": 50_000, "data.heldout_docs": 500,
        "data.source_documents": 4000,
        "data.generator": "Qwen/Qwen2.5-1.5B-Instruct",
        "data.generator_batch_size": 32, "data.generator_max_new_tokens": 384,
        "data.sft_dataset": "HuggingFaceTB/smoltalk", "data.sft_dataset_config": "all", "data.sft_examples": 20_000,
        "base.model_name_or_path": "Qwen/Qwen2.5-0.5B",
        "base.block_size": 1024,
        "cpt.max_tokens": 50_000_000, "cpt.synthetic_fraction": 0.02, "cpt.batch_size": 16,
        "cpt.learning_rate": 2e-5, "cpt.save_steps": 500,
        "unlearn.token_fraction": 1 / 300, "unlearn.learning_rate": 1e-5, "unlearn.save_steps": 50,
        "sft.epochs": 1.0, "sft.learning_rate": 2e-5, "sft.max_length": 1024, "sft.batch_size": 16,
        "sft.save_steps": 500,
        "sft.positive_control": False,  # a public SFT set carries no checkable constraints to undo
        "evaluate.max_new_tokens": 512,
        # each task's own few-shot setting (MMLU 0-shot, IFEval 0-shot: IFEval has no few-shot split)
        "evaluate.harness_tasks": ("mmlu", "ifeval"), "evaluate.harness_num_fewshot": -1,
    },
    # The embedded study at GPU scale, for a GPU with no network and no weights (docs/gpu.md): a larger world (2000
    # people, 400k NonSynth documents, ~12M tokens), a 0.34B-parameter Llama from random init (hidden 1024, 24
    # layers, 16 heads, vocabulary 16384, block 1024), budgeted for about an hour on one H100 in bf16: pre-training
    # passes over NonSynth ~8 times, CPT ~1.5 times. Other values (synthetic share, methods, epochs) are the
    # default preset's.
    "gpu": {
        "data.n_people": 2000, "data.n_organisations": 300, "data.n_cities": 300,
        "data.nonsynth_docs": 400_000, "data.extra_natural_docs": 200_000, "data.heldout_docs": 1000,
        "data.sft_examples": 20_000, "data.suite_bases": 200, "data.benchmark_items": 2000, "data.chat_items": 200,
        "base.vocab_size": 16384, "base.hidden_size": 1024, "base.intermediate_size": 2816,
        "base.num_hidden_layers": 24, "base.num_attention_heads": 16, "base.block_size": 1024,
        "base.max_tokens": 100_000_000, "base.batch_size": 64, "base.learning_rate": 6e-4,
        "base.warmup_steps": 100, "base.save_steps": 250,
        "cpt.max_tokens": 20_000_000, "cpt.batch_size": 32, "cpt.learning_rate": 3e-4, "cpt.warmup_steps": 30,
        "cpt.save_steps": 200,
        "unlearn.batch_size": 16, "unlearn.learning_rate": 3e-5, "unlearn.save_steps": 100,
        "sft.epochs": 2.0, "sft.batch_size": 32, "sft.learning_rate": 1e-4, "sft.warmup_steps": 30, "sft.save_steps": 200,
        "evaluate.batch_size": 64,
        # 32 sequences of 1024 tokens per micro-step keep a 0.34B model's activations under ~40 GB
        "compute.gradient_accumulation_steps": 2,
    },
}


# Seeds a sweep's points run when none are given: five for the default preset (a sweep is exploratory, not
# registered), the config's `seed` for the others. `synthflaw run` of the default preset runs the registered
# reference's seeds instead (synthflaw.reporting.preregistration.REFERENCE_SEEDS).
PRESET_SEEDS: dict[str, tuple[int, ...]] = {"default": (0, 1, 2, 3, 4)}


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(StudyConfig) if f.name in SECTIONS}


def valid_keys() -> list[str]:
    """Every dotted key an override may name."""
    keys = [f.name for f in dataclasses.fields(StudyConfig) if f.name not in SECTIONS]
    for name, cls in _sections().items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def describe() -> str:
    """One line per key: its default and its help."""
    lines = []
    for f in dataclasses.fields(StudyConfig):
        if f.name in SECTIONS:
            for g in dataclasses.fields(f.default_factory):
                lines.append(f"{f.name}.{g.name} = {_default(g)!r}  # {g.metadata['help']}")
        else:
            lines.append(f"{f.name} = {f.default!r}  # {f.metadata['help']}")
    return "\n".join(lines)


def _field_of(key: str) -> dataclasses.Field:
    keys = valid_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown parameter {key!r}.{hint} Valid keys: {', '.join(keys)}")
    if "." not in key:
        return next(f for f in dataclasses.fields(StudyConfig) if f.name == key)
    section, name = key.split(".", 1)
    return next(f for f in dataclasses.fields(_sections()[section]) if f.name == name)


def coerce(key: str, value: Any) -> Any:
    """Check (and, for strings from the command line, parse) one override value against its field's type."""
    fld = _field_of(key)
    kind = type(_default(fld))
    bad = ConfigError(f"{key} expects {kind.__name__}"
                      f"{' (comma-separated names)' if kind is tuple else ''}, got {value!r}: {fld.metadata['help']}")
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise bad
                return text.lower() in ("true", "1", "yes")
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
            if kind is tuple:
                return tuple(part.strip() for part in text.split(",") if part.strip())
            if kind is dict:
                parsed = json.loads(text)
                if not isinstance(parsed, dict):
                    raise bad
                return parsed
        except (ValueError, json.JSONDecodeError):
            raise bad from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if kind is bool and not isinstance(value, bool) or not isinstance(value, kind) or (
            kind is int and isinstance(value, bool)):
        raise bad
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["cpt.max_tokens=1000", "seed=2"]`` -> validated dict. Raises ConfigError on the first bad pair."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value (e.g. --set cpt.max_tokens=100000)")
        key, value = pair.split("=", 1)
        require_utf8("--set", key.strip(), value)
        out[key.strip()] = coerce(key.strip(), value)
    return out


def require_utf8(option: str, key: str, value: str) -> None:
    """ConfigError naming the key when `option key=value` came from the command line with bytes that are not UTF-8
    (Python keeps them as lone surrogates): a string value would be taken, and fail only when the run writes its
    study.json (or a sweep its sweep.json), after its folder was made, naming no key."""
    for part, text in (("key", key), ("value", value)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = key.encode("utf-8", "backslashreplace").decode()
            raise ConfigError(f"{option} {shown}=...: the {part} {text.encode('utf-8', 'surrogateescape')!r} is not "
                              "valid UTF-8; type it again in UTF-8 (check the terminal's or the script's "
                              "encoding)") from None


def resolve(preset: str = "default", overrides: dict[str, Any] | None = None) -> StudyConfig:
    """The preset's values plus explicit overrides, validated; the result is what a run saves and uses."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    values: dict[str, Any] = {**PRESETS[preset], **(overrides or {})}
    values = {key: coerce(key, value) for key, value in values.items()}
    top = {k: v for k, v in values.items() if "." not in k}
    sections = {}
    for name, cls in _sections().items():
        mine = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")}
        sections[name] = cls(**mine)
    cfg = StudyConfig(**{**top, "preset": preset, **sections})
    check(cfg)
    return cfg


# Keys whose absence from a saved config means something other than their default: a run saved before the positive
# control existed trained none, and its default (on) would make every such run look unfinished.
ABSENT_MEANS = {("sft", "positive_control"): False}


def absent_overrides(saved: dict) -> dict[str, Any]:
    """The `ABSENT_MEANS` keys a saved config lacks, as overrides ("sft.positive_control": False), so a run resolved
    again from its preset (stage 08 made again) keeps meaning what it meant when it ran."""
    return {f"{section}.{key}": value for (section, key), value in ABSENT_MEANS.items()
            if section in saved and key not in saved[section]}


def from_dict(d: dict) -> StudyConfig:
    """Rebuild a StudyConfig from its saved ``to_dict()`` form (a downstream stage reads its upstream's config)."""
    # .get: a run saved before a section existed (e.g. compute) gets that section's defaults, except `ABSENT_MEANS`
    sections = {}
    for name, cls in _sections().items():
        saved = d.get(name, {})
        values = {k: v for (section, k), v in ABSENT_MEANS.items() if section == name and saved and k not in saved}
        values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
        sections[name] = cls(**values)
    return StudyConfig(seed=d["seed"], preset=d["preset"], **sections)


def _domain_problems(cfg: StudyConfig) -> list[str]:
    """Every number outside its field's domain, each named by its key with the domain and the field's help."""
    problems = []
    for f in dataclasses.fields(StudyConfig):
        section = getattr(cfg, f.name)
        pairs = ([(f"{f.name}.{g.name}", g, getattr(section, g.name)) for g in dataclasses.fields(section)]
                 if f.name in SECTIONS else [(f.name, f, section)])
        for key, fld, value in pairs:
            if out_of_domain(fld, value):
                problems.append(f"{key}={value!r} must be {domain_text(fld)} ({fld.metadata['help']})")
    return problems


def check(cfg: StudyConfig) -> None:
    """Every field in its domain, and the cross-field checks that a domain alone cannot express."""
    problems = _domain_problems(cfg)
    if cfg.base.hidden_size % max(1, cfg.base.num_attention_heads):
        problems.append(f"base.hidden_size={cfg.base.hidden_size} must be divisible by base.num_attention_heads="
                        f"{cfg.base.num_attention_heads} (each head gets an equal slice of the width)")
    for b in cfg.cpt.branches:
        if b not in BRANCHES:
            problems.append(f"cpt.branches: unknown branch {b!r}; valid: {', '.join(BRANCHES)}")
    if not cfg.cpt.branches:
        problems.append("cpt.branches is empty: list the branches to train, e.g. cpt.branches=natural,synthetic")
    for key, names in (("cpt.branches", cfg.cpt.branches), ("unlearn.methods", cfg.unlearn.methods)):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # one step folder per name: a second one would be the first again
            problems.append(f"{key} lists {', '.join(twice)} more than once: list each once")
    if cfg.cpt.more_natural_from not in ("synthetic", "natural"):
        problems.append("cpt.more_natural_from must be synthetic or natural")
    elif "more_natural" in cfg.cpt.branches and (
            cfg.cpt.more_natural_from not in cfg.cpt.branches
            or cfg.cpt.branches.index(cfg.cpt.more_natural_from) > cfg.cpt.branches.index("more_natural")):
        problems.append(f"cpt.branches: more_natural continues from {cfg.cpt.more_natural_from}, so that branch must "
                        "be listed before it")
    if cfg.unlearn.methods and "synthetic" not in cfg.cpt.branches:
        problems.append("unlearn.methods needs the synthetic CPT branch in cpt.branches (or set unlearn.methods=)")
    if cfg.unlearn.reference not in ("cpt", "natural"):
        problems.append("unlearn.reference must be cpt or natural")
    if cfg.unlearn.forget_scope not in ("all", "template"):
        problems.append("unlearn.forget_scope must be all or template")
    if cfg.data.source not in ("embedded", "hub"):
        problems.append("data.source must be embedded or hub")
    if cfg.data.sft_dataset and cfg.data.source != "hub":
        problems.append("data.sft_dataset replaces the SFT set of real-data runs only: set data.source=hub, or "
                        "leave data.sft_dataset empty for the embedded study")
    problems += _compute_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _compute_problems(cfg: StudyConfig) -> list[str]:
    """A stage's batch_size is split evenly over processes and accumulation micro-steps, or not at all."""
    c = cfg.compute
    if c.precision not in ("auto", "fp32", "bf16"):
        return [f"compute.precision={c.precision!r} must be auto, fp32 or bf16"]
    if c.num_processes < 1 or c.gradient_accumulation_steps < 1:
        return ["compute.num_processes and compute.gradient_accumulation_steps must be >= 1"]
    problems = []
    shares = {"cpt": c.num_processes * c.gradient_accumulation_steps,
              "sft": c.num_processes * c.gradient_accumulation_steps,
              "unlearn": c.gradient_accumulation_steps}  # unlearning runs in one process
    if not cfg.base.model_name_or_path:
        shares["base"] = c.num_processes * c.gradient_accumulation_steps
    for section, share in shares.items():
        batch = getattr(cfg, section).batch_size
        if batch % share:
            problems.append(f"{section}.batch_size={batch} is not divisible by {share} (compute.num_processes="
                            f"{c.num_processes if section != 'unlearn' else 1} x compute.gradient_accumulation_steps="
                            f"{c.gradient_accumulation_steps}): pick a batch size or accumulation that divides")
    return problems
