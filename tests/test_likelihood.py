"""synthflaw.metrics.likelihood's endpoints on hand-built log-probabilities: the scorer is replaced by a table of
(sum of log-probabilities, token count) per (context, reply), so each endpoint's arithmetic is checked against
values worked out by hand; and what is scored (chat-templated or plain contexts, reply tokens) on a small trained
tokenizer.
"""

import numpy as np
import pytest

from synthflaw.metrics import likelihood
from synthflaw.metrics.text import CONSTANT_REPLY
from synthflaw.models.tokenizer import chat_text, encode, encode_all, encode_chats, pad_id, start_tokens


MODEL, TOKENIZER = object(), object()  # what the endpoints are given, and must pass on to the scorer


class Table:
    """A stand-in for `reply_logprobs`: (sum, count) per (context, reply), and the `chat` flag of every call."""

    def __init__(self, scores: dict, batch_size: int):
        self.scores, self.batch_size, self.chat = scores, batch_size, []

    def __call__(self, model, tokenizer, contexts, replies, batch_size, *, chat=True):
        assert model is MODEL and tokenizer is TOKENIZER and batch_size == self.batch_size  # passed on
        self.chat.append(chat)
        return np.array([self.scores[(c, r)] for c, r in zip(contexts, replies)], dtype=np.float64)


def test_chat_preference_is_the_reference_less_the_larger_trivial_reply(monkeypatch):
    table = Table({
        # p1: reference mean -6/3 = -2; constant -4/4 = -1 (the larger); echo -9/3 = -3 -> -2 - (-1) = -1
        ("p1", "r1"): (-6.0, 3), ("p1", CONSTANT_REPLY): (-4.0, 4), ("p1", "p1"): (-9.0, 3),
        # p2: reference -2/2 = -1; constant -12/4 = -3; echo -3/2 = -1.5 (the larger) -> -1 - (-1.5) = 0.5
        ("p2", "r2"): (-2.0, 2), ("p2", CONSTANT_REPLY): (-12.0, 4), ("p2", "p2"): (-3.0, 2),
    }, batch_size=2)
    monkeypatch.setattr(likelihood, "reply_logprobs", table)
    items = [{"prompt": "p1", "reference": "r1"}, {"prompt": "p2", "reference": "r2"}]
    assert likelihood.chat_preference(MODEL, TOKENIZER, items, batch_size=2) == pytest.approx([-1.0, 0.5])
    assert set(table.chat) == {True}  # under the chat template


def test_compliance_margin_and_its_null_per_constraint_averaged_per_item(monkeypatch):
    item = {"base_prompt": "B.", "instructions": ["I1.", "I2."], "prompt": "B. I1. I2.", "reference": "ref",
            "undone": ["u1", "u2"]}
    # means per token (each reply 2 tokens): with the instructions ref -1, u1 -3, u2 -2;
    # without I1 ("B. I2."): ref -1.5, u1 -2; without I2 ("B. I1."): ref -2, u2 -1
    table = Table({("B. I1. I2.", "ref"): (-2.0, 2), ("B. I1. I2.", "u1"): (-6.0, 2), ("B. I1. I2.", "u2"): (-4.0, 2),
                   ("B. I2.", "ref"): (-3.0, 2), ("B. I2.", "u1"): (-4.0, 2),
                   ("B. I1.", "ref"): (-4.0, 2), ("B. I1.", "u2"): (-2.0, 2)}, batch_size=4)
    monkeypatch.setattr(likelihood, "reply_logprobs", table)
    second = {**item, "undone": ["u1"], "instructions": ["I1."], "prompt": "B. I1. I2."}  # one constraint
    table.scores[("B.", "ref")], table.scores[("B.", "u1")] = (-1.0, 2), (-1.0, 2)
    out = likelihood.compliance_margins(MODEL, TOKENIZER, [item, second], batch_size=4)
    # item: margins (-1 - -3, -1 - -2) = (2, 1) -> 1.5; nulls (-1.5 - -2, -2 - -1) = (0.5, -1) -> -0.25
    # second: margin -1 - -3 = 2; null, with I1 left out ("B."): -0.5 - -0.5 = 0
    assert out["margin"] == pytest.approx([1.5, 2.0]) and out["margin_null"] == pytest.approx([-0.25, 0.0])
    assert set(table.chat) == {True}


TEMPLATE = {"format": "Question: {question}\nAnswer: {answer}"}


def test_template_forms_and_template_pull_in_nats_per_reply(monkeypatch):
    item = {"base_prompt": "Where?", "plain": "Here."}
    templated, plain = likelihood.template_forms(item, TEMPLATE)
    assert (templated, plain) == ("Question: Where?\nAnswer: Here.", "Where?\nHere.")
    # sums, not means: templated -10 over 5 tokens, plain -4 over 2 -> pull -6 (means would give -2 - -2 = 0)
    table = Table({("Where?", templated): (-10.0, 5), ("Where?", plain): (-4.0, 2),
                   ("", templated): (-3.0, 5), ("", plain): (-7.0, 2)}, batch_size=1)
    monkeypatch.setattr(likelihood, "reply_logprobs", table)
    assert likelihood.template_pull(MODEL, TOKENIZER, [item], TEMPLATE, batch_size=1) == pytest.approx([-6.0])
    assert table.chat == [True]  # both forms in one call: they share one pass over the prompt
    # before SFT: plain text after the start token (an empty context), not the chat prompt
    before = likelihood.template_pull(MODEL, TOKENIZER, [item], TEMPLATE, batch_size=1, chat=False)
    assert before == pytest.approx([4.0])
    assert table.chat[1:] == [False]


@pytest.fixture(scope="module")
def tokenizer(train_chat_tokenizer):
    return train_chat_tokenizer(["the river north of the city", "Question: where\nAnswer: here", "a b c"] * 20, 300)


def test_encode_all_and_encode_chats_are_encode_of_each_text_in_order(tokenizer):
    texts = ["the city", "", "north of the river", "the city", chat_text(tokenizer, "north"), "the city"]
    out = encode_all(tokenizer, texts)
    assert out == [encode(tokenizer, text) for text in texts] and out[1] == [] and out[0]
    out[0].append(-1)  # each text its own list, even a repeated one
    assert out[3] == out[5] == encode(tokenizer, "the city")
    assert encode_all(tokenizer, []) == []
    prompts = ["north", "the city", "north"]
    assert encode_chats(tokenizer, prompts) == [encode(tokenizer, chat_text(tokenizer, p)) for p in prompts]


def test_reply_logprobs_scores_each_reply_after_its_chat_or_plain_context(monkeypatch, tokenizer):
    seen = {}

    def scorer(model, pairs, batch_size, pad):
        assert model is MODEL
        seen.update(pairs=pairs, batch_size=batch_size, pad=pad)
        return [(-float(len(reply)), len(reply)) for _, reply in pairs]

    monkeypatch.setattr(likelihood, "shared_context_logprobs", scorer)
    out = likelihood.reply_logprobs(MODEL, tokenizer, ["the city", "north"], ["a b", "here"], 3)
    assert seen["pairs"] == [(encode(tokenizer, chat_text(tokenizer, "the city")), encode(tokenizer, "a b")),
                             (encode(tokenizer, chat_text(tokenizer, "north")), encode(tokenizer, "here"))]
    assert seen["batch_size"] == 3 and seen["pad"] == pad_id(tokenizer)
    assert out.shape == (2, 2) and out.dtype == np.float64
    assert out.tolist() == [[-len(encode(tokenizer, "a b")), len(encode(tokenizer, "a b"))],
                            [-len(encode(tokenizer, "here")), len(encode(tokenizer, "here"))]]
    likelihood.reply_logprobs(MODEL, tokenizer, ["the city", ""], ["a b", "here"], 1, chat=False)
    start = start_tokens(tokenizer)
    assert start and seen["pairs"] == [(start + encode(tokenizer, "the city"), encode(tokenizer, "a b")),
                                       (start, encode(tokenizer, "here"))]  # an empty context: the start token alone
    with pytest.raises(ValueError, match=r"^got 2 contexts but 1 replies; pass one context per reply$"):
        likelihood.reply_logprobs(MODEL, tokenizer, ["a", "b"], ["c"], 1)


def test_reply_logprobs_scores_a_repeated_pair_once_and_returns_it_at_every_place(monkeypatch, tokenizer):
    calls = []

    def scorer(model, pairs, batch_size, pad):
        calls.append(pairs)
        return [(-float(sum(reply)) - len(context), len(reply)) for context, reply in pairs]

    monkeypatch.setattr(likelihood, "shared_context_logprobs", scorer)
    contexts, replies = ["the city", "north", "the city", "the city"], ["a b", "here", "a b", "here"]
    out = likelihood.reply_logprobs(MODEL, tokenizer, contexts, replies, 4)
    assert len(calls) == 1 and len(calls[0]) == 3  # ("the city", "a b") asked twice, scored once
    expected = [scorer(None, [(encode(tokenizer, chat_text(tokenizer, c)), encode(tokenizer, r))], 1, 0)[0]
                for c, r in zip(contexts, replies)]
    assert out.tolist() == [list(e) for e in expected]
