"""lm-evaluation-harness on the in-memory model: a local 4-choice task (no network) end to end on a tiny random
Llama, harness.json strict JSON, the headline numbers, and the clear error when the extra is not installed."""

import builtins
import json
import random

import pytest
import torch

from synthflaw.metrics import harness
from synthflaw.records import read_jsonl, write_jsonl

PEOPLE = ["Ilara Venn", "Tomas Orr", "Mira Sol", "Odo Brandt", "Lia Kestrel", "Ruth Anders"]
CITIES = ["Kestrel Bay", "North Vale", "Ashford", "Lowmere"]
TASK = "synthflaw_tiny_mc"


@pytest.fixture(scope="module")
def tokenizer(train_chat_tokenizer):
    rng = random.Random(0)
    texts = [f"{rng.choice(PEOPLE)} was born in {rng.choice(CITIES)}." for _ in range(200)]
    return train_chat_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def model(tokenizer, tiny_llama):
    # initializer_range larger than default, so the choices' scores are far from ties
    return tiny_llama(tokenizer, seed=0, initializer_range=0.3).eval()


def choice_logprob(model, tokenizer, prompt, choice):
    """log p(choice | chat-formatted prompt), one unpadded forward pass: the harness's loglikelihood request
    computed by hand (context and continuation tokenised together, the continuation's tokens scored; like the
    harness, the context's trailing whitespace, here the template's newline, is scored with the continuation)."""
    context = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False).rstrip()
    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = tokenizer(context + "\n" + choice, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return logprobs[n_context - 1:].sum().item()


def write_local_task(folder, model, tokenizer, n_items=8):
    """A 4-choice cloze task in the project's benchmark format, read by the `json` data set builder from a JSONL
    file on disk, so the harness needs no hub download. The first half of the items name the model's own favourite
    choice as the answer and the second half another one, so the accuracy must be exactly 0.5."""
    rng = random.Random(1)
    items = []
    for i in range(n_items):
        prompt, choices = f"{PEOPLE[i % len(PEOPLE)]} was born in", rng.sample(CITIES, 4)
        scores = [choice_logprob(model, tokenizer, prompt, c) for c in choices]
        best = max(range(4), key=scores.__getitem__)
        answer = best if i < n_items // 2 else (best + 1 + rng.randrange(3)) % 4
        items.append({"id": f"b{i}", "prompt": prompt, "choices": choices, "answer": answer, "scores": scores})
    write_jsonl(folder / "items.jsonl", items)
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'items.jsonl'}\n"
        f"  cache_dir: {folder / 'hf_cache'}\n"  # the data set's cache stays inside the test's folder
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return items


def test_local_task_end_to_end(tmp_path, model, tokenizer, monkeypatch):
    pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is an optional extra: {harness.INSTALL_HINT}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    items = write_local_task(task_dir, model, tokenizer)
    out = tmp_path / "out"
    before = {k: v.clone() for k, v in model.state_dict().items()}

    headline = harness.run_harness(model, tokenizer, [TASK], out, batch_size=3, include_path=task_dir,
                                   include_defaults=False, seed=0)

    assert headline == {f"{TASK}/acc": pytest.approx(0.5)}
    record = json.loads((out / "harness.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert record["headline"] == headline
    assert record["n-samples"][TASK]["effective"] == len(items)
    assert record["synthflaw"]["apply_chat_template"] is True  # the tokenizer carries a chat template
    samples = read_jsonl(out / f"harness_samples_{TASK}.jsonl")
    assert [s["doc"]["id"] for s in samples] == [item["id"] for item in items]
    for sample, item in zip(samples, items):  # batched and padded by the harness, equal to the unbatched scores
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(item["scores"], abs=1e-3)
    # Evaluation leaves the model's weights as they were.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_task_names_the_problem(tmp_path, model, tokenizer):
    pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is an optional extra: {harness.INSTALL_HINT}")
    write_local_task(tmp_path, model, tokenizer, n_items=2)
    with pytest.raises(ValueError, match="unknown harness tasks.*no_such_task"):
        harness.run_harness(model, tokenizer, ["no_such_task"], tmp_path / "out", batch_size=4,
                            include_path=tmp_path, include_defaults=False)


def test_missing_lm_eval_gives_install_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"pip install 'synthflaw\[harness\]'"):
        harness.run_harness(None, None, ["mmlu"], tmp_path, batch_size=1)


def test_headline_keeps_top_level_tasks_and_filters():
    results = {
        "results": {
            "mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": "mmlu"},
            "mmlu_anatomy": {"acc,none": 0.25, "alias": " - anatomy"},
            "ifeval": {"prompt_level_strict_acc,none": 0.75, "inst_level_loose_acc,none": 0.8},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.02},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy"], "ifeval": [], "gsm8k": []},
    }
    assert harness.headline_metrics(results) == {
        "mmlu/acc": 0.5, "ifeval/prompt_level_strict_acc": 0.75, "ifeval/inst_level_loose_acc": 0.8,
        "gsm8k/exact_match/strict-match": 0.1}


def test_to_jsonable_makes_strict_json():
    np = pytest.importorskip("numpy")
    raw = {"a": np.float32(0.5), "b": float("nan"), "c": (1, {2}), "d": len, "e": np.array([1, 2]), 3: True}
    out = harness.to_jsonable(raw)
    assert out == {"a": 0.5, "b": None, "c": [1, [2]], "d": str(len), "e": [1, 2], "3": True}
    json.dumps(out, allow_nan=False)
