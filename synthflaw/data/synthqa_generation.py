"""SynthQA and the rewritten set from real documents (the paper preset, ``data.source = "hub"``), and stage 01's
data on real corpora.

What comes from where:
- NonSynth, extra_natural, heldout_nonsynth and the source documents: a natural corpus
  (:func:`synthflaw.data.hub_corpus.corpus_documents`), disjoint sets.
- SynthQA: the `data.source_documents` source documents (disjoint from every other set, so, like the embedded
  study's SynthQA-only facts, the generator's pairs carry knowledge NonSynth lacks) turned into Q-A pairs by a
  generator with the fixed prompt `prompts/synthqa.txt`, in the paper's uniform format "Question: ...\nAnswer: ..."
  (template 0). The rewritten set is the same pairs turned back into prose with `prompts/rewrite.txt`: same
  knowledge, no template.
- The SFT set: a public SFT set (:func:`synthflaw.data.hub_corpus.public_sft_records`), or without
  `data.sft_dataset` the embedded study's.
- The instruction suite, the chat set and the knowledge benchmark are the embedded study's
  (:func:`synthflaw.data.embedded.build_embedded`): the package's own scoring. For real models the knowledge
  benchmark that matters is MMLU, run through lm-evaluation-harness (`evaluate.harness_tasks`).

The generator is any object with `.name`, `.max_new_tokens` and `.generate(prompts) -> list[Generation]`: in a
run, the chat client of :mod:`synthflaw.models.chat_client` (an OpenAI-compatible endpoint or a local model), which
stage 01 builds from the config and hands in.

Generation is resumable, like stanford_alpaca's: each batch of `data.generator_batch_size` documents is appended
to ``<out_dir>/generation/synthqa.jsonl`` (then ``rewritten.jsonl``) and flushed, one line per document with its
raw output and parsed pairs or failure reason, keyed by a hash of (generator, prompt, max_new_tokens). A re-run
skips every document whose line matches; only endpoint errors (connection, timeout, 429, 5xx) are attempted again,
since they say nothing about the document. Failed generations are counted in ``world["generation"]`` and listed
in ``generation/failures.jsonl``; they never become records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synthflaw import records
from synthflaw.data.embedded import build_embedded
from synthflaw.data.hub_corpus import (
    corpus_documents,
    drop_leaking_chats,
    public_sft_records,
)
from synthflaw.data.schema import SYNTHQA_TEMPLATES, training_texts
from synthflaw.hub import require_hub

PROMPTS_DIR = Path(__file__).parent / "prompts"
# Pairs asked for per source document; the integrator may turn this into a config field.
PAIRS_PER_DOCUMENT = 3
# Long web documents are cut (at a word boundary) before prompting: the pairs need a few paragraphs, and a bounded
# prompt keeps batched generation's memory predictable.
MAX_DOCUMENT_CHARS = 6000
# So many endpoint errors in a row mean the endpoint is down: stop instead of retrying every document.
MAX_CONSECUTIVE_ENDPOINT_ERRORS = 16
# Failure reasons that say nothing about the document: a re-run attempts those documents again.
RETRIED_ON_RESUME = ("endpoint_error",)


def load_prompt(name: str) -> str:
    """The fixed prompt `prompts/<name>.txt` (synthqa or rewrite), without its final newline."""
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the package was installed without its prompts")
    return path.read_text(encoding="utf-8").rstrip("\n")


def _cut(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[: head.rfind(" ")] if " " in head else head


def synthqa_prompt(document: str, n_pairs: int = PAIRS_PER_DOCUMENT) -> str:
    return load_prompt("synthqa").format(n_pairs=n_pairs, document=_cut(document))


def format_pair(question: str, answer: str) -> str:
    """A SynthQA pair in template 0, the paper's uniform format."""
    return SYNTHQA_TEMPLATES[0]["format"].format(question=question, answer=answer)


def rewrite_prompt(pairs: list[tuple[str, str]]) -> str:
    return load_prompt("rewrite").format(pairs="\n\n".join(format_pair(q, a) for q, a in pairs))


# A marker line: optional list numbering, bullets, markdown bold or heading hashes around "Question"/"Answer" and
# an optional number ("**Question 2:**", "1. Question:"); what follows the colon is the line's content.
_MARKER = re.compile(r"^[\s#*\-]*(?:\d+\s*[.)]\s*)?[*_]*\s*(question|answer)\s*\d*\s*[*_]*\s*:\s*[*_]*\s*(.*)$",
                     re.IGNORECASE)


def parse_qa_pairs(text: str, n_pairs: int = PAIRS_PER_DOCUMENT, truncated: bool = False) -> list[tuple[str, str]]:
    """The (question, answer) pairs in a generator's output, at most `n_pairs`, in order.

    A pair is a "Question:" line followed by an "Answer:" line; either may run over several lines, an answer ends
    at a blank line or the next question. A question without an answer, or the reverse, is dropped. When the
    output was cut at the token limit (`truncated`), its last pair may be cut mid-answer and is dropped too.
    """
    pairs: list[tuple[str, str]] = []
    question: list[str] | None = None
    answer: list[str] | None = None

    def close() -> None:
        if question is not None and answer is not None:
            q, a = " ".join(question).strip(), " ".join(answer).strip()
            if q and a:
                pairs.append((q, a))

    for line in text.splitlines():
        marker = _MARKER.match(line)
        if marker and marker.group(1).lower() == "question":
            close()
            question, answer = [marker.group(2).rstrip("*_ ")], None
        elif marker and question is not None and answer is None:
            answer = [marker.group(2).rstrip("*_ ")]
        elif marker:  # an answer with no open question
            close()
            question = answer = None
        elif not line.strip():
            if answer is not None:  # a blank line ends the answer: trailing chatter is not part of it
                close()
                question = answer = None
        elif answer is not None:
            answer.append(line.strip())
        elif question is not None:
            question.append(line.strip())
    close()
    if truncated and pairs:
        pairs = pairs[:-1]
    unique = list(dict.fromkeys(pairs))
    return unique[:n_pairs]


_PREAMBLE = re.compile(r"^(here is|here's|sure|certainly|of course)\b.*:\s*$", re.IGNORECASE)


def clean_rewrite(text: str, truncated: bool = False) -> tuple[str, str | None]:
    """(passage, failure reason or None) from a rewrite output: a leading "Here is the passage:" line is dropped,
    a passage cut at the token limit ends at its last full sentence, and a passage that still carries the Q-A
    template is a failure (the rewritten set must not)."""
    lines = text.strip().splitlines()
    if lines and _PREAMBLE.match(lines[0].strip()):
        lines = lines[1:]
    passage = "\n".join(lines).strip()
    if truncated:
        end = max(passage.rfind(mark) for mark in ".!?")
        passage = passage[: end + 1] if end >= 0 else ""
    if not passage:
        return "", "no_complete_sentence" if truncated and text.strip() else "empty_output"
    if any(marker.lower() in passage.lower() for marker in SYNTHQA_TEMPLATES[0]["markers"]):
        return "", "template_in_rewrite"
    return passage, None


@dataclass(frozen=True)
class Generation:
    """One generator output: its text, whether it hit the token limit, and an error (endpoint only) or None."""

    text: str
    truncated: bool = False
    error: str | None = None      # the failure reason: endpoint_error (retried on resume) or endpoint_rejected
    detail: str | None = None     # what went wrong, for failures.jsonl


# --------------------------------------------------------------------------------------------------------------
# Resumable generation
# --------------------------------------------------------------------------------------------------------------

def _job_key(generator, prompt: str) -> str:
    """What an output depends on: a line with another key (other generator, prompt or document) is not reused."""
    blob = json.dumps([generator.name, generator.max_new_tokens, prompt], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def generate_resumable(generator, jobs: list[tuple[str, str]], log_path: Path, batch_size: int,
                       interpret: Callable[[Generation], dict]) -> dict[str, dict]:
    """Run `generator` on (document_id, prompt) jobs, batch by batch, appending one line per document to `log_path`.

    `interpret` turns a Generation into the line's result fields, including "failure" (None on success). Returns
    document_id -> log line for every job. Lines already in the log with the same key are reused, except endpoint
    errors, which are attempted again.
    """
    if batch_size < 1:
        raise ValueError(f"data.generator_batch_size must be >= 1, got {batch_size}")
    keys = {doc_id: _job_key(generator, prompt) for doc_id, prompt in jobs}
    done = {}
    for line in records.read_log_lines(log_path):
        if keys.get(line["document_id"]) == line["key"] and line.get("failure") not in RETRIED_ON_RESUME:
            done[line["document_id"]] = line
    todo = [(doc_id, prompt) for doc_id, prompt in jobs if doc_id not in done]
    consecutive_errors = 0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        outputs = generator.generate([prompt for _, prompt in batch])
        lines = []
        for (doc_id, _), output in zip(batch, outputs):
            line = {"document_id": doc_id, "key": keys[doc_id], "generator": generator.name,
                    "output": output.text, "truncated": output.truncated, "detail": output.detail,
                    **interpret(output)}
            lines.append(line)
            done[doc_id] = line
            consecutive_errors = consecutive_errors + 1 if line["failure"] in RETRIED_ON_RESUME else 0
        records.append_jsonl(log_path, lines, sync=True)  # a kill loses at most the batch in flight
        if consecutive_errors >= MAX_CONSECUTIVE_ENDPOINT_ERRORS:
            raise RuntimeError(f"the generator endpoint failed {consecutive_errors} documents in a row (last: "
                               f"{done[batch[-1][0]]['detail']}); finished documents are kept in {log_path}: "
                               "fix the endpoint and re-run to resume")
    return {doc_id: done[doc_id] for doc_id, _ in jobs}


def _synthqa_result(n_pairs: int) -> Callable[[Generation], dict]:
    def interpret(output: Generation) -> dict:
        if output.error:
            return {"pairs": [], "failure": output.error}
        if not output.text.strip():
            return {"pairs": [], "failure": "empty_output"}
        pairs = parse_qa_pairs(output.text, n_pairs, truncated=output.truncated)
        if not pairs:
            complete = parse_qa_pairs(output.text, n_pairs)
            return {"pairs": [], "failure": "no_complete_pairs" if complete else "no_pairs"}
        return {"pairs": [list(p) for p in pairs], "failure": None}
    return interpret


def _rewrite_result(output: Generation) -> dict:
    if output.error:
        return {"text": None, "failure": output.error}
    passage, failure = clean_rewrite(output.text, truncated=output.truncated)
    return {"text": passage or None, "failure": failure}


def _failure_stats(lines: list[dict]) -> tuple[int, dict[str, int]]:
    reasons = Counter(line["failure"] for line in lines if line["failure"])
    return sum(reasons.values()), dict(sorted(reasons.items()))


# --------------------------------------------------------------------------------------------------------------
# Stage 01, hub path
# --------------------------------------------------------------------------------------------------------------

def check_hub_data(data_cfg, generator_given: bool = False) -> None:
    """Every problem of a ``data.source = "hub"`` configuration, before any work: bad counts, no corpus, no generator,
    a hub name while the hub is off (each error names its config key). `generator_given`: the generator is already
    built, so its settings are not checked."""
    problems = []
    if not data_cfg.natural_dataset:
        problems.append("data.natural_dataset is empty: give a hub id (e.g. HuggingFaceFW/fineweb-edu), a local "
                        "folder or a .jsonl/.json/.parquet file")
    for name in ("nonsynth_docs", "extra_natural_docs", "heldout_docs"):
        if getattr(data_cfg, name) < 0:
            problems.append(f"data.{name} must be >= 0")
    if data_cfg.source_documents < 1:
        problems.append("data.source_documents must be >= 1: SynthQA is generated from them")
    if data_cfg.generator_batch_size < 1:
        problems.append("data.generator_batch_size must be >= 1")
    if data_cfg.generator_max_new_tokens < 1:
        problems.append("data.generator_max_new_tokens must be >= 1")
    if not data_cfg.generator and not generator_given:
        problems.append("data.generator is empty: name a local model folder or hub id, or the endpoint's model")
    if data_cfg.sft_dataset and data_cfg.sft_examples < 1:
        problems.append("data.sft_examples must be >= 1 with data.sft_dataset")
    if problems:
        raise ValueError("invalid configuration for data.source=hub:\n  - " + "\n  - ".join(problems))
    # Every hub name of stage 01 is checked before any work, so an offline machine fails at once.
    require_hub("data.natural_dataset", data_cfg.natural_dataset)
    require_hub("data.sft_dataset", data_cfg.sft_dataset)
    if not data_cfg.generator_endpoint and not generator_given:
        require_hub("data.generator", data_cfg.generator)


def build_from_hub(cfg, out_dir: Path, generator) -> dict:
    """Every data set of stage 01 from a natural corpus and a generator; same keys as `build_embedded`.

    Writes only under ``<out_dir>/generation/`` (the resumable generation logs, failures.jsonl and the source
    documents SynthQA was generated from); the returned data sets are written by `schema.write_data`.
    `generator`: anything with `.name`, `.max_new_tokens` and `.generate(prompts) -> list[Generation]` (stage 01
    passes the chat client the config describes; a local model loads at its first `.generate`, so only once the
    corpus is known to suffice).
    """
    data_cfg, seed = cfg.data, cfg.seed
    check_hub_data(data_cfg, generator_given=True)
    gen_dir = Path(out_dir) / "generation"
    gen_dir.mkdir(parents=True, exist_ok=True)
    natural = corpus_documents(data_cfg, seed)
    sources = natural["source"]
    records.write_jsonl(gen_dir / "source_documents.jsonl", sources)
    batch = data_cfg.generator_batch_size

    qa_lines = generate_resumable(generator, [(d["id"], synthqa_prompt(d["text"])) for d in sources],
                                  gen_dir / "synthqa.jsonl", batch, _synthqa_result(PAIRS_PER_DOCUMENT))
    synthqa, pair_ids = [], {}
    for doc in sources:
        for question, answer in qa_lines[doc["id"]]["pairs"]:
            record_id = f"synthqa-{len(synthqa):06d}"
            pair_ids.setdefault(doc["id"], []).append(record_id)
            synthqa.append({"id": record_id, "text": format_pair(question, answer), "question": question,
                            "answer": answer,
                            "provenance": {"source": "generator", "generator": generator.name,
                                           "document_id": doc["id"], "template_id": 0, "seed": seed}})

    with_pairs = [d for d in sources if qa_lines[d["id"]]["pairs"]]
    rw_lines = generate_resumable(
        generator, [(d["id"], rewrite_prompt([tuple(p) for p in qa_lines[d["id"]]["pairs"]])) for d in with_pairs],
        gen_dir / "rewritten.jsonl", batch, _rewrite_result)
    rewritten = []
    for doc in with_pairs:
        if rw_lines[doc["id"]]["text"]:
            rewritten.append({"id": f"rewritten-{len(rewritten):06d}", "text": rw_lines[doc["id"]]["text"],
                              "provenance": {"source": "generator", "generator": generator.name,
                                             "document_id": doc["id"], "synthqa_ids": pair_ids[doc["id"]],
                                             "seed": seed}})

    failures = [{"stage": stage, "document_id": line["document_id"], "reason": line["failure"],
                 "detail": line["detail"], "output": line["output"]}
                for stage, lines in (("synthqa", qa_lines), ("rewrite", rw_lines))
                for line in lines.values() if line["failure"]]
    records.write_jsonl(gen_dir / "failures.jsonl", failures)
    n_failed, reasons = _failure_stats(list(qa_lines.values()))
    n_rw_failed, rw_reasons = _failure_stats(list(rw_lines.values()))
    stats = {"generator": generator.name, "documents": len(sources), "pairs": len(synthqa), "failures": n_failed,
             "failure_reasons": reasons, "rewritten": len(rewritten), "rewrite_failures": n_rw_failed,
             "rewrite_failure_reasons": rw_reasons}
    if not synthqa:
        warnings.warn(f"the generator {generator.name!r} produced no parseable Q-A pair on {len(sources)} "
                      f"documents ({reasons}); see {gen_dir / 'failures.jsonl'}", stacklevel=2)

    # The embedded suites come from the generated world; its own natural documents are not needed.
    embedded = build_embedded(
        dataclasses.replace(data_cfg, nonsynth_docs=0, extra_natural_docs=0, heldout_docs=0,
                            sft_examples=0 if data_cfg.sft_dataset else data_cfg.sft_examples), seed)
    sft, sft_stats = embedded["sft"], None
    if data_cfg.sft_dataset:
        sft, sft_stats = public_sft_records(data_cfg, seed)
        prompts = ([r["question"] for r in embedded["benchmark"]] + [r["prompt"] for r in embedded["instruction_suite"]]
                   + [r["prompt"] for r in embedded["learnable_suite"]] + [r["prompt"] for r in embedded["chat"]])
        sft, sft_stats["dropped_evaluation_prompt"] = drop_leaking_chats(sft, prompts)
        if not sft:
            raise ValueError(f"every chat of {data_cfg.sft_dataset!r} contains an evaluation prompt: use another "
                             "SFT set")
    data: dict[str, object] = {
        "nonsynth": natural["nonsynth"], "extra_natural": natural["extra"], "heldout_nonsynth": natural["heldout"],
        "synthqa": synthqa, "rewritten": rewritten, "sft": sft,
        **{name: embedded[name] for name in ("benchmark", "learnable_suite", "instruction_suite", "chat")},
    }
    # As in the embedded study: a held-out document found inside training text would not be held out.
    corpus = "\n\x00".join(training_texts(data))
    data["heldout_nonsynth"] = [r for r in natural["heldout"] if r["text"] not in corpus]
    data["world"] = {**embedded["world"],
                     "natural_corpus": {"dataset": data_cfg.natural_dataset, "split": data_cfg.natural_split,
                                        "text_field": data_cfg.natural_text_field},
                     "generation": stats, "sft_dataset": sft_stats}
    data["synthqa_templates"] = {"templates": [SYNTHQA_TEMPLATES[0]]}
    return data
