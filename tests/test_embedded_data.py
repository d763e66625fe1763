"""Stage 01 (synthflaw.data.embedded, .world, .schema): the generated world and its data sets."""

import hashlib
from collections import Counter

import datasets
import pytest

from synthflaw import config
from synthflaw.data import embedded, schema
from synthflaw.data.constraints import check_response
from synthflaw.data.world import build_world


@pytest.fixture(scope="module")
def smoke_cfg():
    return config.resolve("smoke")


@pytest.fixture(scope="module")
def data(smoke_cfg):
    return embedded.build_embedded(smoke_cfg.data, smoke_cfg.seed)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, smoke_cfg):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    schema.write_data(embedded.build_embedded(smoke_cfg.data, 0), a)
    schema.write_data(embedded.build_embedded(smoke_cfg.data, 0), b)
    schema.write_data(embedded.build_embedded(smoke_cfg.data, 1), c)
    assert _digest(a) == _digest(b)
    assert _digest(a)["synthqa.jsonl"] != _digest(c)["synthqa.jsonl"]


def test_world_is_seeded_and_well_formed():
    w = build_world(3, 10, 5, 6)
    assert w == build_world(3, 10, 5, 6) and w != build_world(4, 10, 5, 6)
    assert len(w.facts) == 10 * 5 + 5 * 3 + 6
    assert len({f.id for f in w.facts}) == len(w.facts)
    with pytest.raises(ValueError, match="at least 4"):
        build_world(0, 2, 5, 6)


def test_every_record_has_provenance_and_an_id(data):
    for name in schema.DATA_FILES:
        assert data[name], f"{name} is empty"
        ids = [r["id"] for r in data[name]]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
        for r in data[name]:
            assert r["provenance"]["seed"] == 0 and r["provenance"]["source"] == "embedded"


def test_fact_split_nonsynth_states_only_stated_facts(data):
    stated, only = set(data["world"]["stated_fact_ids"]), set(data["world"]["synthqa_only_fact_ids"])
    assert stated and only and not stated & only
    mentioned = {fid for r in data["nonsynth"] + data["extra_natural"] for fid in r["provenance"]["fact_ids"]}
    assert mentioned <= stated
    assert {r["provenance"]["fact_id"] for r in data["synthqa"]} == stated | only


def test_synthqa_is_uniform_by_default_and_templates_vary_on_request(smoke_cfg):
    one = embedded.synthqa_pairs(list(build_world(0, 6, 4, 4).facts), 2, 1, 0)
    assert all(r["text"].startswith("Question: ") and "\nAnswer: " in r["text"] for r in one)
    three = embedded.synthqa_pairs(list(build_world(0, 6, 4, 4).facts), 2, 3, 0)
    assert len(Counter(r["provenance"]["template_id"] for r in three)) == 3
    with pytest.raises(ValueError, match="synthetic_templates"):
        embedded.synthqa_pairs([], 1, 99, 0)


def test_every_template_can_be_asked_for_and_its_markers_are_its_own():
    # the config's bound is the number of templates, so every one is reachable and none past the end
    assert config.DataConfig.__dataclass_fields__["synthetic_templates"].metadata["high"] == len(
        schema.SYNTHQA_TEMPLATES)
    assert [t["id"] for t in schema.SYNTHQA_TEMPLATES] == list(range(len(schema.SYNTHQA_TEMPLATES)))
    ten = embedded.synthqa_pairs(list(build_world(0, 12, 6, 6).facts), 3, 10, 0)
    assert {r["provenance"]["template_id"] for r in ten} == set(range(10))
    for r in ten:  # a record shows exactly its own template's markers (the leakage rate counts them)
        own = schema.SYNTHQA_TEMPLATES[r["provenance"]["template_id"]]["markers"]
        assert all(m in r["text"] for m in own), r["text"]
        others = [m for t in schema.SYNTHQA_TEMPLATES if t["markers"] != own for m in t["markers"]
                  if m not in own]
        assert not [m for m in others if m in r["text"]], r["text"]


def test_no_template_marker_occurs_outside_synthqa():
    # with twelve templates, a marker that also occurs in natural text would count as leakage for no reason
    cfg = config.resolve("smoke", {"data.instruction_doc_share": 0.25})
    data = embedded.build_embedded(cfg.data, 0)
    markers = schema.template_markers({"templates": list(schema.SYNTHQA_TEMPLATES)})
    texts = [r["text"] for name in ("nonsynth", "extra_natural", "heldout_nonsynth", "rewritten") for r in data[name]]
    texts += [m["content"] for r in data["sft"] for m in r["messages"]]
    texts += [r[field] for name, field in (("benchmark", "question"), ("learnable_suite", "prompt"),
                                           ("instruction_suite", "prompt"), ("chat", "prompt")) for r in data[name]]
    found = Counter(m for t in texts for m in markers if m in t)
    assert not found, found


def test_no_evaluation_item_leaks_into_training(data):
    assert schema.find_leaks(data) == []
    corpus = "\n".join(schema.training_texts(data))
    # and the check can fail: planting a suite prompt in the SFT set is caught
    planted = {**data, "sft": data["sft"] + [{"messages": [{"role": "user", "content": data["chat"][0]["prompt"]}]}]}
    assert schema.find_leaks(planted) == [f"chat:{data['chat'][0]['id']}"]
    assert data["benchmark"][0]["question"] not in corpus


def test_evaluation_facts_are_never_sft_targets(data):
    sft_facts = {fid for r in data["sft"] for fid in r["provenance"]["fact_ids"]}
    bench_facts = {fid for r in data["benchmark"] for fid in r["provenance"]["fact_ids"]}
    suite_facts = {fid for r in data["instruction_suite"] for fid in r["provenance"]["fact_ids"]}
    assert not sft_facts & bench_facts and not sft_facts & suite_facts


def test_benchmark_is_split_and_well_formed(data):
    splits = Counter(r["split"] for r in data["benchmark"])
    assert set(splits) == {"stated", "synthqa_only"}
    for r in data["benchmark"]:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4


def test_sft_targets_satisfy_their_constraints(data):
    for r in data["sft"]:
        assert 1 <= len(r["constraints"]) <= 3
        assert all(check_response(r["messages"][1]["content"], r["constraints"]))


def test_suite_levels_and_unseen_combinations(data):
    by_base = {}
    for r in data["instruction_suite"]:
        by_base.setdefault(r["base_id"], []).append(r)
        assert len(r["constraints"]) == r["level"]
        assert all(check_response(r["reference"], r["constraints"]))
    assert all(sorted(x["level"] for x in v) == [1, 2, 3, 4, 5] for v in by_base.values())
    sft_combos = {frozenset(c["type"] for c in r["constraints"]) for r in data["sft"]}
    for r in data["instruction_suite"]:
        if r["level"] in (2, 3):
            assert frozenset(c["type"] for c in r["constraints"]) not in sft_combos


def test_loadable_with_datasets(tmp_path, data):
    schema.write_data(data, tmp_path)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "benchmark.jsonl"), split="train")
    assert len(ds) == len(data["benchmark"]) and "choices" in ds.column_names
