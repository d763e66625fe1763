"""synthflaw.models.scoring's shared-context path against the plain one on a tiny random Llama: the same
log-probabilities for every pair (up to float rounding) at every batch size, each distinct context encoded once,
and the same refusals."""

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


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_shared_context_scores_equal_the_plain_path_pair_by_pair(model, batch_size):
    pairs = random_pairs(seed=batch_size)
    shared = shared_context_logprobs(model, pairs, batch_size, PAD)
    plain = continuation_logprobs(model, pairs, batch_size, PAD)
    assert [n for _, n in shared] == [n for _, n in plain] == [len(reply) for _, reply in pairs]  # none dropped
    assert max(abs(a - b) for (a, _), (b, _) in zip(shared, plain)) < 1e-4
    for (context, reply), (score, _) in zip(pairs[:5], shared):
        assert score == pytest.approx(unpadded(model, context, reply), abs=1e-4)


def test_each_distinct_context_is_encoded_once(model, monkeypatch):
    pairs = random_pairs(seed=7, n_contexts=4, n_pairs=20)
    for batch_size in (3, 20):
        batches = scoring._shared_context_batches(pairs, batch_size)
        members = sorted(i for batch in batches for _, rows in batch for i in rows)
        assert members == list(range(len(pairs)))  # every pair once
        assert all(sum(len(rows) for _, rows in batch) <= batch_size for batch in batches)
        assert all(pairs[i][0] == context for batch in batches for context, rows in batch for i in rows)
    # when a batch holds all of a context's replies, that context is encoded once
    assert sorted(tuple(c) for batch in batches for c, _ in batch) == sorted({tuple(c) for c, _ in pairs})
    shapes = []
    forward = model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    shared_context_logprobs(model, pairs, 20, PAD)
    # one pass over the 4 contexts, one over the 20 replies
    assert [rows for rows, _ in shapes] == [4, 20]


def test_shared_context_refuses_what_the_plain_path_refuses(model):
    for bad in ([([], [1])], [([1], [])]):
        for scorer in (continuation_logprobs, shared_context_logprobs):
            with pytest.raises(ValueError, match="context token|is empty"):
                scorer(model, bad, 2, PAD)
    with pytest.raises(ValueError, match="batch_size"):
        shared_context_logprobs(model, [([1], [2])], 0, PAD)
