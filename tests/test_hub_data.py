"""Stage 01 on real data (synthflaw.data.synthqa_generation, .hub_corpus): a local corpus in the hub schema, a tiny local model folder and a
fake OpenAI-compatible endpoint on 127.0.0.1 stand in for the hub, Qwen and GPT-4. No network."""

import dataclasses
import re
from pathlib import Path

import pytest

from synthflaw import records
from synthflaw.config import resolve
from synthflaw.data import embedded, hub_corpus, schema
from synthflaw.data import synthqa_generation as generation
from synthflaw.models.chat_client import EndpointChat
from synthflaw.stages.s01_generate_data import make_generator

from fakes import FakeEndpoint, corpus_text, write_corpus

# Any connection or name lookup beyond this machine fails a test here (the no_network fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("no_network")


def build(cfg, out, generator=None):
    """Stage 01's hub path as the stage runs it: the chat client the config describes, unless one is given."""
    return generation.build_from_hub(cfg, out, generator or make_generator(cfg.data))

KEY_ENV = "SYNTHFLAW_TEST_GENERATOR_KEY"
KEY = "sk-test-0123456789abcdef-do-not-write"


def hub_cfg(corpus: Path, generator: str, endpoint: str = "", **counts):
    sizes = {"nonsynth_docs": 10, "extra_natural_docs": 4, "heldout_docs": 4, "source_documents": 4,
             "generator_batch_size": 2, "generator_max_new_tokens": 64, **counts}
    overrides = {"data.source": "hub", "data.natural_dataset": str(corpus), "data.generator": generator,
                 "data.generator_endpoint": endpoint, "data.generator_api_key_env": KEY_ENV,
                 **{f"data.{k}": v for k, v in sizes.items()}}
    return resolve("smoke", overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, train_chat_tokenizer, tiny_llama):
    """A random tiny Llama and a byte-level BPE tokenizer with a chat template, saved like a hub model."""
    folder = tmp_path_factory.mktemp("generator")
    texts = [corpus_text(i) for i in range(40)] + [generation.load_prompt("synthqa"), generation.load_prompt("rewrite")]
    tokenizer = train_chat_tokenizer(texts, 320, folder)
    tiny_llama(tokenizer, seed=0, max_position_embeddings=1024).save_pretrained(folder)
    return folder


def source_number(out_dir: Path, document_id: str) -> int:
    sources = records.read_jsonl(out_dir / "generation" / "source_documents.jsonl")
    text = next(d["text"] for d in sources if d["id"] == document_id)
    return int(re.match(r"Document (\d+)\.", text).group(1))


def test_local_model_runs_end_to_end_and_counts_junk_as_failures(tmp_path, model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    cfg = hub_cfg(corpus, str(model_dir), generator_max_new_tokens=12)
    out = tmp_path / "data"
    with pytest.warns(UserWarning, match="no parseable Q-A pair"):
        data = build(cfg, out)

    assert set(data) == set(schema.DATA_FILES) | {"world", "synthqa_templates"}
    sizes = {"nonsynth": 10, "extra_natural": 4, "heldout_nonsynth": 4}
    texts = {}
    for name, size in sizes.items():
        assert len(data[name]) == size
        for r in data[name]:
            prov = r["provenance"]
            assert prov["source"] == "hub" and prov["dataset"] == str(corpus) and prov["seed"] == cfg.seed
            assert r["text"] == corpus_text(prov["row"]) and prov["source_id"] == f"<urn:doc:{prov['row']}>"
        texts[name] = {r["text"] for r in data[name]}
    sources = records.read_jsonl(out / "generation" / "source_documents.jsonl")
    assert len(sources) == 4
    all_texts = [t for s in texts.values() for t in s] + [d["text"] for d in sources]
    assert len(set(all_texts)) == len(all_texts) == 22  # the four sets are disjoint
    # a random model emits junk: every document is a counted failure, none becomes an (empty) record
    assert data["synthqa"] == [] and data["rewritten"] == []
    stats = data["world"]["generation"]
    assert stats["documents"] == 4 and stats["pairs"] == 0 and stats["failures"] == 4
    assert sum(stats["failure_reasons"].values()) == 4
    assert set(stats["failure_reasons"]) <= {"no_pairs", "empty_output", "no_complete_pairs"}
    log = records.read_jsonl(out / "generation" / "synthqa.jsonl")
    assert sorted(line["document_id"] for line in log) == sorted(d["id"] for d in sources)
    failures = records.read_jsonl(out / "generation" / "failures.jsonl")
    assert len(failures) == 4 and {f["stage"] for f in failures} == {"synthqa"}
    # the embedded suites come along, and stage 01 writes and re-reads the whole thing
    world = embedded.build_embedded(cfg.data, cfg.seed)
    assert data["benchmark"] == world["benchmark"] and data["sft"] == world["sft"]
    assert data["synthqa_templates"] == {"templates": [schema.SYNTHQA_TEMPLATES[0]]}
    assert schema.find_leaks(data) == []
    schema.write_data(data, out)
    assert len(schema.load_data(out)["nonsynth"]) == 10


def test_endpoint_pairs_parse_into_records_and_the_key_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    out = tmp_path / "data"
    with FakeEndpoint() as server:
        cfg = hub_cfg(corpus, "teacher-model", endpoint=server.url)
        server.junk = {hub_corpus.corpus_documents(cfg.data, cfg.seed)["source"][1]["provenance"]["row"]}
        data = build(cfg, out)
    assert server.auth and all(a == f"Bearer {KEY}" for a in server.auth)
    sources = records.read_jsonl(out / "generation" / "source_documents.jsonl")
    junk_id = sources[1]["id"]

    stats = data["world"]["generation"]
    assert stats == {"generator": "teacher-model", "documents": 4, "pairs": 6, "failures": 1,
                     "failure_reasons": {"no_pairs": 1}, "rewritten": 3, "rewrite_failures": 0,
                     "rewrite_failure_reasons": {}}
    assert len(data["synthqa"]) == 6
    for r in data["synthqa"]:
        n = source_number(out, r["provenance"]["document_id"])
        assert r["text"] == f"Question: {r['question']}\nAnswer: {r['answer']}"
        assert r["question"] in (f"What is document {n} about?", f"What was mill number {n} built of?")
        assert r["answer"].startswith((f"Document {n} is", f"Mill number {n} was"))
        assert r["provenance"] == {"source": "generator", "generator": "teacher-model",
                                   "document_id": r["provenance"]["document_id"], "template_id": 0, "seed": cfg.seed}
        assert r["provenance"]["document_id"] != junk_id
    assert len({r["id"] for r in data["synthqa"]}) == 6
    for r in data["rewritten"]:
        n = source_number(out, r["provenance"]["document_id"])
        assert r["text"] == f"Document {n} is a page about the valley of Arden {n}."  # preamble line dropped
        assert len(r["provenance"]["synthqa_ids"]) == 2
    failures = records.read_jsonl(out / "generation" / "failures.jsonl")
    assert [(f["stage"], f["document_id"], f["reason"]) for f in failures] == [("synthqa", junk_id, "no_pairs")]
    assert failures[0]["output"].startswith("I am sorry")

    schema.write_data(data, out)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "synthqa.jsonl" for p in written)
    for path in written:
        assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    generator = make_generator(cfg.data)
    assert KEY not in repr(generator) and KEY not in repr(vars(generator))


def test_a_rerun_generates_only_the_missing_documents(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)  # a server on 127.0.0.1 needs no key
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    out = tmp_path / "data"
    with FakeEndpoint() as server:
        half = build(hub_cfg(corpus, "teacher", endpoint=server.url, source_documents=3), out)
        first = server.calls_of("synthqa")
        assert len(first) == 3 and half["world"]["generation"]["pairs"] == 6
        # a kill in the middle of writing a line leaves half a line behind
        with open(out / "generation" / "synthqa.jsonl", "a", encoding="utf-8") as fh:
            fh.write('{"document_id": "source-0000')
        server.calls.clear()
        full = build(hub_cfg(corpus, "teacher", endpoint=server.url, source_documents=6), out)
        assert len(server.calls_of("synthqa")) == 3 and not set(server.calls_of("synthqa")) & set(first)
        assert len(server.calls_of("rewrite")) == 3
        assert KEY not in str(server.auth[0])  # a server on 127.0.0.1 gets no key
    assert full["world"]["generation"]["pairs"] == 12 and full["world"]["generation"]["failures"] == 0
    assert [r["text"] for r in full["synthqa"][:6]] == [r["text"] for r in half["synthqa"]]
    log = records.read_jsonl(out / "generation" / "synthqa.jsonl")
    assert len(log) == 6


def test_endpoint_errors_are_counted_then_retried_on_the_next_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    out = tmp_path / "data"
    cfg = hub_cfg(corpus, "teacher", source_documents=3)
    broken = hub_corpus.corpus_documents(cfg.data, cfg.seed)["source"][0]["provenance"]["row"]
    with FakeEndpoint(broken={broken}) as server:
        generator = EndpointChat(server.url, "teacher", KEY_ENV, 64, max_retries=2)
        data = build(cfg, out, generator)
        assert server.calls_of("synthqa").count(broken) == 3  # one call and two retries
        stats = data["world"]["generation"]
        assert stats["failures"] == 1 and stats["failure_reasons"] == {"endpoint_error": 1} and stats["pairs"] == 4
        failure = records.read_jsonl(out / "generation" / "failures.jsonl")[0]
        assert failure["reason"] == "endpoint_error" and "HTTP 500" in failure["detail"]
        server.broken.clear()
        server.calls.clear()
        data = build(cfg, out, generator)
        assert server.calls_of("synthqa") == [broken]
    assert data["world"]["generation"]["failures"] == 0 and data["world"]["generation"]["pairs"] == 6
    assert records.read_jsonl(out / "generation" / "failures.jsonl") == []


def test_a_missing_key_for_a_remote_endpoint_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    cfg = hub_cfg(corpus, "gpt-4o-mini", endpoint="https://api.example.invalid/v1")
    with pytest.raises(RuntimeError, match=KEY_ENV):
        build(cfg, tmp_path / "data")
    assert not (tmp_path / "data" / "generation" / "source_documents.jsonl").exists()


def test_a_too_small_corpus_names_the_numbers(tmp_path):
    # 20 distinct documents; a duplicate and an empty text do not count
    corpus = write_corpus(tmp_path / "corpus.jsonl", 20, extra_rows=({"text": corpus_text(3)}, {"text": "  "}))
    # the generator is never loaded: the corpus check comes first (a local folder, so the hub check passes)
    cfg = hub_cfg(corpus, str(tmp_path), nonsynth_docs=10, extra_natural_docs=4, heldout_docs=4, source_documents=4)
    with pytest.raises(ValueError, match=r"has 20 usable documents.*heldout_docs=4.*source_documents=4.*"
                                         r"nonsynth_docs=10.*extra_natural_docs=4 = 22 are needed"):
        build(cfg, tmp_path / "data")
    with pytest.raises(ValueError, match="natural_text_field='body'.*columns: text, id, url"):
        hub_corpus.corpus_documents(dataclasses.replace(cfg.data, natural_text_field="body"), cfg.seed)


@pytest.mark.parametrize("output, truncated, expected", [
    ("Question: Who built it?\nAnswer: Ada built it.", False, [("Who built it?", "Ada built it.")]),
    # decorations instruct models add; a multi-line answer; chatter after a blank line is not part of the answer
    ("Sure! Here are the pairs:\n**Question 1:** Who?\n**Answer 1:** Ada.\nShe was young.\n\nI hope this helps!",
     False, [("Who?", "Ada. She was young.")]),
    ("1. Question: A?\nAnswer: a.\n2. Question: B?\nAnswer: b.", False, [("A?", "a."), ("B?", "b.")]),
    # a question without an answer and an answer without a question are dropped
    ("Question: Lonely?\nQuestion: A?\nAnswer: a.\nAnswer: stray.", False, [("A?", "a.")]),
    # cut at the token limit: the last pair may be cut mid-answer
    ("Question: A?\nAnswer: a.\nQuestion: B?\nAnswer: b is cut", True, [("A?", "a.")]),
    ("Question: A?\nAnswer: a.\nQuestion: A?\nAnswer: a.\nQuestion: B?\nAnswer: b.\nQuestion: C?\nAnswer: c.\n"
     "Question: D?\nAnswer: d.", False, [("A?", "a."), ("B?", "b."), ("C?", "c.")]),
    ("The document is about mills. Q: what? A: that.", False, []),
    ("Question:\nAnswer: nothing was asked.", False, []),
])
def test_parse_qa_pairs(output, truncated, expected):
    assert generation.parse_qa_pairs(output, 3, truncated=truncated) == expected


@pytest.mark.parametrize("output, truncated, expected", [
    ("Here is the passage:\nAda built the mill in 1820.", False, ("Ada built the mill in 1820.", None)),
    ("Ada built the mill. It still grinds grain every", True, ("Ada built the mill.", None)),
    ("   ", False, ("", "empty_output")),
    ("Question: Who built it?\nAnswer: Ada.", False, ("", "template_in_rewrite")),
])
def test_clean_rewrite(output, truncated, expected):
    assert generation.clean_rewrite(output, truncated=truncated) == expected


def test_prompts_ask_for_the_exact_format():
    prompt = generation.synthqa_prompt("Ada built the mill. " * 1000, n_pairs=5)
    assert "5 question-answer pairs" in prompt and "Question: <the question>\nAnswer: <the answer>" in prompt
    assert len(prompt) < generation.MAX_DOCUMENT_CHARS + 1000  # a long document is cut
    assert "Question: Q?\nAnswer: A." in generation.rewrite_prompt([("Q?", "A.")])


# --- the public SFT set (data.sft_dataset) --------------------------------------------------------------------------

def chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


@pytest.mark.parametrize("value, expected", [
    (chat(("user", "Hi"), ("assistant", "Hello.")), (chat(("user", "Hi"), ("assistant", "Hello.")), None)),
    (chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "More?"), ("assistant", "No.")),
     (chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "More?"), ("assistant", "No.")),
      None)),
    # extra keys of a turn (tulu's, smoltalk's) are dropped
    ([{"role": "user", "content": "Hi", "name": "u"}, {"role": "assistant", "content": "Yo", "weight": 1}],
     (chat(("user", "Hi"), ("assistant", "Yo")), None)),
    (chat(("user", "Hi")), (None, "no_assistant_turn")),
    (chat(("assistant", "I start."), ("user", "Hi")), (None, "no_user_turn_first")),
    (chat(("user", "Weather?"), ("tool", "{}")), (None, "unknown_role")),
    (chat(("user", "Hi"), ("assistant", "  ")), (None, "empty_assistant_turn")),
    ("Hi there", (None, "not_a_chat")),
    ([], (None, "not_a_chat")),
    ([{"role": "user", "content": ["a", "list"]}], (None, "not_a_chat")),
])
def test_chat_messages(value, expected):
    assert hub_corpus.chat_messages(value) == expected


def test_public_sft_set_from_a_local_parquet_file(tmp_path):
    import datasets

    rows = [{"messages": chat(("system", "Be brief."), ("user", f"Question {i}?"), ("assistant", f"Answer {i}.")),
             "source": "web", "id": f"row-{i}"} for i in range(10)]
    rows += [{"messages": chat(("user", "Only a question")), "source": "broken", "id": "bad"}, dict(rows[2])]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "sft.parquet"))
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    cfg = hub_cfg(corpus, "unused", sft_dataset=str(tmp_path / "sft.parquet"), sft_examples=10)
    records_, stats = hub_corpus.public_sft_records(cfg.data, cfg.seed)
    assert stats == {"dataset": str(tmp_path / "sft.parquet"), "config": "", "split": "train", "records": 10,
                     "skipped": {"duplicate": 1, "no_assistant_turn": 1}}
    assert [r["id"] for r in records_] == [f"sft-{i:06d}" for i in range(10)]
    for r in records_:
        source = rows[r["provenance"]["row"]]
        assert r["messages"] == source["messages"] and r["constraints"] == []
        assert r["provenance"] == {"source": "hub", "dataset": str(tmp_path / "sft.parquet"), "config": "",
                                   "split": "train", "row": r["provenance"]["row"], "seed": cfg.seed,
                                   "source_id": source["id"]}
    assert sorted(r["messages"][1]["content"] for r in records_) == sorted(f"Question {i}?" for i in range(10))
    assert hub_corpus.public_sft_records(cfg.data, cfg.seed)[0] == records_  # seeded: the same order again
    with pytest.raises(ValueError, match=r"has 10 usable chats \(skipped: .*\), fewer than data.sft_examples=11"):
        hub_corpus.public_sft_records(dataclasses.replace(cfg.data, sft_examples=11), cfg.seed)
    with pytest.raises(ValueError, match="data.sft_messages_field='conversations' is not a column"):
        hub_corpus.public_sft_records(dataclasses.replace(cfg.data, sft_messages_field="conversations"), cfg.seed)


def test_chats_holding_an_evaluation_prompt_are_dropped():
    sft = [{"id": "a", "messages": chat(("user", "Say hi"), ("assistant", "hi"))},
           {"id": "b", "messages": chat(("user", "Well: In a few sentences, what should I know about owls? Go."),
                                        ("assistant", "Owls..."))},
           {"id": "c", "messages": chat(("user", "What should I"), ("assistant", "know about owls?"))}]
    kept, dropped = hub_corpus.drop_leaking_chats(sft, ["In a few sentences, what should I know about owls?",
                                                      "what should I know about owls?"])
    assert [r["id"] for r in kept] == ["a", "c"] and dropped == 1  # a prompt split over two turns is no leak
