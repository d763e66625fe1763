import dataclasses

import pytest

from synthflaw import config
from synthflaw.config import ConfigError


def test_every_field_has_help():
    for section in config.SECTIONS:
        cls = type(getattr(config.StudyConfig(), section))
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"


def test_presets_resolve_and_are_frozen():
    for name in config.PRESETS:
        cfg = config.resolve(name)
        assert cfg.preset == name
    cfg = config.resolve("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.n_people = 3


def test_override_applies_and_parses_strings():
    cfg = config.resolve("smoke", config.parse_overrides(
        ["seed=3", "cpt.synthetic_fraction=0.3", "cpt.branches=natural,synthetic", "unlearn.methods=",
         'unlearn.hyperparameters={"lower_bounded": {"tau": 2.0}}']))
    assert cfg.seed == 3 and cfg.cpt.synthetic_fraction == 0.3
    assert cfg.cpt.branches == ("natural", "synthetic") and cfg.unlearn.methods == ()
    assert cfg.unlearn.hyperparameters["lower_bounded"]["tau"] == 2.0


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as err:
        config.resolve("smoke", {"no_such_key": 1})
    assert "no_such_key" in str(err.value) and "cpt.synthetic_fraction" in str(err.value)


def test_close_match_is_suggested():
    with pytest.raises(ConfigError, match="Did you mean cpt.synthetic_fraction"):
        config.parse_overrides(["cpt.synthetic_fractoin=0.1"])


@pytest.mark.parametrize("pair", ["seed=abc", "data.n_people=1.5", "base.trust_remote_code=maybe",
                                  "unlearn.hyperparameters=[1]"])
def test_ill_typed_values_are_errors(pair):
    with pytest.raises(ConfigError, match=pair.split("=")[0] + " expects"):
        config.parse_overrides([pair])


def test_wrong_python_types_are_errors():
    with pytest.raises(ConfigError, match="seed expects int"):
        config.resolve("smoke", {"seed": 1.5})
    with pytest.raises(ConfigError, match="seed expects int"):
        config.resolve("smoke", {"seed": True})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="more_natural continues from synthetic"):
        config.resolve("smoke", {"cpt.branches": ("natural", "more_natural")})
    with pytest.raises(ConfigError, match="more_natural continues from natural"):
        config.resolve("smoke", {"cpt.branches": ("synthetic", "more_natural"), "cpt.more_natural_from": "natural"})
    with pytest.raises(ConfigError, match="unknown branch"):
        config.resolve("smoke", {"cpt.branches": ("natural", "bogus")})
    with pytest.raises(ConfigError, match="unknown preset"):
        config.resolve("nope")


def test_round_trip_through_dict():
    cfg = config.resolve("smoke", {"seed": 7})
    assert config.from_dict(cfg.to_dict()) == cfg


def test_gpu_preset_builds_a_model_of_a_few_hundred_million_parameters_without_allocating_it():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from synthflaw.models.build import embedded_model_config

    cfg = config.resolve("gpu")
    assert cfg.data.source == "embedded" and not cfg.base.model_name_or_path  # no network, no weights
    llama = LlamaConfig(**embedded_model_config(cfg.base), vocab_size=cfg.base.vocab_size)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(llama)
    parameters = sum(p.numel() for p in model.parameters())
    per_layer = 4 * 1024**2 + 3 * 1024 * 2816 + 2 * 1024  # attention, MLP, two norms
    assert parameters == 24 * per_layer + 2 * 16384 * 1024 + 1024  # + embedding, untied head, final norm
    assert 300e6 < parameters < 400e6
    assert (cfg.base.hidden_size, cfg.base.num_hidden_layers, cfg.base.num_attention_heads, cfg.base.block_size) == (
        1024, 24, 16, 1024)
    default = config.resolve("default")
    assert cfg.data.nonsynth_docs >= 10 * default.data.nonsynth_docs and cfg.data.n_people >= 5 * default.data.n_people
    # the budgets keep the embedded study's order: pre-training > CPT > unlearning
    assert cfg.base.max_tokens > cfg.cpt.max_tokens > cfg.unlearn.token_fraction * cfg.cpt.max_tokens


def test_paper_preset_keeps_the_papers_shape():
    cfg = config.resolve("paper")
    assert cfg.data.source == "hub" and cfg.data.sft_dataset and cfg.base.model_name_or_path
    assert cfg.cpt.synthetic_fraction == 0.02 and cfg.unlearn.token_fraction == 1 / 300
    assert set(cfg.evaluate.harness_tasks) == {"mmlu", "ifeval"}


def test_compute_options_must_split_every_batch_evenly():
    cfg = config.resolve("smoke", {"compute.num_processes": 2, "compute.gradient_accumulation_steps": 2})
    assert cfg.compute.num_processes == 2
    with pytest.raises(ConfigError, match=r"(?s)cpt.batch_size=8 is not divisible by 6.*sft.batch_size=8"):
        config.resolve("smoke", {"compute.num_processes": 3, "compute.gradient_accumulation_steps": 2})
    # unlearning runs in one process: only the accumulation has to divide its batch
    with pytest.raises(ConfigError, match=r"unlearn.batch_size=4 is not divisible by 8"):
        config.resolve("smoke", {"compute.gradient_accumulation_steps": 8, "cpt.batch_size": 16,
                                 "sft.batch_size": 16, "base.batch_size": 16})
    with pytest.raises(ConfigError, match="must be >= 1"):
        config.resolve("smoke", {"compute.num_processes": 0})
    with pytest.raises(ConfigError, match="data.sft_dataset replaces the SFT set of real-data runs only"):
        config.resolve("smoke", {"data.sft_dataset": "HuggingFaceTB/smoltalk"})


def test_compute_options_do_not_change_a_steps_fingerprint():
    from synthflaw.registry import STAGES
    from synthflaw.runs import fingerprint, step_config

    plain = config.resolve("smoke")
    spread = config.resolve("smoke", {"compute.num_processes": 2, "compute.gradient_checkpointing": True,
                                      "compute.accelerate_config": "accelerate/fsdp.yaml"})
    for stage in STAGES:
        assert fingerprint(step_config(plain, stage, None)) == fingerprint(step_config(spread, stage, None)), stage
    other_data = config.resolve("smoke", {"data.sft_examples": 50})
    assert fingerprint(step_config(plain, "01_generate_data", None)) != fingerprint(
        step_config(other_data, "01_generate_data", None))


def test_a_config_saved_before_the_compute_section_still_loads():
    saved = config.resolve("smoke", {"seed": 4}).to_dict()
    del saved["compute"]
    assert config.from_dict(saved) == config.resolve("smoke", {"seed": 4})


@pytest.mark.parametrize("override, key, domain", [
    ("base.batch_size=0", "base.batch_size", "an integer >= 1"),
    ("base.num_attention_heads=0", "base.num_attention_heads", "an integer >= 1"),
    ("sft.epochs=nan", "sft.epochs", "a finite number > 0"),
    ("sft.epochs=inf", "sft.epochs", "a finite number > 0"),
    ("seed=-1", "seed", "an integer in [0, 4294967295]"),
    # numpy's seeds end at 2**32 - 1: a larger one failed in stage 02, after stage 01 had written its data
    ("seed=4294967296", "seed", "an integer in [0, 4294967295]"),
    ("figures.dpi=0", "figures.dpi", "an integer in [10, 1200]"),
    ("data.nonsynth_docs=-10", "data.nonsynth_docs", "an integer >= 1"),
    ("cpt.synthetic_fraction=1", "cpt.synthetic_fraction", "a finite number in (0, 1)"),
    # at 0 the synthetic and rewritten branches have nothing to mix in: refused at once, not minutes into stage 04
    ("cpt.synthetic_fraction=0", "cpt.synthetic_fraction", "a finite number in (0, 1)"),
    ("unlearn.token_fraction=0", "unlearn.token_fraction", "a finite number in (0, 1]"),
])
def test_every_number_is_checked_against_its_domain_naming_the_key(override, key, domain, tmp_path, capsys):
    from synthflaw import cli

    code = cli.main(["config", "--preset", "smoke", "--set", override])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{key}=" in err and f"must be {domain}" in err, err


def test_config_command_makes_the_stages_checks_too(capsys):
    from synthflaw import cli

    assert cli.main(["config", "--set", "unlearn.methods=nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


def test_every_numeric_field_has_a_domain():
    import dataclasses

    missing = []
    for f in dataclasses.fields(config.StudyConfig):
        fields = dataclasses.fields(f.default_factory) if f.name in config.SECTIONS else [f]
        for g in fields:
            kind = type(config._default(g))
            if kind in (int, float) and g.metadata.get("low") is None and g.metadata.get("high") is None:
                missing.append(f"{f.name}.{g.name}" if f.name in config.SECTIONS else g.name)
    assert not missing, f"numeric fields without a domain: {missing}"


def test_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match="hidden_size=32 must be divisible by base.num_attention_heads=5"):
        config.resolve("smoke", {"base.num_attention_heads": 5})
