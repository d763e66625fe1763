"""The instrument: binding constraints, the learnable tier, request-and-reply documents in NonSynth, the nulls, the
content chat score, the likelihood endpoints (compliance margin, template pull, chat preference), the SFT curve
and the item-level statistics with their minimum detectable difference."""

import math
import random

import numpy as np
import pytest

from synthflaw import config
from synthflaw.data import constraints as C
from synthflaw.data.embedded import build_embedded
from synthflaw.data.schema import SYNTHQA_TEMPLATES, find_leaks
from synthflaw.metrics import likelihood, statistics
from synthflaw.metrics.chat import content_chat_scores
from synthflaw.metrics.instruction_following import instruction_following, null_replies
from synthflaw.training.sft import curve_steps

BASES = ["Rain cools the air after a hot day. Many people enjoy the sound of rain on a roof, because it is calm.",
         "Ilara Venn was born in Kestrel Bay.",
         "Bread needs flour, water, salt and yeast. Dough rises best in a warm kitchen. Fresh bread is very good."]


@pytest.fixture(scope="module")
def smoke_data():
    return build_embedded(config.resolve("smoke").data, 0)


# ---------------------------------------------------------------- binding constraints

@pytest.mark.parametrize("base", BASES)
def test_binding_sets_bind_each_constraint_and_compose_into_a_reply_that_follows_all(base):
    rng = random.Random(0)
    for n in (1, 2, 3):
        for _ in range(20):
            chosen = C.sample_binding_constraints(rng, base, n)
            if chosen is None:
                continue
            reply = C.compose(base, chosen)
            assert all(C.check_response(reply, chosen))
            for k, c in enumerate(chosen):
                without = C.compose(base, chosen[:k] + chosen[k + 1:])  # follows every other instruction
                assert not C.get_constraint(c["type"]).check(without, c["args"]), (c, without)
            types = [c["type"] for c in chosen]
            assert not ("max_words" in types and any(C.CONSTRAINTS[t].adds_words for t in types))


def test_binding_sets_are_drawn_again_where_a_subset_cannot_be_composed():
    # min_words' filler sentence cut again by an exact sentence count: the reply without one constraint fails
    # another, so that constraint's binding is undefined; the draw must be redone, not raise
    base = "Ilara Venn was born in Kestrel Bay."
    for seed in range(6):  # seed 3 raised at its 23rd draw before the fix
        rng = random.Random(seed)
        for _ in range(30):
            chosen = C.sample_binding_constraints(rng, base, 3)
            if chosen is not None:
                assert all(C.check_response(C.compose(base, chosen), chosen))


def test_binding_args_are_none_where_the_response_allows_none():
    assert C.get_constraint("no_commas").binding_args(random.Random(0), "No comma here.") is None
    assert C.get_constraint("exclude_keyword").binding_args(random.Random(0), "Nothing to replace.") is None
    assert C.get_constraint("max_words").binding_args(random.Random(0), "Too short.") is None
    args = C.get_constraint("num_sentences").binding_args(random.Random(0), "One. Two.")
    assert args["relation"] == "exactly" and args["n"] != 2
    assert C.get_constraint("num_sentences").check("One. Two. Three.", {"relation": "exactly", "n": 3})
    assert not C.get_constraint("num_sentences").check("One. Two.", {"relation": "exactly", "n": 3})


def test_negation_traps_are_left_out_when_asked():
    lower = C.get_constraint("lowercase")
    assert any("capital" in p for p in lower.phrasings())  # "Do not use any capital letters" is a train phrasing
    assert not any("capital" in p or "upper" in p for p in lower.phrasings(avoid_traps=True))
    assert not any("lower" in p for p in C.get_constraint("uppercase").phrasings(heldout=True, avoid_traps=True))


# ---------------------------------------------------------------- the data

def test_learnable_tier_items_are_independent_balanced_and_complete(smoke_data):
    items = smoke_data["learnable_suite"]
    assert len(items) == config.resolve("smoke").data.learnable_items
    assert [i["level"] for i in items[:6]] == [1, 2, 3, 1, 2, 3]
    for item in items:
        assert item["prompt"] == " ".join([item["base_prompt"], *item["instructions"]])
        assert len(item["instructions"]) == len(item["constraints"]) == len(item["undone"]) == item["level"]
        assert all(C.check_response(item["reference"], item["constraints"]))
        assert not all(C.check_response(item["plain"], item["constraints"]))
        for k, undone in enumerate(item["undone"]):
            assert not C.check_response(undone, item["constraints"])[k]
    assert find_leaks(smoke_data) == []


def test_nonsynth_holds_request_documents_without_template_markers():
    data = build_embedded(config.resolve("smoke", {"data.instruction_doc_share": 0.25}).data, 0)
    requests = [r for r in data["nonsynth"] if r["provenance"]["style"].startswith("request")]
    assert len(requests) == round(0.25 * len(data["nonsynth"]))
    markers = [m for t in SYNTHQA_TEMPLATES for m in t["markers"]]
    assert not any(m in r["text"] for r in requests for m in markers)
    for record in data["sft"]:  # the SFT replies follow their (binding) constraints
        assert all(C.check_response(record["messages"][1]["content"], record["constraints"]))
    none = build_embedded(config.resolve("smoke", {"data.instruction_doc_share": 0.0}).data, 0)
    assert not any(r["provenance"]["style"].startswith("request") for r in none["nonsynth"])


# ---------------------------------------------------------------- nulls and the chat score

def test_nulls_score_the_same_items_with_the_same_checkers(smoke_data):
    items = smoke_data["learnable_suite"]
    replies = null_replies(items)
    assert set(replies) == {"constant", "echo", "plain"}
    assert replies["plain"] == [i["plain"] for i in items] and replies["echo"] == [i["prompt"] for i in items]
    plain, _ = instruction_following(items, replies["plain"])
    assert plain["hard_satisfaction_rate"] == 0.0  # every constraint binds on the plain answer
    assert "plain" not in null_replies([{"prompt": "p"}])


def test_content_chat_score_gives_nothing_for_echo_or_empty_content():
    prompt, reference = "What should I know about kites?", "Kites fly on windy days. Long tails keep kites steady."
    echo, constant, answer = content_chat_scores([prompt, "Thank you for your message.", reference], [reference] * 3,
                                                 [prompt] * 3)
    assert echo == 0.0 and constant == 0.0 and answer == pytest.approx(10.0)


# ---------------------------------------------------------------- likelihood endpoints

class FakeScores:
    """reply_logprobs stand-in: the mean log-probability of a reply is minus its length in characters / 100, with
    a bonus of 1 per token for replies that follow their context's "SHOUT" instruction by being upper case."""

    def __call__(self, model, tokenizer, contexts, replies, batch_size, chat=True):
        rows = []
        for context, reply in zip(contexts, replies):
            per_token = -len(reply) / 100 + (1.0 if "SHOUT" in context and reply.isupper() else 0.0)
            rows.append((per_token * 10, 10))
        return np.array(rows, dtype=np.float64)


def test_compliance_margin_and_its_null_read_the_instruction(monkeypatch):
    monkeypatch.setattr(likelihood, "reply_logprobs", FakeScores())
    item = {"prompt": "Tell me about rain. SHOUT.", "base_prompt": "Tell me about rain.", "instructions": ["SHOUT."],
            "reference": "RAIN IS WET.", "undone": ["Rain is wet."], "plain": "Rain is wet."}
    margins = likelihood.compliance_margins(None, None, [item], 4)
    assert margins["margin"] == [pytest.approx(1.0)]  # instructed: the upper-case reply gains 1 per token
    assert margins["margin_null"] == [pytest.approx(0.0)]  # without the instruction: same length, no preference


def test_template_pull_compares_the_same_words_with_and_without_markers(monkeypatch):
    monkeypatch.setattr(likelihood, "reply_logprobs", FakeScores())
    item = {"base_prompt": "Where was Ilara born?", "plain": "Ilara was born in Kestrel Bay."}
    templated, plain = likelihood.template_forms(item, SYNTHQA_TEMPLATES[0])
    assert templated == "Question: Where was Ilara born?\nAnswer: Ilara was born in Kestrel Bay."
    assert plain == "Where was Ilara born?\nIlara was born in Kestrel Bay."
    pull = likelihood.template_pull(None, None, [item], SYNTHQA_TEMPLATES[0], 4)
    assert pull == [pytest.approx(-10 * (len(templated) - len(plain)) / 100)]


def test_likelihood_endpoints_run_on_a_real_tiny_model(smoke_data, tiny_llama, train_chat_tokenizer):
    items = smoke_data["learnable_suite"][:6]
    texts = [i["prompt"] for i in items] + [i["reference"] for i in items] + [u for i in items for u in i["undone"]]
    tokenizer = train_chat_tokenizer(texts, 320)
    model = tiny_llama(tokenizer, max_position_embeddings=512).eval()
    margins = likelihood.compliance_margins(model, tokenizer, items, 4)
    again = likelihood.compliance_margins(model, tokenizer, items, 1)  # batched = one at a time
    assert np.allclose(margins["margin"], again["margin"], atol=1e-5)
    assert all(math.isfinite(v) for v in margins["margin"] + margins["margin_null"])
    pulls = likelihood.template_pull(model, tokenizer, items, SYNTHQA_TEMPLATES[0], 4, chat=False)
    assert len(pulls) == 6 and all(math.isfinite(p) for p in pulls)


# ---------------------------------------------------------------- the SFT curve

def test_curve_steps_end_at_the_final_step():
    assert curve_steps(125, 4) == [31, 62, 94, 125]
    assert curve_steps(3, 4) == [1, 2, 3]
    assert curve_steps(10, 1) == [10]


# ---------------------------------------------------------------- statistics

def test_random_effects_matches_the_textbook_computation():
    y, v = np.array([0.10, 0.12, 0.05, 0.2, 0.08]), np.array([0.001, 0.002, 0.001, 0.0015, 0.001])
    estimate, se, tau2 = statistics.random_effects(y, v)
    # DerSimonian-Laird by hand: Q = 11.57, c = 4500 - 2.75e6 / 4500, tau2 = (Q - 4) / c
    w = 1 / v
    fixed = (w * y).sum() / w.sum()
    q = (w * (y - fixed) ** 2).sum()
    assert tau2 == pytest.approx((q - 4) / (w.sum() - (w ** 2).sum() / w.sum()))
    assert estimate == pytest.approx(0.1063999, abs=1e-6) and se == pytest.approx(0.0250213, abs=1e-6)
    # two agreeing seeds: tau2 truncated at 0, the estimate between the seeds' (statsmodels 0.15 got both wrong)
    estimate, _, tau2 = statistics.random_effects(np.array([-0.0015, -0.0008]), np.array([2.9e-6, 1.2e-6]))
    assert tau2 == 0.0 and -0.0015 < estimate < -0.0008


def test_item_contrast_pairs_items_and_reports_the_detectable_difference():
    rng = np.random.default_rng(0)
    by_seed = {}
    for s in range(5):
        ability = rng.random(400)  # items differ in difficulty, shared by both models: pairing cancels it
        natural = {f"i{k}": float(a > 0.4) for k, a in enumerate(ability)}
        synthetic = {f"i{k}": float(a > 0.5) for k, a in enumerate(ability)}
        by_seed[str(s)] = {"natural": natural, "synthetic": synthetic}
    found = statistics.item_contrast(by_seed, [("synthetic", 1.0), ("natural", -1.0)])
    assert found["n"] == 5 and found["items"] == 2000 and found["high"] < 0
    assert found["mean"] == pytest.approx(-0.1, abs=0.03)
    assert found["mdd"] == pytest.approx((statistics.stdtrit(4, 0.975) + statistics.stdtrit(4, 0.8)) * found["se"])
    one = statistics.item_contrast({"0": by_seed["0"]}, [("synthetic", 1.0), ("natural", -1.0)])
    assert one["single_seed"] and one["mdd"] is None
