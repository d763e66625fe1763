"""synthflaw.models.scoring's shared-prefix path against the plain one on a tiny random Llama: the same
log-probabilities for every pair (up to float rounding) at every batch size and row width, in sdpa and eager
attention, each shared prefix computed once, a pass no larger than the plain path's, and the same refusals."""

import functools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from synthflaw.models import scoring
from synthflaw.models.scoring import continuation_logprobs, shared_context_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD = 60, 0


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         initializer_range=0.3, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def random_pairs(seed, n_contexts=6, n_pairs=30):
    """Pairs over a few contexts of 1-20 tokens (so several replies share each), replies of 1-15 tokens."""
    rng = random.Random(seed)
    contexts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(n_contexts)]
    return [(rng.choice(contexts), [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 15))])
            for _ in range(n_pairs)]


def unpadded(model, context, reply):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + reply])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context) - 1:-1], -1)
    return logprobs[torch.arange(len(reply)), torch.tensor(reply)].sum().item()


def branching_pairs(seed, n_items=5):
    """Pairs shaped like the compliance margin's: per item a prompt and prompts that drop one of its sentences
    (sharing the prompt up to there), each with replies that share their first words and then differ."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    pairs = []
    for _ in range(n_items):
        sentences = [words(rng.randint(1, 6)) for _ in range(rng.randint(2, 4))]
        prompts = [sum(sentences, [])] + [sum(sentences[:k] + sentences[k + 1:], []) for k in range(len(sentences))]
        opening = words(rng.randint(0, 8))
        replies = [opening + words(rng.randint(1, 8)) for _ in range(3)]
        pairs += [(prompt, reply) for prompt in prompts for reply in replies]
    return pairs


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
@pytest.mark.parametrize("row_tokens", [1, 24, 256])  # 1: rows as wide as the longest pair, trees cut most
def test_shared_context_scores_equal_the_plain_path_pair_by_pair(model, batch_size, row_tokens, monkeypatch):
    monkeypatch.setattr(scoring, "ROW_TOKENS", row_tokens)
    for pairs in (random_pairs(seed=batch_size), branching_pairs(seed=batch_size)):
        shared = shared_context_logprobs(model, pairs, batch_size, PAD)
        plain = continuation_logprobs(model, pairs, batch_size, PAD)
        assert [n for _, n in shared] == [n for _, n in plain] == [len(reply) for _, reply in pairs]  # none dropped
        assert max(abs(a - b) for (a, _), (b, _) in zip(shared, plain)) < 1e-4
        for (context, reply), (score, _) in zip(pairs[:5], shared):
            assert score == pytest.approx(unpadded(model, context, reply), abs=1e-4)


def test_eager_attention_gets_the_tree_mask_as_added_scores(model, monkeypatch):
    pairs = branching_pairs(seed=3)
    expected = continuation_logprobs(model, pairs, 8, PAD)
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    for layer in model.model.layers:
        monkeypatch.setattr(layer.self_attn.config, "_attn_implementation", "eager")
    eager = shared_context_logprobs(model, pairs, 8, PAD)
    assert max(abs(a - b) for (a, _), (b, _) in zip(eager, expected)) < 1e-4


def forward_inputs(model, monkeypatch) -> list[dict]:
    calls = []
    forward = model.forward

    @functools.wraps(forward)
    def recording(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    return calls


def test_each_shared_prefix_is_computed_once(model, monkeypatch):
    pairs = branching_pairs(seed=7, n_items=3)
    distinct_prefixes = {tuple((c + r)[:n]) for c, r in pairs for n in range(1, len(c) + len(r) + 1)}
    calls = forward_inputs(model, monkeypatch)
    shared_context_logprobs(model, pairs, 64, PAD)
    # the whole tree fits one pass; each distinct prefix is one token of it (the rest is padding)
    assert len(calls) == 1
    assert int((calls[0]["input_ids"] != PAD).sum()) == len(distinct_prefixes)
    assert len(distinct_prefixes) < sum(len(c) + len(r) for c, r in pairs) / 2  # what the sharing saves here


def test_a_pass_holds_no_more_tokens_than_batch_size_of_the_longest_pairs(model, monkeypatch):
    pairs = random_pairs(seed=11, n_contexts=10, n_pairs=60)
    longest = max(len(c) + len(r) for c, r in pairs)
    calls = forward_inputs(model, monkeypatch)
    for batch_size in (1, 4):
        calls.clear()
        shared_context_logprobs(model, pairs, batch_size, PAD)
        assert all(call["input_ids"].numel() <= max(batch_size * longest, scoring.ROW_TOKENS) for call in calls)


def test_attention_without_a_custom_mask_is_scored_by_the_plain_path(model, monkeypatch):
    pairs = random_pairs(seed=5)
    expected = continuation_logprobs(model, pairs, 4, PAD)
    monkeypatch.setattr(scoring, "TREE_ATTENTION", ())  # as for flash attention, which takes no 4D mask
    calls = forward_inputs(model, monkeypatch)
    assert shared_context_logprobs(model, pairs, 4, PAD) == expected
    assert all(call["attention_mask"].dim() == 2 for call in calls)


def test_shared_context_refuses_what_the_plain_path_refuses(model):
    for bad in ([([], [1])], [([1], [])]):
        for scorer in (continuation_logprobs, shared_context_logprobs):
            with pytest.raises(ValueError, match="context token|is empty"):
                scorer(model, bad, 2, PAD)
    with pytest.raises(ValueError, match="batch_size"):
        shared_context_logprobs(model, [([1], [2])], 0, PAD)
