"""Training library (stages 03, 04, 06): tokenizer, model, packing, the shared loop, CPT branches, SFT labels."""

import csv
import gc
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from synthflaw.config import BRANCHES, ComputeConfig
from synthflaw.models.build import build_model, load_model, stop_at_end_of_turn
from synthflaw.models.tokenizer import end_of_turn_id, load_tokenizer, train_tokenizer
from synthflaw.training import launch
from synthflaw.training.jobs import ContinuedPretrainingJob, PretrainJob, SFTJob, job_from_json
from synthflaw.training.launch import (DEFAULT_ACCELERATE_CONFIG, LaunchFailed, accelerate_command,
                                       accelerate_config_path, launch_job, run_training)
from synthflaw.training.pretraining import (branch_mixture, continue_pretraining, mix_at_token_fraction, pack_texts,
                                           pretrain, steps_for_token_budget)
from synthflaw.training.scaffold import CausalLMCollator, train_causal_lm
from synthflaw.training.sft import IGNORE_INDEX, encode_chat, supervised_finetune

NAMES = ["Ilara Venn", "Tomas Reed", "Oona Pike", "Bram Holt", "Sela Marsh", "Kiro Dane"]
CITIES = ["Velmont", "Arden", "Calder", "Mirefield"]


def natural_docs(n, seed=0):
    rng = random.Random(seed)
    return [f"{rng.choice(NAMES)} was born in {rng.choice(CITIES)}. The city of {rng.choice(CITIES)} is old. "
            f"{rng.choice(NAMES)} works in {rng.choice(CITIES)}." for _ in range(n)]


def synthqa_docs(n, seed=1):
    rng = random.Random(seed)
    return [f"Question: Where was {rng.choice(NAMES)} born?\nAnswer: {rng.choice(CITIES)}" for _ in range(n)]


# Tiny models on one torch thread (conftest.py's one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(train_chat_tokenizer):
    return train_chat_tokenizer(natural_docs(200) + synthqa_docs(50), 320)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_config):
    """tiny_model(tokenizer, seed=0): the tiny Llama built by the library's build_model (the embedded path)."""
    return lambda tokenizer, seed=0: build_model(tokenizer, tiny_llama_config, seed=seed)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_curve(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- tokenizer and model -----------------------------------------------------------------------------------------

def test_tokenizer_round_trip_chat_template_and_determinism(tokenizer, tmp_path):
    loaded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    text = "Ilara Venn was born in Velmont. Ünïcode ✓ and\ttabs\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    for token in ("<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(loaded(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Where?"}]
    assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nWhere?<|end|>\n<|assistant|>\n")
    assert loaded.apply_chat_template(chat[:2], tokenize=False) == "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
    again = train_tokenizer(natural_docs(200) + synthqa_docs(50), 320, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (Path(tokenizer.name_or_path) / "tokenizer.json").read_bytes()
    assert again.get_vocab() == tokenizer.get_vocab()


def test_build_model_is_seeded_and_leaves_global_rng_alone(tokenizer, tiny_model):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_model(tokenizer, 0), tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    assert torch.rand(1) == expected_next
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a.config.vocab_size == len(tokenizer) and a.config.pad_token_id == tokenizer.pad_token_id
    assert a.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]


def test_generation_stops_at_the_chat_templates_end_of_turn(tokenizer, tmp_path, tiny_model):
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|end|>")
    # A hub base like Qwen2.5-0.5B: a ChatML template whose turns end with <|im_end|>, a generation config that
    # stops at the EOS only. After SFT on that template the model must stop at <|im_end|> too.
    chatml = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(chatml) == im_end
    model = tiny_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert stop_at_end_of_turn(model, chatml) == [tokenizer.eos_token_id, im_end]
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).generation_config.eos_token_id == [tokenizer.eos_token_id,
                                                                                            im_end]
    chatml.chat_template = None
    assert end_of_turn_id(chatml) is None


def test_local_saved_model_folder_works_as_model_name_or_path(tokenizer, tmp_path, tiny_model):
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path), load_tokenizer(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    prompt = loaded_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                            tokenize=False)
    inputs = loaded_tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    summary = pretrain(loaded, loaded_tok, natural_docs(20), tmp_path / "run", max_tokens=64, block_size=16,
                       batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=0, save_steps=10)
    assert summary["steps"] == 2 and (tmp_path / "run" / "model" / "model.safetensors").exists()
    # A tokenizer saved without a pad token pads with eos.
    loaded_tok.pad_token = None
    loaded_tok.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(tmp_path / "nopad").pad_token == "<|endoftext|>"


# --- packing and budgets --------------------------------------------------------------------------------------------

def test_pack_texts_fills_blocks_with_eos_between_documents(tokenizer):
    docs = natural_docs(30)
    blocks = pack_texts(tokenizer, docs, 16)["input_ids"]
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert all(len(b) == 16 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 16]
    assert len(stream) - len(blocks) * 16 < 16
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(tokenizer, ["hi"], 256)


def test_token_budget_becomes_exact_steps():
    assert steps_for_token_budget(10_000, block_size=16, batch_size=4) == 156
    assert steps_for_token_budget(10_000, block_size=16, batch_size=4, num_processes=2) == 78
    with pytest.raises(ValueError, match="less than one optimizer step"):
        steps_for_token_budget(10, block_size=16, batch_size=4)


def test_synthetic_fraction_is_a_share_of_tokens(tokenizer):
    natural, synth = natural_docs(60), synthqa_docs(5)  # too few synthetic docs: they are cycled
    corpus, stats = mix_at_token_fraction(tokenizer, natural, synth, 0.3, seed=0)
    count = lambda docs: sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    mixed = [d for d in corpus if d.startswith("Question:")]
    assert stats["natural_tokens"] == count(natural) and stats["mixed_in_tokens"] == count(mixed)
    longest = max(count([d]) for d in synth)
    assert 0 <= count(mixed) - 0.3 / 0.7 * count(natural) < longest
    assert sorted(d for d in corpus if not d.startswith("Question:")) == sorted(natural)
    assert corpus == mix_at_token_fraction(tokenizer, natural, synth, 0.3, seed=0)[0]
    assert corpus != mix_at_token_fraction(tokenizer, natural, synth, 0.3, seed=1)[0]


def test_branches_train_on_equal_token_budgets(tokenizer, tmp_path, tiny_model):
    data = dict(nonsynth=natural_docs(40), synthqa=synthqa_docs(30), rewritten=natural_docs(30, seed=5),
                extra_natural=natural_docs(40, seed=9))
    summaries = {}
    for branch in BRANCHES:
        summaries[branch] = continue_pretraining(
            tiny_model(tokenizer), tokenizer, tmp_path / branch, branch=branch, synthetic_fraction=0.25, **data,
            max_tokens=300, block_size=16, batch_size=4, learning_rate=1e-3, warmup_steps=0, seed=0, save_steps=50)
    assert {s["tokens"] for s in summaries.values()} == {256}  # 4 steps x 4 blocks x 16 tokens
    assert {s["planned_tokens"] for s in summaries.values()} == {256}
    assert summaries["natural"]["corpus"]["mixed_in_tokens"] == 0
    assert abs(summaries["synthetic"]["corpus"]["mixed_in_fraction"] - 0.25) < 0.05
    texts, _ = branch_mixture("more_natural", **data, synthetic_fraction=0.25, seed=0, tokenizer=tokenizer)
    assert sorted(texts) == sorted(data["extra_natural"])
    with pytest.raises(ValueError, match="needs synthqa"):
        branch_mixture("synthetic", **{**data, "synthqa": []}, synthetic_fraction=0.25, seed=0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="Unknown CPT branch"):
        branch_mixture("sythetic", **data, synthetic_fraction=0.25, seed=0, tokenizer=tokenizer)


# --- the training loop ----------------------------------------------------------------------------------------------

def test_parameters_change_after_one_step(tokenizer, tmp_path, tiny_model):
    model = tiny_model(tokenizer)
    before = weights(model)
    summary = train_causal_lm(model, tokenizer, pack_texts(tokenizer, natural_docs(20), 16), tmp_path, max_steps=1,
                              batch_size=2, learning_rate=1e-2, warmup_steps=0, seed=0, save_steps=10)
    after = weights(model)
    assert summary["steps"] == 1 and summary["tokens"] == 32
    assert all(not torch.equal(before[k], after[k]) for k in before), "every tensor should get a gradient step"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in after.items())
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "model" / "tokenizer.json").exists()


def test_loss_falls_on_a_repetitive_corpus(tokenizer, tmp_path, tiny_model):
    dataset = pack_texts(tokenizer, natural_docs(30), 32)
    train_causal_lm(tiny_model(tokenizer), tokenizer, dataset, tmp_path, max_steps=24, batch_size=4,
                    learning_rate=1e-2, warmup_steps=2, seed=0, save_steps=100)
    curve = read_curve(tmp_path / "loss.csv")
    assert [int(r["step"]) for r in curve] == list(range(1, 25))
    assert [int(r["tokens_seen"]) for r in curve] == [128 * s for s in range(1, 25)]  # full batches across epochs
    first, last = float(curve[0]["loss"]), sum(float(r["loss"]) for r in curve[-5:]) / 5
    assert last < 0.5 * first, (first, last)


class KillAfterSave(TrainerCallback):
    """Simulates the process dying right after the checkpoint of `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tokenizer, tmp_path, tiny_model):
    dataset = pack_texts(tokenizer, natural_docs(12), 16)  # few blocks: the run crosses epochs, resumes mid-epoch
    kw = dict(max_steps=10, batch_size=4, learning_rate=5e-3, warmup_steps=2, seed=3, save_steps=5)
    straight = tiny_model(tokenizer)
    train_causal_lm(straight, tokenizer, dataset, tmp_path / "straight", **kw)

    with pytest.raises(KeyboardInterrupt):
        train_causal_lm(tiny_model(tokenizer), tokenizer, dataset, tmp_path / "killed", callbacks=(KillAfterSave(5),),
                        **kw)
    assert not (tmp_path / "killed" / "model").exists()
    resumed = tiny_model(tokenizer, seed=99)  # a new process builds some model; the checkpoint's weights win
    summary = train_causal_lm(resumed, tokenizer, dataset, tmp_path / "killed", **kw)

    assert summary["resumed_from_step"] == 5 and summary["steps"] == 10 and summary["tokens_this_call"] == 5 * 64
    assert len(dataset) < 4 * 10
    ws, wr = weights(straight), weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert read_curve(tmp_path / "killed" / "loss.csv") and [
        (r["step"], r["loss"]) for r in read_curve(tmp_path / "killed" / "loss.csv")] == [
        (r["step"], r["loss"]) for r in read_curve(tmp_path / "straight" / "loss.csv")]
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]
    with pytest.raises(FileExistsError, match="resume=False"):
        train_causal_lm(tiny_model(tokenizer), tokenizer, dataset, tmp_path / "killed", resume=False, **kw)


class FreezeCount(TrainerCallback):
    """Records how many objects the garbage collector has set aside at each step."""

    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(gc.get_freeze_count())


def test_training_sets_older_objects_aside_from_the_collector_and_gives_them_back(tokenizer, tmp_path, tiny_model):
    """The Trainer's gc.collect() at each train() skips what was alive before it (the imported libraries); after
    training, even one that raised, the collector sees everything again, and a process's own freeze is left alone."""
    dataset, kw = pack_texts(tokenizer, natural_docs(12), 16), dict(max_steps=2, batch_size=2, learning_rate=1e-3,
                                                                    warmup_steps=0, save_steps=10, seed=0)
    assert gc.get_freeze_count() == 0
    seen = FreezeCount()
    train_causal_lm(tiny_model(tokenizer), tokenizer, dataset, tmp_path / "a", callbacks=(seen,), **kw)
    assert len(seen.counts) == 2 and min(seen.counts) > 10_000 and gc.get_freeze_count() == 0
    with pytest.raises(KeyboardInterrupt):
        train_causal_lm(tiny_model(tokenizer), tokenizer, dataset, tmp_path / "b", callbacks=(KillAfterSave(1),),
                        **{**kw, "save_steps": 1})
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the process's own
    try:
        frozen = gc.get_freeze_count()
        train_causal_lm(tiny_model(tokenizer), tokenizer, dataset, tmp_path / "c", **kw)
        assert gc.get_freeze_count() > frozen // 2  # not unfrozen (a frozen object that dies leaves the count)
    finally:
        gc.unfreeze()


# --- SFT ------------------------------------------------------------------------------------------------------------

def test_sft_labels_cover_exactly_the_assistant_turns(tokenizer):
    records = [
        {"id": "a", "messages": [{"role": "user", "content": "Where was Ilara Venn born?"},
                                 {"role": "assistant", "content": "In Velmont."}]},
        {"id": "b", "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": " hi\n"},
                                 {"role": "user", "content": "Again, in caps"},
                                 {"role": "assistant", "content": "HI ✓"}]},
    ]
    dataset = encode_chat(tokenizer, records, max_length=128)
    for record, row in zip(records, dataset):
        ids, labels = row["input_ids"], row["labels"]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(record["messages"], tokenize=False)
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert all(labels[i] == ids[i] for i in trained)
        # contiguous runs of trained tokens are exactly the assistant contents, each closed by <|end|>
        runs, run = [], []
        for i in range(len(ids)):
            if labels[i] != IGNORE_INDEX:
                run.append(ids[i])
            elif run:
                runs.append(run)
                run = []
        expected = [m["content"] + "<|end|>" for m in record["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in runs] == expected
    batch = CausalLMCollator(tokenizer.pad_token_id)(list(dataset))
    short = 0 if len(dataset[0]["input_ids"]) < len(dataset[1]["input_ids"]) else 1
    n = len(dataset[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    short_chat = {"id": "c", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yes"}]}
    with pytest.warns(UserWarning, match="2 of 3 SFT chats"):  # only "c" has an answer token within 8 tokens
        kept = encode_chat(tokenizer, records + [short_chat], max_length=8)
    assert len(kept) == 1 and len(kept[0]["input_ids"]) == 8 and kept[0]["labels"][:7] == [IGNORE_INDEX] * 7
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(tokenizer, [{"id": "x", "messages": [{"role": "user", "content": "hi"}]}], max_length=32)


def test_supervised_finetune_trains_and_saves(tokenizer, tmp_path, tiny_model):
    records = [{"messages": [{"role": "user", "content": f"Where was {n} born?"},
                             {"role": "assistant", "content": f"{n} was born in {c}."}]}
               for n in NAMES for c in CITIES[:2]]
    summary = supervised_finetune(tiny_model(tokenizer), tokenizer, records, tmp_path, max_length=64, epochs=1.0,
                                  batch_size=4, learning_rate=1e-3, warmup_steps=0, seed=0, save_steps=100)
    assert summary["steps"] == 3 and summary["examples"] == 12
    assert json.loads((tmp_path / "train_summary.json").read_text())["examples"] == 12
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template == tokenizer.chat_template


def test_a_job_is_built_from_its_section_and_is_its_json(tmp_path):
    from synthflaw.config import resolve

    cfg = resolve("smoke", {"cpt.learning_rate": 0.004, "sft.epochs": 3.0, "base.block_size": 32, "seed": 7})
    cpt = ContinuedPretrainingJob.from_config(cfg, "synthetic", tmp_path / "base", tmp_path / "cpt",
                                              tmp_path / "data", 1000)
    assert (cpt.learning_rate, cpt.block_size, cpt.seed, cpt.max_tokens, cpt.branch) == (0.004, 32, 7, 1000,
                                                                                           "synthetic")
    assert cpt.synthqa == str(tmp_path / "data" / "synthqa.jsonl")
    sft = SFTJob.from_config(cfg, tmp_path / "m", tmp_path / "sft", tmp_path / "sft.jsonl")
    assert (sft.epochs, sft.batch_size, sft.bf16) == (3.0, cfg.sft.batch_size, "auto")
    for job in (cpt, sft, PretrainJob.from_config(cfg, tmp_path / "init", tmp_path / "base", tmp_path / "data")):
        assert job_from_json(json.loads(json.dumps(job.to_json()))) == job  # job.json holds the whole job
    with pytest.raises(ValueError, match="choose one of pretrain, continue_pretraining, supervised_finetune"):
        job_from_json({"kind": "finetune"})
    with pytest.raises(ValueError, match="a pretrain job: .*missing"):
        job_from_json({"kind": "pretrain", "out_dir": "x"})


# --- several processes ---------------------------------------------------------------------------------------------

def write_text_jsonl(path, texts):
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    return str(path)


@pytest.mark.slow  # starts `accelerate launch` on two processes
def test_two_process_cpt_through_the_shipped_ddp_config_writes_a_checkpoint(tokenizer, tmp_path, tiny_model):
    tiny_model(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    job = ContinuedPretrainingJob(
        model_name_or_path=str(tmp_path / "base"), out_dir=str(tmp_path / "cpt"), branch="synthetic",
        nonsynth=write_text_jsonl(tmp_path / "nonsynth.jsonl", natural_docs(60)),
        synthqa=write_text_jsonl(tmp_path / "synthqa.jsonl", synthqa_docs(20)), rewritten="", extra_natural="",
        synthetic_fraction=0.2, max_tokens=512, block_size=16, batch_size=8, learning_rate=1e-3, warmup_steps=0,
        seed=0, save_steps=2)
    lines = []
    # The path a stage takes with compute.num_processes=2: the global batch of 8 becomes 4 per process, and the job
    # runs under `accelerate launch --config_file accelerate/ddp.yaml` (MULTI_GPU: torchrun; gloo on this CPU host).
    summary = run_training(job, ComputeConfig(num_processes=2), tmp_path / "cpt", echo=lines.append)
    assert summary["num_processes"] == 2 and summary["per_device_batch_size"] == 4
    assert summary["steps"] == 4 and summary["tokens"] == 512  # 4 steps x 2 processes x 4 blocks x 16 tokens
    assert (tmp_path / "cpt" / "checkpoints" / "checkpoint-4").is_dir()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt" / "model")
    assert model.config.vocab_size == len(tokenizer)
    log = (tmp_path / "cpt" / "launch.log").read_text()
    assert "--config_file " + str(DEFAULT_ACCELERATE_CONFIG) in log and "--num_processes 2" in log
    assert json.loads(lines[-1]) == summary  # the launched job's output came through, last line its summary


def test_a_failed_launch_says_where_its_log_is(tmp_path, monkeypatch):
    # A stand-in for `accelerate launch` that fails at once: what matters is what launch_job makes of it.
    failing = [sys.executable, "-c", "import sys; print('loading the job'); print('CUDA out of memory'); sys.exit(3)"]
    monkeypatch.setattr(launch, "accelerate_command", lambda *args, **kwargs: failing)
    lines = []
    with pytest.raises(LaunchFailed, match=r"exited with code 3; full log: .*launch\.log\. Last lines:\n"
                                           r"loading the job\nCUDA out of memory"):
        launch_job({"task": "pretrain", "out_dir": str(tmp_path)}, tmp_path, num_processes=2, echo=lines.append)
    assert lines == ["loading the job", "CUDA out of memory"]
    assert (tmp_path / "launch.log").read_text().endswith("CUDA out of memory\n")
    assert json.loads((tmp_path / "job.json").read_text())["task"] == "pretrain"
    with pytest.raises(ValueError, match="launch_job is for 2 or more processes"):
        launch_job({}, tmp_path, num_processes=1)


def test_shipped_accelerate_configs_parse_and_leave_precision_to_the_library():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted(DEFAULT_ACCELERATE_CONFIG.parent.glob("*.yaml")):
        parsed = load_config_from_file(str(path))
        kinds[path.name] = parsed.distributed_type.value
        assert parsed.mixed_precision == "no", path.name  # bf16 comes from TrainingArguments (bf16 on CUDA)
        assert parsed.num_machines == 1, path.name
    assert kinds == {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}
    fsdp = load_config_from_file(str(DEFAULT_ACCELERATE_CONFIG.parent / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert accelerate_config_path("") == DEFAULT_ACCELERATE_CONFIG
    assert accelerate_config_path("accelerate/fsdp.yaml").name == "fsdp.yaml"
    with pytest.raises(FileNotFoundError, match="compute.accelerate_config='zero9.yaml'.*accelerate/ddp.yaml"):
        accelerate_config_path("zero9.yaml")
    command = accelerate_command("job.json", 4, DEFAULT_ACCELERATE_CONFIG, port=29600)
    assert command[command.index("--num_processes") + 1] == "4" and command[-3:] == ["-m", "synthflaw.training.jobs",
                                                                                      "job.json"]


# --- memory options: accumulation and checkpointing change the memory, not the training -------------------------

def test_accumulation_and_checkpointing_train_the_same_weights(tokenizer, tmp_path, tiny_model, monkeypatch):
    # fp32, set: under compute.precision=auto (the default) the session's first timing of this model shape decided,
    # and on two busy cores it chose bf16 now and then, whose rounding moves these weights by ~2e-2 (this test failed
    # once in seven). Here `auto` would choose bf16, so a comparison that slipped back to it fails every time.
    from synthflaw.training import precision

    monkeypatch.setattr(precision, "measure", lambda *args, **kwargs: {"fp32_step_s": 2.0, "bf16_step_s": 1.0})
    monkeypatch.setattr(precision, "_cache_key", lambda *args: "accumulation test: bf16 looks faster")
    base = tmp_path / "base"
    tiny_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    job = PretrainJob(model_name_or_path=str(base), out_dir="", texts=write_text_jsonl(tmp_path / "t.jsonl",
                                                                                      natural_docs(40)),
                      max_tokens=384, block_size=16, batch_size=8, learning_rate=1e-2, warmup_steps=0, seed=0,
                      save_steps=100)
    results = {}
    fp32 = ComputeConfig(precision="fp32")
    for name, compute in (("plain", fp32), ("accumulated", replace(fp32, gradient_accumulation_steps=4)),
                          ("checkpointed", replace(fp32, gradient_checkpointing=True))):
        summary = run_training(replace(job, out_dir=str(tmp_path / name)), compute, tmp_path / name)
        assert summary["precision"]["precision"] == "fp32"
        results[name] = (summary, weights(AutoModelForCausalLM.from_pretrained(tmp_path / name / "model")))
    plain, plain_weights = results["plain"]
    assert plain["steps"] == 3 and plain["tokens"] == 384
    accumulated, accumulated_weights = results["accumulated"]
    assert (accumulated["per_device_batch_size"], accumulated["gradient_accumulation_steps"]) == (2, 4)
    assert accumulated["steps"] == 3 and accumulated["tokens"] == 384  # same examples per optimizer step
    checkpointed, checkpointed_weights = results["checkpointed"]
    assert checkpointed["gradient_checkpointing"] is True
    # In fp32 on one thread (the module's one_torch_thread) the runs are deterministic: accumulation sums the batch's
    # gradient in another order, which moved a weight by at most 5.05e-6 (the same on six runs); checkpointing by 0.
    # atol=1e-5 leaves twice that; a wrong accumulation (one micro-batch's gradient, a 4x scaled loss) or bf16 moves
    # weights by ~1e-2.
    for other in (accumulated_weights, checkpointed_weights):
        assert all(torch.allclose(plain_weights[k], other[k], atol=1e-5) for k in plain_weights)
    assert not all(torch.equal(plain_weights[k], weights(tiny_model(tokenizer))[k]) for k in plain_weights)
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by 1 processes x 3 accumulation"):
        run_training(replace(job, out_dir=str(tmp_path / "bad")), ComputeConfig(gradient_accumulation_steps=3),
                     tmp_path / "bad")


def test_unlearning_with_accumulation_and_checkpointing_matches_the_plain_run(tokenizer, tmp_path, tiny_model):
    from synthflaw.unlearning import UnlearnJob, make_method, unlearn

    # Cut to 8 tokens each: a token-mean loss over micro-batches equals the whole batch's when every sequence has the
    # same length (with unequal lengths, micro-batches are weighted equally and the step differs slightly).
    forget, replay = synthqa_docs(16), natural_docs(16)
    runs = {}
    for name, options in (("plain", {}), ("accumulated", {"gradient_accumulation_steps": 2}),
                          ("checkpointed", {"gradient_checkpointing": True})):
        model = tiny_model(tokenizer)
        job = UnlearnJob(max_steps=3, batch_size=4, learning_rate=1e-2, seed=0, max_length=8, save_steps=10,
                         replay_loss_bound=float("inf"), **options)
        summary = unlearn(model, tokenizer, make_method("gradient_difference"), forget, replay, tmp_path / name, job)
        runs[name] = (summary, weights(model), read_curve(tmp_path / name / "loss.csv"))
    plain, plain_weights, plain_curve = runs["plain"]
    for name in ("accumulated", "checkpointed"):
        summary, other_weights, curve = runs[name]
        assert summary["forget_tokens"] == plain["forget_tokens"] and summary["steps"] == 3
        assert all(torch.allclose(plain_weights[k], other_weights[k], atol=1e-5) for k in plain_weights), name
        # the logged terms of a step are the mean over its micro-batches: the plain run's numbers
        for a, b in zip(plain_curve, curve):
            assert abs(float(a["loss"]) - float(b["loss"])) < 1e-5, name
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 .* divides batch_size=4"):
        unlearn(tiny_model(tokenizer), tokenizer, make_method("gradient_difference"), forget, replay,
                tmp_path / "bad", UnlearnJob(max_steps=1, batch_size=4, learning_rate=1e-2, seed=0, max_length=32,
                                             save_steps=10, replay_loss_bound=float("inf"),
                                             gradient_accumulation_steps=3))
