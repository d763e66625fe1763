"""The `paper` preset end to end on CPU, every hub name pointed at a local stand-in, and the hub only touched online.

Stand-ins: a tiny random Llama with a chat tokenizer saved like a hub model (the base, and a local generator), a
JSONL corpus in fineweb-edu's schema, a JSONL SFT set in smoltalk's schema, and an OpenAI-compatible endpoint on
127.0.0.1 answering like a teacher model (so the run has SynthQA records). No connection leaves this machine.
"""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from synthflaw import config
from synthflaw.data import embedded, schema
from synthflaw.data.hub_corpus import public_sft_records
from synthflaw.data.synthqa_generation import build_from_hub, check_hub_data, load_prompt
from synthflaw.hub import HubOffline
from synthflaw.records import read_jsonl
from synthflaw.registry import models_of
from synthflaw.runner import run_study
from synthflaw.runs import Step
from synthflaw.stages import s03_base_model
from synthflaw.stages.s01_generate_data import make_generator

# The fake teacher endpoint and the fineweb-like corpus of the stage-01 tests (tests/fakes.py).
from fakes import FakeEndpoint, corpus_text, write_corpus

# End to end (slow). As in tests/test_hub_data.py, a connection or name lookup beyond this machine fails the test
# (conftest.py's no_network), and tiny models run on one torch thread.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_network", "one_torch_thread")]

METHODS = ("lower_bounded", "npo")


def sft_rows(leaking_prompt: str) -> list[dict]:
    """Chats in the smoltalk schema ({"messages", "source"}), plus rows the loader must skip and count."""
    rows = [{"messages": [{"role": "user", "content": f"Write one sentence about {corpus_text(i)[:40]}"},
                          {"role": "assistant", "content": f"Here is a sentence about item {i}."}],
             "source": "smol-constraints", "id": f"chat-{i}"} for i in range(24)]
    rows.insert(3, {"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "{}"}],
                    "source": "tools"})
    rows.insert(5, {"messages": [{"role": "user", "content": "hello"}], "source": "broken"})
    rows.insert(7, dict(rows[0]))  # an exact duplicate
    rows.insert(9, {"messages": [{"role": "user", "content": leaking_prompt},
                                 {"role": "assistant", "content": "An answer to a test item."}], "source": "web"})
    return rows


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, train_chat_tokenizer, tiny_llama):
    folder = tmp_path_factory.mktemp("stand_ins")
    corpus = write_corpus(folder / "fineweb.jsonl", 80)
    # A chat prompt of the embedded suite the run evaluates on: the SFT loader must drop the chat holding it.
    world = embedded.build_embedded(config.resolve("paper", overrides()).data, 0)
    rows = sft_rows(world["chat"][0]["prompt"])
    with open(folder / "smoltalk.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    model_dir = folder / "tiny-llama"
    texts = [corpus_text(i) for i in range(80)] + [load_prompt("synthqa"), load_prompt("rewrite")]
    texts += [m["content"] for row in rows for m in row["messages"]]
    tokenizer = train_chat_tokenizer(texts, 400, model_dir)
    tiny_llama(tokenizer, seed=0, max_position_embeddings=1024).save_pretrained(model_dir)
    return {"corpus": corpus, "sft": folder / "smoltalk.jsonl", "model": model_dir, "sft_rows": rows}


def overrides(stand_ins: dict | None = None, endpoint: str = "") -> dict:
    """The paper preset made tiny: every hub name a local path, budgets of a few steps."""
    local = {}
    if stand_ins is not None:
        local = {"data.natural_dataset": str(stand_ins["corpus"]), "data.sft_dataset": str(stand_ins["sft"]),
                 "data.generator": "teacher" if endpoint else str(stand_ins["model"]),
                 "base.model_name_or_path": str(stand_ins["model"])}
    return {
        **local,
        "data.generator_endpoint": endpoint, "data.generator_batch_size": 3, "data.generator_max_new_tokens": 48,
        "data.nonsynth_docs": 40, "data.extra_natural_docs": 12, "data.heldout_docs": 6, "data.source_documents": 6,
        "data.sft_dataset_config": "", "data.sft_examples": 25,  # every usable chat: all rows are read
        "data.n_people": 12, "data.n_organisations": 4, "data.n_cities": 4,
        "data.suite_bases": 2, "data.benchmark_items": 8, "data.chat_items": 3, "data.learnable_items": 30,
        "flaws.max_texts": 30,
        "base.block_size": 64,
        "cpt.max_tokens": 1024, "cpt.batch_size": 4, "cpt.save_steps": 2, "cpt.warmup_steps": 1,
        "unlearn.methods": METHODS, "unlearn.batch_size": 4, "unlearn.save_steps": 1,
        "sft.max_length": 96, "sft.batch_size": 4, "sft.save_steps": 2, "sft.warmup_steps": 1,
        "evaluate.harness_tasks": (), "evaluate.max_new_tokens": 12, "evaluate.batch_size": 8,
        "evaluate.speed_prompts": 0,
    }


def test_the_paper_preset_runs_end_to_end_on_local_stand_ins(stand_ins, tmp_path):
    with FakeEndpoint() as teacher:
        cfg_overrides = {**overrides(stand_ins, endpoint=teacher.url), "data.generator_api_key_env": ""}
        run_dir = run_study("paper", "paper-local", cfg_overrides, runs_root=tmp_path, engine="inprocess",
                            log=lambda _: None)
    cfg = config.resolve("paper", cfg_overrides)
    assert cfg.cpt.synthetic_fraction == 0.02 and cfg.data.sft_dataset == str(stand_ins["sft"])

    # 01: NonSynth from the corpus, SynthQA from the teacher, the SFT set from the public set (skips counted)
    data_dir = run_dir / "01_generate_data" / "data"
    data = schema.load_data(data_dir)
    world = json.loads((data_dir / "world.json").read_text())
    assert world["generation"]["pairs"] == 12 and world["generation"]["failures"] == 0 and len(data["synthqa"]) == 12
    assert all(r["text"].startswith("Question: ") for r in data["synthqa"])
    assert len(data["nonsynth"]) == 40 and all(r["provenance"]["dataset"] == str(stand_ins["corpus"])
                                               for r in data["nonsynth"])
    assert world["sft_dataset"]["skipped"] == {"duplicate": 1, "no_assistant_turn": 1, "unknown_role": 1}
    assert world["sft_dataset"]["dropped_evaluation_prompt"] == 1 and len(data["sft"]) == 24
    for record in data["sft"]:
        row = stand_ins["sft_rows"][record["provenance"]["row"]]
        assert record["messages"] == row["messages"] and record["constraints"] == []
        assert record["provenance"]["dataset"] == str(stand_ins["sft"]) and record["provenance"]["source_id"] == row["id"]

    # 03: the given base recorded, not trained; generation stops at the template's end of turn
    base = json.loads((run_dir / "03_base_model" / "result.json").read_text())
    assert base["source"] == str(stand_ins["model"]) and base["trained"] is False
    assert not (run_dir / "03_base_model" / "checkpoints").exists()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "03_base_model" / "model")
    recorded = AutoModelForCausalLM.from_pretrained(run_dir / "03_base_model" / "model")
    assert tokenizer.convert_tokens_to_ids("<|end|>") in recorded.generation_config.eos_token_id
    original = AutoModelForCausalLM.from_pretrained(stand_ins["model"])
    assert all(torch.equal(v, recorded.state_dict()[k]) for k, v in original.state_dict().items())

    # 04-06: a trained checkpoint for every branch, method and fine-tuned model
    for branch in cfg.cpt.branches:
        summary = json.loads((run_dir / "04_continued_pretraining" / branch / "result.json").read_text())
        assert summary["tokens"] == 1024 and (run_dir / "04_continued_pretraining" / branch / "model"
                                              / "model.safetensors").exists()
    for method in METHODS:
        assert (run_dir / "05_unlearning" / method / "model" / "model.safetensors").exists()
    for model in models_of(cfg):
        assert (run_dir / "06_sft" / model / "model" / "model.safetensors").exists(), model
        metrics = json.loads((run_dir / "07_evaluate" / model / "metrics.json").read_text())
        assert 0.0 <= metrics["benchmark_accuracy"] <= 1.0 and "hard_satisfaction_rate" in metrics, model
    sft = json.loads((run_dir / "06_sft" / "natural" / "result.json").read_text())
    assert sft["examples"] == 24 and sft["steps"] == 6

    # 08: figures from the run's files
    figures = list((run_dir / "08_figures").rglob("*.png"))
    assert len(figures) >= 3, figures


def test_a_local_generator_model_runs_and_its_junk_is_counted_not_kept(stand_ins, tmp_path):
    with pytest.warns(UserWarning, match="no parseable Q-A pair"):
        run_dir = run_study("paper", "paper-local-generator", overrides(stand_ins), runs_root=tmp_path,
                            engine="inprocess", only=["01"], log=lambda _: None)
    world = json.loads((run_dir / "01_generate_data" / "data" / "world.json").read_text())
    assert world["generation"]["generator"] == str(stand_ins["model"])
    assert world["generation"]["documents"] == 6 and world["generation"]["failures"] == 6
    assert read_jsonl(run_dir / "01_generate_data" / "data" / "synthqa.jsonl") == []
    assert len(read_jsonl(run_dir / "01_generate_data" / "data" / "generation" / "failures.jsonl")) == 6


class Asked(Exception):
    """Raised by a patched loader after recording what it was asked for."""


def test_hub_names_go_to_the_loaders_only_when_online(tmp_path, monkeypatch):
    cfg = config.resolve("paper")  # the real hub names
    step = Step(tmp_path / "run", "03_base_model").open(cfg)

    # Offline (synthflaw's default): every hub name fails at once, naming its key and the fix.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checks = {"data.natural_dataset": lambda: check_hub_data(cfg.data),
              "base.model_name_or_path": lambda: s03_base_model.run(cfg, step),
              "data.generator": lambda: make_generator(cfg.data),
              "data.sft_dataset": lambda: public_sft_records(cfg.data, cfg.seed)}
    for key, call in checks.items():
        started = time.perf_counter()
        with pytest.raises(HubOffline, match=rf"{key}=.*HF_HUB_OFFLINE=0.*or set {key} to a local"):
            call()
        assert time.perf_counter() - started < 2.0, key
    # a run refuses before it writes anything: the stages' checks come first
    with pytest.raises(config.ConfigError, match="data.natural_dataset='HuggingFaceFW/fineweb-edu' is not a local"):
        run_study("paper", "offline", runs_root=tmp_path, engine="inprocess", only=["01"], log=lambda _: None)
    assert not (tmp_path / "offline").exists()

    # Online: the hub ids are exactly what the loaders are asked for (the loaders are stand-ins that record).
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def recorder(kind):
        def load(*args, **kwargs):
            asked.append((kind, args, kwargs))
            raise Asked(kind)
        return load

    monkeypatch.setattr(datasets, "load_dataset", recorder("dataset"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recorder("model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    for call in (lambda: build_from_hub(cfg, tmp_path / "data", generator=None),
                 lambda: public_sft_records(cfg.data, cfg.seed),
                 lambda: make_generator(cfg.data).generate(["a prompt"]),  # a local model loads at its first call
                 lambda: s03_base_model.run(cfg, step)):
        with pytest.raises(Asked):
            call()
    assert [(kind, args[:2]) for kind, args, _ in asked] == [
        ("dataset", ("HuggingFaceFW/fineweb-edu", None)), ("dataset", ("HuggingFaceTB/smoltalk", "all")),
        ("tokenizer", ("Qwen/Qwen2.5-1.5B-Instruct",)), ("model", ("Qwen/Qwen2.5-0.5B",))]
    assert asked[0][2] == {"split": "train", "streaming": True} and asked[1][2] == {"split": "train",
                                                                                    "streaming": True}
    # every hub name of the preset is among those checked
    assert {k for k, v in config.PRESETS["paper"].items() if isinstance(v, str) and "/" in v} == set(checks)
