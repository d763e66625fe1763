"""Stage 01's products on disk: the data sets' names, the SynthQA templates, reading and writing, leak checks.

Every data set is a JSONL file of records under ``01_generate_data/data/`` (loadable with
``datasets.load_dataset("json", ...)``), beside ``world.json`` (the generated world, or the real corpus's description)
and ``synthqa_templates.json`` (the Q-A formats SynthQA was written in, with their structural markers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from synthflaw.records import read_jsonl, write_json, write_jsonl
from synthflaw.registry import GENERATE_DATA

# The Q-A formats a teacher model emits. Template 0 is the paper's uniform format; `synthetic_templates` = k uses
# the first k (ids 0-4 came first, 5-11 were added for the format-diversity sweep: the first five are unchanged, so
# k <= 5 writes the same data as before). Markers are each template's structural strings: what the leakage rate and
# template unlearning look for; none may occur in a natural document, an SFT chat or an evaluation prompt.
SYNTHQA_TEMPLATES = (
    {"id": 0, "format": "Question: {question}\nAnswer: {answer}", "markers": ["Question:", "Answer:"]},
    {"id": 1, "format": "Q: {question}\nA: {answer}", "markers": ["Q:", "A:"]},
    {"id": 2, "format": "### Question\n{question}\n### Answer\n{answer}", "markers": ["### Question", "### Answer"]},
    {"id": 3, "format": "<question>{question}</question>\n<answer>{answer}</answer>",
     "markers": ["<question>", "<answer>"]},
    {"id": 4, "format": "Query: {question}\nResponse: {answer}", "markers": ["Query:", "Response:"]},
    {"id": 5, "format": "[Q] {question}\n[A] {answer}", "markers": ["[Q]", "[A]"]},
    {"id": 6, "format": "Problem: {question}\nSolution: {answer}", "markers": ["Problem:", "Solution:"]},
    {"id": 7, "format": "QUESTION >> {question}\nANSWER >> {answer}", "markers": ["QUESTION >>", "ANSWER >>"]},
    {"id": 8, "format": "- question: {question}\n- answer: {answer}", "markers": ["- question:", "- answer:"]},
    {"id": 9, "format": "Input: {question}\nOutput: {answer}", "markers": ["Input:", "Output:"]},
    {"id": 10, "format": "{{\"q\": \"{question}\", \"a\": \"{answer}\"}}", "markers": ['{"q": "', '", "a": "']},
    {"id": 11, "format": "Asked: {question}\nAnswered: {answer}", "markers": ["Asked:", "Answered:"]},
)

DATA_FILES = ("nonsynth", "extra_natural", "heldout_nonsynth", "synthqa", "rewritten", "sft", "benchmark",
              "learnable_suite", "instruction_suite", "chat")


def template_markers(templates: dict) -> list[str]:
    """The structural strings of every template in a ``synthqa_templates.json`` content ({"templates": [...]})."""
    return [m for t in templates["templates"] for m in t["markers"]]


def read_markers(data_dir: Path) -> list[str]:
    """The SynthQA templates' markers of a stage-01 data folder."""
    return template_markers(json.loads((Path(data_dir) / "synthqa_templates.json").read_text()))


def training_texts(data: dict) -> Iterable[str]:
    """Every text a model is trained on, for the leakage check."""
    for name in ("nonsynth", "extra_natural", "synthqa", "rewritten"):
        for r in data[name]:
            yield r["text"]
    for r in data["sft"]:
        for m in r["messages"]:
            yield m["content"]


def tokenizer_texts(data: dict) -> list[str]:
    """What the embedded tokenizer is trained on: NonSynth, the SFT chats and every template's markers (each 200
    times, so each becomes the same few tokens whatever SynthQA holds). No SynthQA or rewritten text: a sweep of a
    `data.*` key that changes only those (the templates, the pairs per fact) then trains every natural-side model on
    the same tokens, and compares like with like."""
    texts = [r["text"] for r in data["nonsynth"]]
    texts += [m["content"] for r in data["sft"] for m in r["messages"]]
    texts += [marker for t in SYNTHQA_TEMPLATES for marker in t["markers"]] * 200
    return texts


def scored_replies(data: dict) -> Iterable[tuple[str, str]]:
    """("<set>:<id>", text) of every reply the likelihood endpoints score: the learnable tier's plain answer,
    compliant reply and undone replies, its SynthQA-templated forms (the template pull), and the chat references."""
    templates = data["synthqa_templates"]["templates"]
    for r in data["learnable_suite"]:
        for text in (r["plain"], r["reference"], *r["undone"]):
            yield f"learnable_suite:{r['id']}", text
        for t in templates:
            yield f"learnable_suite:{r['id']}", t["format"].format(question=r["base_prompt"], answer=r["plain"])
    for r in data["chat"]:
        yield f"chat:{r['id']}", r["reference"]


def find_leaks(data: dict) -> list[str]:
    """Evaluation items whose prompt (or held-out document) occurs verbatim in any training text, or one of whose
    scored replies (`scored_replies`) is a training text."""
    texts = list(training_texts(data))
    corpus, trained = "\n\x00".join(texts), set(texts)
    leaks = [f"{name}:{r['id']}" for name, field in (("benchmark", "question"), ("learnable_suite", "prompt"),
                                                     ("instruction_suite", "prompt"), ("chat", "prompt"),
                                                     ("heldout_nonsynth", "text"))
             for r in data[name] if r[field] in corpus]
    return leaks + sorted({key for key, text in scored_replies(data) if text in trained})


def load_data(data_dir: Path) -> dict[str, list[dict]]:
    """Stage 01's products as lists of records, keyed by file name."""
    data_dir = Path(data_dir)
    missing = [n for n in DATA_FILES if not (data_dir / f"{n}.jsonl").exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {', '.join(missing)}.jsonl: run stage {GENERATE_DATA.name} first")
    out: dict = {n: read_jsonl(data_dir / f"{n}.jsonl") for n in DATA_FILES}
    out["synthqa_templates"] = json.loads((data_dir / "synthqa_templates.json").read_text())
    return out


def write_data(data: dict, data_dir: Path) -> dict:
    """Write every data set as JSONL (loadable with `datasets.load_dataset("json", ...)`); returns the counts."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        write_jsonl(data_dir / f"{name}.jsonl", data[name])
    write_json(data_dir / "world.json", data["world"])
    write_json(data_dir / "synthqa_templates.json", data["synthqa_templates"])
    return {name: len(data[name]) for name in DATA_FILES}


def examples(data_dir: Path) -> str:
    """One record of each data set, for reading in the notebook."""
    data = load_data(Path(data_dir))
    parts = []
    for name in DATA_FILES:
        record = data[name][0]
        shown = {k: v for k, v in record.items() if k != "provenance"}
        parts.append(f"== {name} ({len(data[name])} records)\n{json.dumps(shown, indent=1, ensure_ascii=False)}"
                     f"\nprovenance: {json.dumps(record['provenance'])}")
    return "\n\n".join(parts)
