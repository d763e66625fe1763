"""The evaluation items generalise (synthflaw.data.embedded, .phrasebook, .schema): many distinct base prompts drawn per
seed, no evaluation topic taught by SFT, no scored string a training text, a tokenizer corpus no swept key changes."""

import dataclasses

import pytest

from synthflaw import config
from synthflaw.data.embedded import build_embedded
from synthflaw.data.phrasebook import TOPICS, topic_split
from synthflaw.data.schema import find_leaks, tokenizer_texts


@pytest.fixture(scope="module")
def default_data():
    return build_embedded(config.resolve("default").data, 3)


def test_the_learnable_tier_stands_on_many_distinct_bases_each_at_levels_1_to_3(default_data):
    items = default_data["learnable_suite"]
    bases = {}
    for item in items:
        bases.setdefault(item["base_id"], []).append(item)
    assert len(items) == 600 and len(bases) == 200 >= 150
    assert len({item["base_prompt"] for item in items}) == 200  # distinct base prompts, not only distinct ids
    assert all(sorted(i["level"] for i in group) == [1, 2, 3] and len({i["base_prompt"] for i in group}) == 1
               for group in bases.values())
    facts = {fid for i in items for fid in i["provenance"]["fact_ids"]}
    assert len(facts) >= 50  # subjects drawn from the held-out facts, not a handful


def test_no_evaluation_topic_or_fact_is_taught_by_sft_and_topics_change_with_the_seed(default_data):
    world = default_data["world"]
    sft_topics, eval_topics = topic_split(3)
    assert (world["sft_topics"], world["eval_topics"]) == (list(sft_topics), list(eval_topics))
    assert not set(sft_topics) & set(eval_topics) and set(sft_topics) | set(eval_topics) == set(TOPICS)
    taught = {r["provenance"]["task"] for r in default_data["sft"]}
    asked = {r["provenance"]["task"] for name in ("learnable_suite", "instruction_suite")
             for r in default_data[name]} | {r["provenance"].get("task") for r in default_data["chat"]}
    assert not {t for t in asked if t and t.startswith("topic:")} & taught
    sft_facts = set(world["sft_fact_ids"])
    for name in ("learnable_suite", "instruction_suite", "benchmark", "chat"):
        assert not {f for r in default_data[name] for f in r["provenance"]["fact_ids"]} & sft_facts, name
    assert topic_split(4)[1] != eval_topics


def test_a_scored_reply_equal_to_a_training_text_is_a_leak(default_data):
    assert find_leaks(default_data) == []
    data = dict(default_data)
    item = dict(data["learnable_suite"][5])
    item["reference"] = data["sft"][0]["messages"][1]["content"]  # a reply SFT trained on, verbatim
    data["learnable_suite"] = [*data["learnable_suite"][:5], item, *data["learnable_suite"][6:]]
    assert find_leaks(data) == [f"learnable_suite:{item['id']}"]
    chat = dict(data["chat"][0], reference=data["nonsynth"][0]["text"])
    assert f"chat:{chat['id']}" in find_leaks({**data, "chat": [chat, *data["chat"][1:]]})


def test_the_tokenizer_corpus_is_the_same_whatever_the_synthqa_templates():
    cfg = config.resolve("smoke").data
    one = build_embedded(cfg, 0)
    five = build_embedded(dataclasses.replace(cfg, synthetic_templates=5, synthqa_per_fact=2), 0)
    assert one["synthqa"] != five["synthqa"]
    assert tokenizer_texts(one) == tokenizer_texts(five)
    assert not any(r["text"] in set(tokenizer_texts(one)) for r in one["synthqa"])
