"""compute.precision (synthflaw.training.precision): fp32 and bf16 taken as set, `auto` decided by timing against a
stated margin and cached per machine, the model left as it was by the timing, and the choice in a training run's
summary and arguments."""

import json

import pytest
import torch

from synthflaw import config
from synthflaw.training import precision
from synthflaw.training.pretraining import pack_texts
from synthflaw.training.scaffold import make_trainer, train_causal_lm

WORDS = "the river north of the city was founded by a council that met in the library every spring".split()


def natural_docs(n):
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(12)) for i in range(n)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(train_chat_tokenizer):
    return train_chat_tokenizer(natural_docs(100), 300)


@pytest.fixture
def model(tokenizer, tiny_llama):
    return tiny_llama(tokenizer)


def timings(fp32, bf16):
    def measure(model, batch_size, seq_len):
        measure.calls += 1
        return {"fp32_step_s": fp32, "bf16_step_s": bf16}
    measure.calls = 0
    return measure


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_a_set_precision_is_taken_without_timing(model, monkeypatch, setting):
    monkeypatch.setattr(precision, "measure", timings(1.0, 1.0))
    assert precision.choose(setting, model, 2, 16) == {"precision": setting, "setting": setting, "reason": "set"}
    assert precision.measure.calls == 0


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.5, "bf16"), (1.15, 1.0, "bf16"), (1.1, 1.0, "fp32"),
                                                 (1.0, 3.0, "fp32")])
def test_auto_keeps_bf16_only_past_the_margin_and_caches_the_choice(model, monkeypatch, tmp_path, fp32, bf16,
                                                                    chosen):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(precision, "measure", timings(fp32, bf16))
    first = precision.choose("auto", model, 2, 16)
    assert first["precision"] == chosen and first["setting"] == "auto"
    assert (first["fp32_step_s"], first["bf16_step_s"]) == (fp32, bf16)  # both timings recorded
    assert precision.choose("auto", model, 2, 16) == first and precision.measure.calls == 1  # cached
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert [entry["precision"] for entry in saved.values()] == [chosen]
    assert first["timed_batch"] == [2, 16]
    assert precision.choose("auto", model, 4, 32) == first  # one choice per model shape: every stage makes the same
    wider = type(model)(type(model.config)(**{**model.config.to_dict(), "hidden_size": 64}))
    precision.choose("auto", wider, 2, 16)  # another model shape is timed on its own
    assert precision.measure.calls == 2


def test_timing_leaves_the_model_as_it_was(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    seconds = precision.step_seconds(model, 2, 8, bf16=True, steps=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {"fp32_step_s", "bf16_step_s"} <= set(precision.measure(model, 2, 8, steps=1))


def test_a_bad_precision_is_refused_naming_the_choices(model):
    with pytest.raises(ValueError, match=r"compute.precision='fp16': use one of auto, fp32, bf16"):
        precision.choose("fp16", model, 2, 16)
    with pytest.raises(config.ConfigError, match=r"compute.precision='fp16' must be auto, fp32 or bf16"):
        config.resolve("smoke", {"compute.precision": "fp16"})


@pytest.mark.parametrize("setting, bf16", [("bf16", True), (False, False), ("auto", None)])
def test_the_trainer_runs_in_the_chosen_precision_and_the_summary_says_so(tokenizer, model, tmp_path, monkeypatch,
                                                                         setting, bf16):
    monkeypatch.setattr(precision, "measure", timings(1.0, 5.0))  # `auto` on a machine where bf16 is slower
    data = pack_texts(tokenizer, natural_docs(20), 16)
    trainer, _, _ = make_trainer(model, tokenizer, data, tmp_path / "t", max_steps=1, batch_size=2,
                                 learning_rate=1e-3, warmup_steps=0, seed=0, save_steps=10, bf16=setting)
    assert trainer.args.bf16 is bool(bf16) and trainer.precision["precision"] == ("bf16" if bf16 else "fp32")
    summary = train_causal_lm(model, tokenizer, data, tmp_path / "s", max_steps=1, batch_size=2, learning_rate=1e-3,
                              warmup_steps=0, seed=0, save_steps=10, bf16=setting)
    assert summary["bf16"] is bool(bf16) and summary["precision"] == trainer.precision
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights in either precision


def test_generation_decodes_in_fp32_inside_a_bf16_autocast(tokenizer, model):
    """Stage 07 scores under the training's precision (a bf16 autocast where bf16 was chosen); its greedy decoding
    stays fp32 (one token per row: casts cost more than bf16 saves), with the responses it gives outside one."""
    from synthflaw.models.generation import generate_ids

    dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    prompts = natural_docs(5)
    plain = generate_ids(model, tokenizer, prompts, 6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = generate_ids(model, tokenizer, prompts, 6, 4)
        decoded = set(dtypes)
        scored = model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype  # a scoring pass does run in bf16
    assert inside == plain and decoded == {torch.float32} and scored == torch.bfloat16
