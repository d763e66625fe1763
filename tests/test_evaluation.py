"""Stage 07 evaluation (synthflaw.metrics.evaluation, .benchmark, .instruction_following, .chat, .shift and
synthflaw.models.generation, .chat_client): metric arithmetic on hand-built inputs, batched paths equal to unbatched
ones on a tiny random model, the judges (a saved tiny local model, an OpenAI-style server on 127.0.0.1), and
evaluate_model's files."""

import http.server
import json
import math
import random
import threading

import numpy as np
import pytest
import torch

from synthflaw import config
from synthflaw.data.embedded import build_embedded
from synthflaw.data.schema import SYNTHQA_TEMPLATES
from synthflaw.metrics import benchmark, chat, evaluation, instruction_following, shift
from synthflaw.metrics.chat import RatingJudge, judge_prompt, parse_rating
from synthflaw.metrics.text import distinct_n, words
from synthflaw.models import generation
from synthflaw.models import tokenizer as tokenizer_mod
from synthflaw.models.chat_client import EndpointChat, LocalChat
from synthflaw.records import read_jsonl

WORDS = ("the city of river mountain was born in founded by works at Ilara Venn Tomas Orr Kestrel Bay north "
         "south council library answer question please write a short list of three facts about its people "
         "JSON bullet end with start quote keyword").split()
MARKERS = ["Question:", "Answer:"]
PROMPTS = ["Write a short note about the city.", "List three facts.", "Who founded the library of Kestrel Bay?",
           "Please answer in JSON.", "hi", "Describe the river and the mountain north of the city in detail."]


@pytest.fixture(scope="module")
def tokenizer(train_chat_tokenizer):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    texts += ["Question: Where was Ilara Venn born?\nAnswer: Kestrel Bay."] * 20
    return train_chat_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    """tiny_model(tokenizer, seed): the tiny Llama in eval mode, with initializer_range larger than default, so
    greedy choices are far from ties."""
    return lambda tokenizer, seed: tiny_llama(tokenizer, seed, initializer_range=0.3).eval()


@pytest.fixture(scope="module")
def model(tokenizer, tiny_model):
    return tiny_model(tokenizer, seed=0)


# ---------------------------------------------------------------- benchmark

def manual_logprob(model, ids, n_scored):
    """Sum of the log-probabilities of the last `n_scored` tokens of `ids`, one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return logprobs[-n_scored:].sum().item()


def test_score_choices_batched_equals_unbatched_and_manual(model, tokenizer):
    prompts = ["Ilara Venn was born in", "The library was founded by", "Kestrel"]
    choices = [["Kestrel Bay", "the city", "a river", "north"], ["Tomas Orr", "Ilara", "the council of the city", "x"],
               ["Bay", "south", "mountain", "works"]]
    batched = benchmark.score_choices(model, tokenizer, prompts, choices, batch_size=5)
    single = benchmark.score_choices(model, tokenizer, prompts, choices, batch_size=1)
    for row_b, row_s, options, prompt in zip(batched, single, choices, prompts):
        for (lp_b, n_b, c_b), (lp_s, n_s, c_s), choice in zip(row_b, row_s, options):
            assert lp_b == pytest.approx(lp_s, abs=1e-4)
            assert (n_b, c_b) == (n_s, c_s) == (len(tokenizer(" " + choice)["input_ids"]), len(choice))
            ids = [tokenizer.eos_token_id] + tokenizer(prompt + " " + choice)["input_ids"]
            assert lp_b == pytest.approx(manual_logprob(model, ids, n_b), abs=1e-4)
            assert lp_b < 0


def test_benchmark_metrics_on_hand_built_scores():
    records = [
        {"id": "a", "choices": ["x", "yyyyyyyyyy"], "answer": 0, "split": "stated"},   # acc right, norm wrong
        {"id": "b", "choices": ["x", "yyyyyyyyyy"], "answer": 1, "split": "stated"},   # acc wrong, norm right
        {"id": "c", "choices": ["p", "q"], "answer": 1, "split": "synthqa_only"},      # both right
        {"id": "d", "choices": ["p", "q"], "answer": 0, "split": "synthqa_only"},      # both wrong
        {"id": "e", "choices": ["p", "q"], "answer": 0, "split": "synthqa_only"},      # both right
    ]
    scores = [[(-2.0, 1, 1), (-5.0, 3, 10)], [(-2.0, 1, 1), (-5.0, 3, 10)], [(-3.0, 1, 1), (-1.0, 1, 1)],
              [(-3.0, 1, 1), (-1.0, 1, 1)], [(-1.0, 1, 1), (-3.0, 1, 1)]]
    metrics = benchmark.benchmark_metrics(records, scores)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["acc_norm"] == pytest.approx(3 / 5)
    assert metrics["count"] == 5
    assert metrics["by_split"]["stated"] == {"accuracy": 0.5, "acc_norm": 0.5, "count": 2}
    assert metrics["by_split"]["synthqa_only"] == {"accuracy": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3),
                                                   "count": 3}
    only_stated = benchmark.benchmark_metrics(records[:1], scores[:1])
    assert only_stated["by_split"]["synthqa_only"] == {"accuracy": None, "acc_norm": None, "count": 0}
    with pytest.raises(ValueError, match="score lists"):
        benchmark.benchmark_metrics(records, scores[:2])
    with pytest.raises(ValueError, match="not an index"):
        benchmark.benchmark_metrics([{**records[0], "answer": 4}], scores[:1])


# ---------------------------------------------------------------- generation

def test_batched_generation_equals_one_prompt_at_a_time(model, tokenizer):
    batched = generation.generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    single = [generation.generate_responses(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1, "a random model should answer different prompts differently"
    assert not any("<|" in r for r in batched), "special tokens must be decoded away"


def test_generation_stops_at_end_of_turn_with_kv_cache(model, tokenizer):
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    embedded_lengths, steps = [], []

    def force_end_on_fourth_token(module, inputs, output):
        steps.append(1)
        if len(steps) == 4:  # the prefill gives token 1, decoding steps give tokens 2, 3, 4
            output = output.clone()
            output[:, -1, end_id] = 1e4
        return output

    hooks = [model.lm_head.register_forward_hook(force_end_on_fourth_token),
             model.model.embed_tokens.register_forward_hook(lambda m, i, o: embedded_lengths.append(i[0].shape[1]))]
    try:
        texts = [tokenizer_mod.chat_text(tokenizer, p) for p in PROMPTS[:3]]
        ids, generated = generation.generate_ids(model, tokenizer, texts, 20, 3)
    finally:
        for hook in hooks:
            hook.remove()
    assert embedded_lengths[0] > 1 and embedded_lengths[1:] == [1, 1, 1], "a prefill, then single-token steps"
    assert [len(r) for r in ids] == [3, 3, 3] and generated == [4, 4, 4]


def test_a_row_that_stopped_leaves_the_batch_and_the_others_generate_as_alone(model, tokenizer):
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    texts = [tokenizer_mod.chat_text(tokenizer, p) for p in PROMPTS[:3]]
    alone = [generation.generate_ids(model, tokenizer, [t], 6, 1)[0][0] for t in texts]
    first_row = generation.longest_first([len(tokenizer_mod.encode(tokenizer, t)) for t in texts])[0]
    batch_rows, calls = [], []

    def end_the_first_row_at_its_second_token(module, inputs, output):
        calls.append(1)
        batch_rows.append(output.shape[0])
        if len(calls) == 2:  # the prefill gives token 1, the first decoding step token 2
            output = output.clone()
            output[0, -1, end_id] = 1e4
        return output

    hook = model.lm_head.register_forward_hook(end_the_first_row_at_its_second_token)
    try:
        ids, generated = generation.generate_ids(model, tokenizer, texts, 6, 3)
    finally:
        hook.remove()
    assert batch_rows == [3, 3, 2, 2, 2, 2], "the stopped row is not computed after its stop token"
    assert generated[first_row] == 2 and ids[first_row] == alone[first_row][:1]
    others = [i for i in range(3) if i != first_row]
    assert [ids[i] for i in others] == [alone[i] for i in others]


def test_generation_speed_reports_both_paths(model, tokenizer):
    speed = generation.generation_speed(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=6)
    assert speed["identical_responses"] is True
    assert speed["batched_new_tokens"] == speed["sequential_new_tokens"] > 0
    assert speed["speedup"] == pytest.approx(speed["batched_tokens_per_s"] / speed["sequential_tokens_per_s"])
    assert speed["batched_seconds"] > 0 and speed["sequential_seconds"] > 0


# ---------------------------------------------------------------- instruction following

def test_instruction_following_arithmetic(monkeypatch):
    verdicts = {"r1": [True], "r2": [True, False], "r3": [False, False, True], "r4": [True, True, True]}
    monkeypatch.setattr(instruction_following, "check_response", lambda response, constraints: verdicts[response])
    monkeypatch.setattr(instruction_following, "check_response_loose", lambda response, constraints: [True] * len(constraints))
    items = [{"id": i, "level": level, "constraints": [{"type": "t", "args": {}}] * n}
             for i, (level, n) in enumerate([(1, 1), (2, 2), (3, 3), (3, 3)])]
    metrics, per_item = instruction_following.instruction_following(items, ["r1", "r2", "r3", "r4"])
    assert metrics["hard_satisfaction_rate"] == pytest.approx(2 / 4)
    assert metrics["soft_satisfaction_rate"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    assert metrics["hsr_by_level"] == {"1": 1.0, "2": 0.0, "3": 0.5}
    assert metrics["ssr_by_level"] == pytest.approx({"1": 1.0, "2": 0.5, "3": (1 / 3 + 1) / 2})
    assert metrics["ifeval_prompt_strict"] == metrics["hard_satisfaction_rate"]
    assert metrics["ifeval_instruction_strict"] == pytest.approx(6 / 9)
    assert metrics["ifeval_prompt_loose"] == metrics["ifeval_instruction_loose"] == 1.0
    assert per_item[1] == {"strict": [True, False], "loose": [True, True]}
    with pytest.raises(ValueError, match="responses"):
        instruction_following.instruction_following(items, ["r1"])


# ---------------------------------------------------------------- chat quality

def test_reference_chat_scores_are_ten_times_rouge_l_f1():
    references = ["The cat sat on the mat.", "Paris is the capital.", "one two three"]
    responses = ["the CAT, on mat", "Paris is the capital!", "four five"]
    scores = chat.reference_chat_scores(responses, references)
    # LCS("the cat on mat", "the cat sat on the mat") = 4: P = 4/4, R = 4/6, F1 = 0.8
    assert scores == pytest.approx([8.0, 10.0, 0.0])
    assert chat.reference_chat_scores([""], ["a reference"]) == [0.0]
    with pytest.raises(ValueError, match="reference"):
        chat.reference_chat_scores(["x"], ["  "])


# ---------------------------------------------------------------- output-distribution shift

def test_perplexities_batched_equals_unbatched_and_manual(model, tokenizer):
    texts = ["the city of river", "Ilara Venn was born in Kestrel Bay north of the mountain", "hi"]
    batched = shift.perplexities(model, tokenizer, texts, batch_size=3)
    single = np.array([shift.perplexities(model, tokenizer, [t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(batched, single, rtol=1e-4)
    for text, ppl in zip(texts, batched):
        ids = [tokenizer.eos_token_id] + tokenizer(text)["input_ids"]
        n = len(ids) - 1
        assert ppl == pytest.approx(math.exp(-manual_logprob(model, ids, n) / n), rel=1e-4)
    # as responses to chat prompts: only the response's tokens count
    responses = shift.perplexities(model, tokenizer, texts, batch_size=2, contexts=PROMPTS[:3])
    prompt_ids = tokenizer(tokenizer_mod.chat_text(tokenizer, PROMPTS[0]))["input_ids"]
    text_ids = tokenizer(texts[0])["input_ids"]
    expected = math.exp(-manual_logprob(model, prompt_ids + text_ids, len(text_ids)) / len(text_ids))
    assert responses[0] == pytest.approx(expected, rel=1e-4)
    cut = shift.perplexities(model, tokenizer, texts[1:2], batch_size=1, max_length=4)
    ids = [tokenizer.eos_token_id] + tokenizer(texts[1])["input_ids"][:3]
    assert cut[0] == pytest.approx(math.exp(-manual_logprob(model, ids, 3) / 3), rel=1e-4)


def test_perplexity_summary():
    assert shift.perplexity_summary([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": pytest.approx(math.sqrt(14 / 3)),
                                                            "median": 2.0}
    with pytest.raises(ValueError):
        shift.perplexity_summary([])


def test_leakage_distinct_n_and_length():
    responses = ["Question: where?\nAnswer: here", "plain prose answer: here", "the the the the", "Answer: yes"]
    assert shift.template_leakage_rate(responses, MARKERS) == 0.5
    assert distinct_n(map(words, ["the the the the"]), 1) == 0.25
    assert distinct_n(map(words, ["a b c", "a b d"]), 2) == pytest.approx(3 / 4)
    assert distinct_n(map(words, ["one"]), 2) == 0.0
    assert shift.mean_response_words(["a b c", "d"]) == 2.0
    with pytest.raises(ValueError, match="markers"):
        shift.template_leakage_rate(responses, [])


def test_next_token_kl(model, tokenizer, tiny_model):
    assert shift.next_token_kl(model, model, tokenizer, PROMPTS, batch_size=4) == pytest.approx(0.0, abs=1e-6)
    other = tiny_model(tokenizer, seed=1)
    kl = shift.next_token_kl(model, other, tokenizer, PROMPTS, batch_size=4)
    kl_single = np.mean([shift.next_token_kl(model, other, tokenizer, [p], batch_size=1) for p in PROMPTS])
    assert kl > 0 and kl == pytest.approx(kl_single, rel=1e-4)
    with torch.no_grad():  # direct computation for one prompt, at the position after "<|assistant|>\n"
        ids = torch.tensor([tokenizer(tokenizer_mod.chat_text(tokenizer, PROMPTS[0]))["input_ids"]])
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
        log_q = torch.log_softmax(other(input_ids=ids).logits[0, -1], -1)
    direct = float((log_p.exp() * (log_p - log_q)).sum())
    assert shift.next_token_kl(model, other, tokenizer, PROMPTS[:1], 1) == pytest.approx(direct, rel=1e-4)


# ---------------------------------------------------------------- judges

@pytest.mark.parametrize("text, expected", [
    ("Good answer. Rating: [[7]]", 7.0), ("Rating: [[10]]", 10.0), ("Rating: [[ 3.5 ]]", 3.5),
    ("format like [[5]] ... my verdict: Rating: [[2]]", 2.0), ("Rating: 7", None), ("Rating: [[0]]", None),
    ("Rating: [[11]]", None), ("", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_local_judge_runs_a_saved_model_and_counts_unparseable(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    judge = RatingJudge(LocalChat(str(tmp_path / "judge"), max_new_tokens=6, device="cpu"))
    scores = [judge("Where was Ilara born?", "In Kestrel Bay.", response) for response in ("Kestrel Bay", "no idea")]
    # a template that refuses a system turn (as the embedded one does): the system prompt joins the user turn
    judge.client.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                     "{{ raise_exception('no system role') }}{% endif %}"
                                     "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
                                     "{{ '<|assistant|>\\n' }}")
    scores.append(judge("q", "r", "a"))
    assert judge.calls == 3
    assert judge.unparseable == sum(s is None for s in scores)
    assert all(s is None or 1 <= s <= 10 for s in scores)


class _ChatServer(http.server.BaseHTTPRequestHandler):
    requests: list = []
    replies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                    "body": body})
        status, content = type(self).replies.pop(0)
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}]}
                             if status == 200 else {"error": {"message": content}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _ChatServer.requests, _ChatServer.replies = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _ChatServer
    server.shutdown()
    server.server_close()


def test_openai_compatible_judge_over_http(chat_server, monkeypatch):
    base_url, handler = chat_server
    monkeypatch.setenv("SYNTHFLAW_TEST_KEY", "sk-test-secret")
    judge = RatingJudge(EndpointChat(base_url, "judge-model", "SYNTHFLAW_TEST_KEY", 512))
    handler.replies += [(200, "Close to the reference. Rating: [[7]]"), (200, "I cannot rate this."),
                        (400, "bad request")]
    assert judge("Where was Ilara born?", "In Kestrel Bay.", "Kestrel Bay") == 7.0
    assert judge("q", "r", "a") is None
    assert (judge.calls, judge.unparseable) == (2, 1)
    first = handler.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["authorization"] == "Bearer sk-test-secret"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    assert first["body"]["messages"][-1]["content"] == judge_prompt("Where was Ilara born?", "In Kestrel Bay.",
                                                                    "Kestrel Bay")
    assert "sk-test-secret" not in repr(judge) + repr(vars(judge))
    with pytest.raises(RuntimeError, match="HTTP 400") as error:
        judge("q", "r", "a")
    assert "sk-test-secret" not in str(error.value)
    monkeypatch.delenv("SYNTHFLAW_TEST_KEY")
    with pytest.raises(RuntimeError, match="SYNTHFLAW_TEST_KEY"):  # a missing key fails when the client is built
        EndpointChat("https://api.example.com/v1", "judge-model", "SYNTHFLAW_TEST_KEY", 512)


# ---------------------------------------------------------------- evaluate_model

def evaluate(model, tokenizer, data_dir, limit=None, **kwargs):
    return evaluation.evaluate_model(model, tokenizer, evaluation.load_eval_data(data_dir, limit),
                                     template=SYNTHQA_TEMPLATES[0], **kwargs)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


BASE_RESPONSES = ["Ilara Venn was born in Kestrel Bay. She works at the library. The city is north of the river.",
                  "The council founded the library long ago. Many people visit it. It holds old maps of the coast."]


def suite_items(n_per_level=2, levels=(1, 2, 3, 4, 5)):
    from synthflaw.data.constraints import sample_constraints

    rng = random.Random(0)
    items = []
    for level in levels:
        for k in range(n_per_level):
            base = BASE_RESPONSES[k % len(BASE_RESPONSES)]
            items.append({"id": f"s{level}-{k}", "prompt": f"Tell me about Ilara Venn (level {level}).",
                          "level": level, "constraints": sample_constraints(rng, base, level),
                          "base_id": k, "provenance": {"seed": 0}, "base": base})
    return items


def test_synthqa_template_outputs_follow_fewer_constraints_and_leak_more():
    from synthflaw.data.constraints import compose

    items = suite_items()
    following = [compose(item["base"], item["constraints"]) for item in items]
    templated = [f"Question: {item['prompt']}\nAnswer: {item['base']}" for item in items]
    good, good_verdicts = instruction_following.instruction_following(items, following)
    bad, _ = instruction_following.instruction_following(items, templated)
    assert good["hard_satisfaction_rate"] == 1.0 and all(all(v["strict"]) for v in good_verdicts)
    assert bad["hard_satisfaction_rate"] < good["hard_satisfaction_rate"]
    assert bad["soft_satisfaction_rate"] < good["soft_satisfaction_rate"]
    assert bad["ifeval_instruction_strict"] < good["ifeval_instruction_strict"]
    assert set(good["hsr_by_level"]) == {"1", "2", "3", "4", "5"}
    assert all(bad["hsr_by_level"][k] <= good["hsr_by_level"][k] for k in good["hsr_by_level"])
    assert shift.template_leakage_rate(templated, MARKERS) == 1.0
    assert shift.template_leakage_rate(following, MARKERS) == 0.0


REQUIRED_KEYS = {"benchmark_accuracy", "benchmark_accuracy_by_split", "hard_satisfaction_rate", "hsr_by_level",
                 "soft_satisfaction_rate", "ifeval_prompt_strict", "ifeval_instruction_strict", "chat_score",
                 "perplexity", "perplexity_reference", "template_leakage_rate", "response_words", "distinct_2",
                 "next_token_kl", "learnable_hard_satisfaction_rate", "learnable_hsr_above_null", "compliance_margin",
                 "compliance_margin_null", "template_pull", "chat_preference", "chat_rouge_l", "nulls"}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "benchmark.jsonl", [
        {"id": f"b{i}", "question": "Where was Ilara Venn born?", "prompt": prompt,
         "choices": ["Kestrel Bay", "the city", "a river", "north"], "answer": i % 4, "split": split,
         "provenance": {"fact_id": i}}
        for i, (prompt, split) in enumerate([("Ilara Venn was born in", "stated"), ("Tomas Orr works at", "stated"),
                                             ("The library was founded by", "synthqa_only")])])
    smoke = build_embedded(config.resolve("smoke").data, 0)
    write_jsonl(folder / "learnable_suite.jsonl", smoke["learnable_suite"][:3])
    write_jsonl(folder / "instruction_suite.jsonl",
                [{k: v for k, v in item.items() if k != "base"} for item in suite_items(1, (1, 2, 3))])
    write_jsonl(folder / "chat.jsonl", [
        {"id": "c0", "prompt": "Who is Ilara Venn?", "reference": "Ilara Venn is a person born in Kestrel Bay.",
         "provenance": {}},
        {"id": "c1", "prompt": "Describe the river.", "reference": "The river runs north of the city.",
         "provenance": {}}])
    write_jsonl(folder / "heldout_nonsynth.jsonl", [
        {"id": f"h{i}", "text": text, "provenance": {}}
        for i, text in enumerate(["The city of Kestrel Bay lies on the coast.", "Tomas Orr works at the council.",
                                  "north south mountain river " * 80])])  # longer than 256 positions: cut to fit
    return folder


def test_evaluate_model_gives_metrics_samples_and_perplexities(model, tokenizer, data_dir, tiny_model):
    judged = iter([6.0, None])
    result = evaluate(model, tokenizer, data_dir, reference_model=tiny_model(tokenizer, 1), markers=MARKERS,
                      max_new_tokens=6, batch_size=4, judge=lambda question, reference, response: next(judged),
                      speed_prompts=2)
    metrics = result.metrics
    assert REQUIRED_KEYS <= set(metrics)
    assert set(metrics["benchmark_accuracy_by_split"]) == {"stated", "synthqa_only"}
    assert set(metrics["hsr_by_level"]) == {"1", "2", "3"}
    assert set(metrics["perplexity"]) == set(metrics["perplexity_reference"]) == {"mean", "std", "median"}
    assert metrics["next_token_kl"] > 0
    assert 0 <= metrics["chat_score"] <= 10
    assert (metrics["chat_judge_score"], metrics["chat_judge_unparseable"]) == (6.0, 1)
    assert metrics["generation_speed"]["identical_responses"] is True
    samples = result.samples
    assert [s["task"] for s in samples] == ["benchmark"] * 3 + ["learnable"] * 3 + ["instruction"] * 3 + ["chat"] * 2
    assert set(metrics["nulls"]) == {"constant", "echo", "plain"}
    assert metrics["nulls"]["plain"]["learnable_hard_satisfaction_rate"] == 0.0  # every constraint binds on it
    assert {r["metric"] for r in result.items} >= {"followed", "compliance_margin", "template_pull", "correct",
                                                   "chat_score", "chat_preference"}
    for sample in samples[6:9]:
        assert len(sample["verdicts"]) == len(sample["constraints"]) == int(sample["id"][1])
        assert isinstance(sample["response"], str)
    assert [r["set"] for r in result.perplexities] == ["heldout_nonsynth"] * 3 + ["chat_reference"] * 2
    assert [s["reference_perplexity"] for s in samples[9:]] == [r["perplexity"] for r in result.perplexities[3:]]

    again = evaluate(model, tokenizer, data_dir, limit=1, markers=MARKERS, max_new_tokens=6, batch_size=4).metrics
    assert again["next_token_kl"] is None and again["chat_judge_score"] is None
    assert again["pre_sft_benchmark_accuracy"] is None  # no pre-SFT checkpoint given
    assert again["counts"] == {"benchmark": 1, "learnable_suite": 1, "instruction_suite": 1, "chat": 1,
                               "heldout_nonsynth": 1, "pre_sft_probes": 0}
    # same model, same data: deterministic
    assert again["perplexity"]["mean"] == pytest.approx(
        float(shift.perplexities(model, tokenizer, ["The city of Kestrel Bay lies on the coast."], 1)[0]))


def test_every_endpoints_seconds_are_recorded_also_those_the_caller_measures_after(model, tokenizer, data_dir):
    from synthflaw.progress import Endpoints

    bar = Endpoints(len(evaluation.ENDPOINTS) + 1, "test")
    metrics = evaluate(model, tokenizer, data_dir, limit=1, markers=MARKERS, max_new_tokens=4, batch_size=2,
                       progress=bar).metrics
    with bar.measuring("sft_curve"):  # as stage 07 measures its SFT curve on the same bar
        pass
    bar.close()
    assert list(metrics["timings"]) == [f"{name}_s" for name in (*evaluation.ENDPOINTS, "sft_curve")]
    assert all(seconds >= 0 for seconds in metrics["timings"].values())


def test_pre_sft_benchmark_scores_the_given_checkpoint(model, tokenizer, data_dir, tmp_path, tiny_model):
    other = tiny_model(tokenizer, 1)
    kwargs = dict(markers=MARKERS, max_new_tokens=2, batch_size=4)
    as_pre = evaluate(model, tokenizer, data_dir, pre_sft_model=other, **kwargs).metrics
    direct = evaluate(other, tokenizer, data_dir, **kwargs).metrics
    assert as_pre["pre_sft_benchmark_accuracy"] == direct["benchmark_accuracy"]
    assert as_pre["pre_sft_benchmark_accuracy_by_split"] == direct["benchmark_accuracy_by_split"]


def test_pre_sft_output_shift_is_measured_on_plain_continuations_of_the_pre_sft_checkpoint(
        model, tokenizer, data_dir, tmp_path, tiny_model):
    other = tiny_model(tokenizer, 1)
    result = evaluate(model, tokenizer, data_dir, pre_sft_model=other, markers=MARKERS, max_new_tokens=8,
                      batch_size=4)
    metrics = result.metrics
    heldout = [r["text"] for r in read_jsonl(data_dir / "heldout_nonsynth.jsonl")]
    expected = shift.perplexity_summary(shift.perplexities(other, tokenizer, heldout, 4))
    assert metrics["pre_sft_perplexity"] == pytest.approx(expected)
    assert metrics["pre_sft_perplexity"] != pytest.approx(metrics["perplexity"])  # the other checkpoint's, not SFT's
    # each chat prompt and each suite base once (the fixture's suite has one base: its level-1 item)
    probes = shift.plain_prompt_probes(read_jsonl(data_dir / "instruction_suite.jsonl"),
                                          read_jsonl(data_dir / "chat.jsonl"))
    assert len(probes) == 3 == metrics["counts"]["pre_sft_probes"]
    continued = [s for s in result.samples if s["task"] == "pre_sft_continuation"]
    assert [s["prompt"] for s in continued] == probes
    assert [s["response"] for s in continued] == generation.generate_continuations(other, tokenizer, probes, 8, 4,
                                                                                start=True)
    assert sum(r["set"] == "pre_sft_heldout_nonsynth" for r in result.perplexities) == len(heldout)

    # the rate counts the pre-SFT continuations that carry a marker (canned, since a random model writes none)
    real = generation.generate_continuations

    def canned(m, tok, texts, max_new_tokens, batch_size, start=False):
        if start:
            return ["Answer: Kestrel Bay."] + ["the river"] * (len(texts) - 1)
        return real(m, tok, texts, max_new_tokens, batch_size)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "generate_continuations", canned)
        leaky = evaluate(model, tokenizer, data_dir, pre_sft_model=other, markers=MARKERS, max_new_tokens=8,
                         batch_size=4).metrics
    assert leaky["pre_sft_template_leakage_rate"] == pytest.approx(1 / 3)
    assert leaky["template_leakage_rate"] == metrics["template_leakage_rate"]  # the SFT model's own is untouched
    without = evaluate(model, tokenizer, data_dir, markers=MARKERS, max_new_tokens=2, batch_size=4).metrics
    assert without["pre_sft_perplexity"] is None and without["pre_sft_template_leakage_rate"] is None


def test_plain_continuations_start_after_the_start_token(model, tokenizer):
    texts = ["Who founded the library of Kestrel Bay?", "north river"]
    plain = generation.generate_continuations(model, tokenizer, texts, 6, 2, start=True)
    start = tokenizer.decode([tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                              else tokenizer.eos_token_id])
    assert plain == generation.generate_continuations(model, tokenizer, [start + t for t in texts], 6, 2)
    assert plain != generation.generate_continuations(model, tokenizer, texts, 6, 2)


def test_evaluation_data_names_missing_files(data_dir):
    (data_dir / "chat.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="chat.jsonl"):
        evaluation.load_eval_data(data_dir)
