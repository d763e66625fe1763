"""Stage 01 on real data (the paper preset, ``data.source = "hub"``): a natural corpus and a generator model.

What comes from where:
- NonSynth, extra_natural and heldout_nonsynth are documents of a natural corpus (`data.natural_dataset`: a hub id,
  streamed; or a local folder or .jsonl/.json/.parquet/.csv file), taken in a seeded random order, exact duplicates
  and empty texts skipped.
- SynthQA: `data.source_documents` further documents of the same corpus (disjoint from every other set, so, like
  the embedded study's SynthQA-only facts, the generator's pairs carry knowledge NonSynth lacks) are turned into
  Q-A pairs by the generator with the fixed prompt `prompts/synthqa.txt`, in the paper's uniform format
  "Question: ...\\nAnswer: ..." (template 0). The rewritten set is the same pairs turned back into prose with
  `prompts/rewrite.txt`: same knowledge, no template.
- The SFT set: `data.sft_examples` chats of a public SFT set (`data.sft_dataset`, e.g. HuggingFaceTB/smoltalk;
  a "messages" column of [{"role", "content"}, ...]) in a seeded random order, in the package's sft.jsonl schema
  with no constraints; chats that are not user/assistant(/system) conversations, or that contain an evaluation
  prompt, are skipped and counted. Without `data.sft_dataset`, the embedded study's SFT set.
- The instruction suite, the chat set and the knowledge benchmark are the embedded study's
  (:func:`synthflaw.generate.build_embedded`): the package's own scoring. For real models the knowledge benchmark
  that matters is MMLU, run through lm-evaluation-harness (`evaluate.harness_tasks`).

The generator is an OpenAI-compatible chat-completions endpoint (`data.generator_endpoint`, the key read from the
environment variable `data.generator_api_key_env` at each call and never stored, logged or written) or, without an
endpoint, a local transformers causal LM (`data.generator`), greedy and batched with left padding.

Generation is resumable, like stanford_alpaca's: each batch of `data.generator_batch_size` documents is appended
to ``<out_dir>/generation/synthqa.jsonl`` (then ``rewritten.jsonl``) and flushed, one line per document with its
raw output and parsed pairs or failure reason, keyed by a hash of (generator, prompt, max_new_tokens). A re-run
skips every document whose line matches; only endpoint errors (connection, timeout, 429, 5xx) are attempted again,
since they say nothing about the document. Failed generations are counted in ``world["generation"]`` and listed
in ``generation/failures.jsonl``; they never become records.

Hub names are only touched when the hub is on: synthflaw sets HF_HUB_OFFLINE=1 unless told otherwise, and a name
that is not a local path then fails at once (:func:`require_hub`), naming the config key and the fix, instead of
letting a loader hang on the network or fail deep inside `huggingface_hub`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthflaw import generate, records

PROMPTS_DIR = Path(__file__).parent / "prompts"
# Pairs asked for per source document; the integrator may turn this into a config field.
PAIRS_PER_DOCUMENT = 3
# Long web documents are cut (at a word boundary) before prompting: the pairs need a few paragraphs, and a bounded
# prompt keeps batched generation's memory predictable.
MAX_DOCUMENT_CHARS = 6000
# Seeded shuffle buffer for streamed hub corpora (a full shuffle would need the whole corpus on disk).
SHUFFLE_BUFFER = 10_000
# So many endpoint errors in a row mean the endpoint is down: stop instead of retrying every document.
MAX_CONSECUTIVE_ENDPOINT_ERRORS = 16
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Failure reasons that say nothing about the document: a re-run attempts those documents again.
RETRIED_ON_RESUME = ("endpoint_error",)
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHAT_ROLES = ("system", "user", "assistant")
NATURAL_KEYS = ("data.natural_dataset", "data.natural_split", "data.natural_text_field")
SFT_KEYS = ("data.sft_dataset", "data.sft_split", "data.sft_messages_field")


class HubOffline(RuntimeError):
    """A configured name is a hub id, but the hub is switched off (HF_HUB_OFFLINE=1)."""


def hub_offline() -> bool:
    """Whether hub downloads are off: HF_HUB_OFFLINE now, or as `huggingface_hub` read it when it was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def require_hub(key: str, name: str) -> None:
    """Raise HubOffline at once when `name` (the value of config key `key`) is not a local path and the hub is off.

    Called before any loader is given a hub id, so an offline machine gets this message instead of a hang or a
    cache-miss error from deep inside `huggingface_hub`.
    """
    if name and not Path(name).expanduser().exists() and hub_offline():
        raise HubOffline(
            f"{key}={name!r} is not a local path, so it would be downloaded from the Hugging Face hub, but the hub is "
            "off (HF_HUB_OFFLINE=1, synthflaw's default). Run with HF_HUB_OFFLINE=0 set in the environment before "
            f"Python starts (e.g. `HF_HUB_OFFLINE=0 synthflaw run --preset paper ...`), or set {key} to a local "
            "folder or file.")


# --------------------------------------------------------------------------------------------------------------
# The natural corpus
# --------------------------------------------------------------------------------------------------------------

def _seeded_rows(dataset: str, split: str, text_field: str, seed: int, *, config_name: str = "",
                 keys: tuple[str, str, str] = NATURAL_KEYS) -> Iterator[tuple[int, dict]]:
    """(row, example) pairs of a data set in a seeded random order; `keys` name its config keys in errors
    (dataset, split, column).

    Local data is loaded whole and permuted, `row` being the index in the split. A hub id is streamed (a web
    corpus does not fit on disk) through a seeded shuffle buffer, `row` being the position in that seeded stream.
    """
    import datasets

    dataset_key, split_key, field_key = keys
    path = Path(dataset).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{dataset_key}={dataset!r}: unsupported file type {path.suffix!r}; give a "
                             f"{', '.join(_FILE_BUILDERS)} file, a folder, or a hub id")
        # data_files keyed by the split, so that `data.natural_split` names the file's only split
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    elif path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # a save_to_disk folder
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{split_key}={split!r} is not in {dataset!r}; its splits: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(path), split=split)
    else:
        require_hub(dataset_key, dataset)
        stream = datasets.load_dataset(dataset, config_name or None, split=split, streaming=True)
        stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        for row, example in enumerate(stream):
            if row == 0 and text_field not in example:
                raise ValueError(f"{field_key}={text_field!r} is not a column of {dataset!r}; its "
                                 f"columns: {', '.join(example)}")
            yield row, example
        return
    if text_field not in ds.column_names:
        raise ValueError(f"{field_key}={text_field!r} is not a column of {dataset!r}; its columns: "
                         f"{', '.join(ds.column_names)}")
    for row in np.random.default_rng(seed).permutation(len(ds)):
        yield int(row), ds[int(row)]


def corpus_documents(data_cfg, seed: int) -> dict[str, list[dict]]:
    """The corpus's documents split into heldout, source (for SynthQA), nonsynth and extra sets, disjoint.

    The sets are cut from one seeded order in that order, so adding source documents keeps the earlier ones
    (and their generations) and only shifts NonSynth.
    """
    sizes = {"heldout": data_cfg.heldout_docs, "source": data_cfg.source_documents,
             "nonsynth": data_cfg.nonsynth_docs, "extra": data_cfg.extra_natural_docs}
    needed = sum(sizes.values())
    docs: list[dict] = []
    seen: set[str] = set()
    for row, example in _seeded_rows(data_cfg.natural_dataset, data_cfg.natural_split,
                                     data_cfg.natural_text_field, seed):
        text = example[data_cfg.natural_text_field]
        if not isinstance(text, str) or not text.strip() or text.strip() in seen:
            continue  # an exact duplicate could land in both a training and the held-out set
        text = text.strip()
        seen.add(text)
        provenance = {"source": "hub", "dataset": data_cfg.natural_dataset, "split": data_cfg.natural_split,
                      "row": row, "seed": seed}
        if isinstance(example.get("id"), (str, int)):
            provenance["source_id"] = example["id"]
        docs.append({"text": text, "provenance": provenance})
        if len(docs) == needed:
            break
    if len(docs) < needed:
        raise ValueError(
            f"the natural corpus {data_cfg.natural_dataset!r} (split {data_cfg.natural_split!r}) has "
            f"{len(docs)} usable documents (non-empty, distinct {data_cfg.natural_text_field!r}), but "
            f"data.heldout_docs={sizes['heldout']} + data.source_documents={sizes['source']} + "
            f"data.nonsynth_docs={sizes['nonsynth']} + data.extra_natural_docs={sizes['extra']} = {needed} are "
            "needed: lower these counts or use a larger corpus")
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [{"id": f"{name}-{i:06d}", **doc} for i, doc in enumerate(docs[start:start + size])]
        start += size
    return out


# --------------------------------------------------------------------------------------------------------------
# The public SFT set
# --------------------------------------------------------------------------------------------------------------

def chat_messages(value) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a chat the SFT stage can train on, else (None, the reason it is skipped).

    A chat is a list of {"role", "content"} turns with roles system/user/assistant (other keys of a turn are
    dropped), a user turn first after any system turns, at least one assistant turn, and no empty assistant turn.
    """
    if not isinstance(value, list) or not value:
        return None, "not_a_chat"
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return None, "not_a_chat"
        if turn.get("role") not in CHAT_ROLES:
            return None, "unknown_role"
        if turn["role"] == "assistant" and not turn["content"].strip():
            return None, "empty_assistant_turn"
        messages.append({"role": turn["role"], "content": turn["content"]})
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        return None, "no_user_turn_first"
    if "assistant" not in roles:
        return None, "no_assistant_turn"
    return messages, None


def public_sft_records(data_cfg, seed: int) -> tuple[list[dict], dict]:
    """`data.sft_examples` chats of the public SFT set `data.sft_dataset` in the sft.jsonl schema, and counts.

    Rows are read in a seeded random order; a chat `chat_messages` rejects, or an exact duplicate of an earlier one,
    is skipped and counted by reason. Records: {"id", "messages", "constraints": [] (public chats carry no
    verifiable constraints), "provenance": {"source": "hub", "dataset", "config", "split", "row", "seed"[,
    "source_id"]}}. Raises when the set has fewer usable chats than asked for.
    """
    wanted = data_cfg.sft_examples
    records, skipped, seen = [], Counter(), set()
    rows = _seeded_rows(data_cfg.sft_dataset, data_cfg.sft_split, data_cfg.sft_messages_field, seed,
                        config_name=data_cfg.sft_dataset_config, keys=SFT_KEYS)
    for row, example in rows:
        messages, reason = chat_messages(example[data_cfg.sft_messages_field])
        if messages is not None:
            fingerprint = json.dumps(messages, ensure_ascii=False)
            reason = "duplicate" if fingerprint in seen else None
            seen.add(fingerprint)
        if reason:
            skipped[reason] += 1
            continue
        provenance = {"source": "hub", "dataset": data_cfg.sft_dataset, "config": data_cfg.sft_dataset_config,
                      "split": data_cfg.sft_split, "row": row, "seed": seed}
        if isinstance(example.get("id"), (str, int)):
            provenance["source_id"] = example["id"]
        records.append({"id": f"sft-{len(records):06d}", "messages": messages, "constraints": [],
                        "provenance": provenance})
        if len(records) == wanted:
            break
    if len(records) < wanted:
        raise ValueError(f"the SFT set {data_cfg.sft_dataset!r} (split {data_cfg.sft_split!r}) has {len(records)} "
                         f"usable chats (skipped: {dict(skipped) or 'none'}), fewer than data.sft_examples={wanted}: "
                         "lower data.sft_examples or use a larger set")
    return records, {"dataset": data_cfg.sft_dataset, "config": data_cfg.sft_dataset_config,
                     "split": data_cfg.sft_split, "records": len(records), "skipped": dict(sorted(skipped.items()))}


def drop_leaking_chats(sft: list[dict], prompts: list[str]) -> tuple[list[dict], int]:
    """The chats none of whose turns contains an evaluation prompt, and how many were dropped: a public set may hold
    a prompt of the embedded suites verbatim, and training on it would make that test item a seen one."""
    # One search per prompt through all chats joined by NULs (which no prompt contains), not one per chat and prompt.
    texts = ["\x00".join(m["content"] for m in r["messages"]) for r in sft]
    starts = list(itertools.accumulate((len(t) + 1 for t in texts[:-1]), initial=0))
    corpus = "\x00".join(texts)
    leaking = set()
    for prompt in prompts:
        at = corpus.find(prompt)
        while at != -1:
            leaking.add(bisect.bisect_right(starts, at) - 1)
            at = corpus.find(prompt, at + 1)
    return [r for i, r in enumerate(sft) if i not in leaking], len(leaking)


# --------------------------------------------------------------------------------------------------------------
# Prompts and parsing
# --------------------------------------------------------------------------------------------------------------

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
    return generate.SYNTHQA_TEMPLATES[0]["format"].format(question=question, answer=answer)


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
    if any(marker.lower() in passage.lower() for marker in generate.SYNTHQA_TEMPLATES[0]["markers"]):
        return "", "template_in_rewrite"
    return passage, None


# --------------------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """One generator output: its text, whether it hit the token limit, and an error (endpoint only) or None."""

    text: str
    truncated: bool = False
    error: str | None = None      # the failure reason: endpoint_error (retried on resume) or endpoint_rejected
    detail: str | None = None     # what went wrong, for failures.jsonl


class EndpointGenerator:
    """Greedy generation through an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, TGI, llama.cpp).

    `base_url` is e.g. ``https://api.openai.com/v1`` (a URL already ending in /chat/completions is used as is).
    The key is read from the environment variable `api_key_env` at each call, sent only in the Authorization
    header and never kept on the object; a server on localhost needs none. Connection errors, timeouts, 429 and
    5xx are retried with exponential backoff (`retry_wait` * 2^attempt); 401/403/404 are configuration errors and
    raise; other 4xx fail the document. A batch's requests run concurrently.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str, max_new_tokens: int, *, concurrency: int = 8,
                 timeout: float = 300.0, max_retries: int = 3, retry_wait: float = 2.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"data.generator_endpoint must be an http(s) URL such as https://api.openai.com/v1, "
                             f"got {base_url!r}")
        if not model:
            raise ValueError("data.generator must name the endpoint's model (e.g. gpt-4o-mini)")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.name = model
        self.api_key_env = api_key_env
        self.max_new_tokens = max_new_tokens
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_wait = retry_wait
        self.needs_key = urllib.parse.urlparse(self.url).hostname not in LOCAL_HOSTS
        self._api_key()  # a missing key fails here, before any corpus is loaded or document generated

    def __repr__(self) -> str:
        return f"EndpointGenerator(url={self.url!r}, model={self.name!r}, api_key_env={self.api_key_env!r})"

    def _api_key(self) -> str | None:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key and self.needs_key:
            if not self.api_key_env:
                raise RuntimeError("data.generator_api_key_env is empty: name the environment variable that holds "
                                   "the endpoint's API key (e.g. OPENAI_API_KEY); only localhost needs no key")
            raise RuntimeError(f"the generator endpoint's API key is not set: export {self.api_key_env}=... (the "
                               "variable data.generator_api_key_env names); only an endpoint on localhost needs no key")
        return key

    def _complete(self, prompt: str) -> Generation:
        key = self._api_key()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps({"model": self.name, "temperature": 0, "max_tokens": self.max_new_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")

        def scrub(message: str) -> str:  # a server may echo the request; the key must not reach a file
            return message.replace(key, "[api key]") if key else message

        detail = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_wait * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    payload = json.loads(answer.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = scrub(f"HTTP {error.code}: {error.read().decode('utf-8', 'replace')[:300]}")
                if error.code in (401, 403, 404):
                    raise RuntimeError(f"generator endpoint {self.url} refused the request ({detail}); check "
                                       f"the URL, data.generator and the key in ${self.api_key_env}") from None
                if error.code == 429 or error.code >= 500:
                    continue
                return Generation("", error="endpoint_rejected", detail=detail)
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as error:
                detail = scrub(f"{type(error).__name__}: {error}")
                continue
            try:
                choice = payload["choices"][0]
                text = choice["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                detail = scrub(f"no chat completion in the answer: {str(payload)[:300]}")
                continue
            return Generation(text, truncated=choice.get("finish_reason") == "length")
        return Generation("", error="endpoint_error", detail=f"after {self.max_retries + 1} attempts: {detail}")

    def generate(self, prompts: list[str]) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(self._complete, prompts))


class LocalGenerator:
    """Greedy generation with a local transformers causal LM (a hub id or a folder), batched with left padding.

    Prompts go through the tokenizer's chat template when it has one (instruct models), else they are plain text
    after BOS. Generation stops at the end-of-turn or EOS tokens (:func:`synthflaw.evaluate._generate_ids`).
    """

    def __init__(self, model_name_or_path: str, max_new_tokens: int, *, device: str | None = None,
                 dtype: str = "auto") -> None:
        # torch and transformers load only for a local generator: the endpoint path needs neither
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        require_hub("data.generator", str(model_name_or_path))
        self.name = str(model_name_or_path)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.model = AutoModelForCausalLM.from_pretrained(self.name, dtype=dtype)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    def __repr__(self) -> str:
        return f"LocalGenerator({self.name!r})"

    def _text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
        return (self.tokenizer.bos_token or "") + prompt + "\n"

    def generate(self, prompts: list[str]) -> list[Generation]:
        from synthflaw.evaluate import _generate_ids

        ids, counts = _generate_ids(self.model, self.tokenizer, [self._text(p) for p in prompts],
                                    self.max_new_tokens, max(1, len(prompts)))
        # no stop token within the budget: the output was cut
        return [Generation(self.tokenizer.decode(seq, skip_special_tokens=True).strip(),
                           truncated=len(seq) == n == self.max_new_tokens) for seq, n in zip(ids, counts)]


def make_generator(data_cfg):
    """The endpoint generator when `data.generator_endpoint` is set, else the local model `data.generator`."""
    if data_cfg.generator_endpoint:
        return EndpointGenerator(data_cfg.generator_endpoint, data_cfg.generator, data_cfg.generator_api_key_env,
                                 data_cfg.generator_max_new_tokens, concurrency=data_cfg.generator_batch_size)
    if not data_cfg.generator:
        raise ValueError("data.generator is empty: name a local model folder or hub id (e.g. "
                         "Qwen/Qwen2.5-1.5B-Instruct), or set data.generator_endpoint and the model name")
    return LocalGenerator(data_cfg.generator, data_cfg.generator_max_new_tokens)


# --------------------------------------------------------------------------------------------------------------
# Resumable generation
# --------------------------------------------------------------------------------------------------------------

def _read_log(path: Path) -> list[dict]:
    """The complete lines of a generation log; a line half-written by a kill is cut off so appends stay valid."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return [json.loads(line) for line in raw[:end].decode("utf-8").splitlines() if line.strip()]


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
    for line in _read_log(log_path):
        if keys.get(line["document_id"]) == line["key"] and line.get("failure") not in RETRIED_ON_RESUME:
            done[line["document_id"]] = line
    todo = [(doc_id, prompt) for doc_id, prompt in jobs if doc_id not in done]
    consecutive_errors = 0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            outputs = generator.generate([prompt for _, prompt in batch])
            for (doc_id, _), output in zip(batch, outputs):
                line = {"document_id": doc_id, "key": keys[doc_id], "generator": generator.name,
                        "output": output.text, "truncated": output.truncated, "detail": output.detail,
                        **interpret(output)}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                done[doc_id] = line
                consecutive_errors = consecutive_errors + 1 if line["failure"] in RETRIED_ON_RESUME else 0
            fh.flush()
            os.fsync(fh.fileno())
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

def _check(data_cfg, generator) -> None:
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
    if generator is None and not data_cfg.generator:
        problems.append("data.generator is empty: name a local model folder or hub id, or the endpoint's model")
    if data_cfg.sft_dataset and data_cfg.sft_examples < 1:
        problems.append("data.sft_examples must be >= 1 with data.sft_dataset")
    if problems:
        raise ValueError("invalid configuration for data.source=hub:\n  - " + "\n  - ".join(problems))
    # Every hub name of stage 01 is checked before any work, so an offline machine fails at once.
    require_hub("data.natural_dataset", data_cfg.natural_dataset)
    require_hub("data.sft_dataset", data_cfg.sft_dataset)
    if generator is None and not data_cfg.generator_endpoint:
        require_hub("data.generator", data_cfg.generator)


def build_from_hub(cfg, out_dir: Path, generator=None) -> dict:
    """Every data set of stage 01 from a natural corpus and a generator; same keys as `generate.build_embedded`.

    Writes only under ``<out_dir>/generation/`` (the resumable generation logs, failures.jsonl and the source
    documents SynthQA was generated from); the returned data sets are written by `generate.write_data`.
    `generator` (anything with `.name`, `.max_new_tokens` and `.generate(prompts) -> list[Generation]`) overrides
    the one the config describes.
    """
    data_cfg, seed = cfg.data, cfg.seed
    _check(data_cfg, generator)
    gen_dir = Path(out_dir) / "generation"
    gen_dir.mkdir(parents=True, exist_ok=True)
    if generator is None and data_cfg.generator_endpoint:
        generator = make_generator(data_cfg)  # cheap: a missing API key fails before the corpus is read
    natural = corpus_documents(data_cfg, seed)
    sources = natural["source"]
    records.write_jsonl(gen_dir / "source_documents.jsonl", sources)
    if generator is None:
        generator = make_generator(data_cfg)  # a local model loads only once the corpus is known to suffice
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
    embedded = generate.build_embedded(
        dataclasses.replace(data_cfg, nonsynth_docs=0, extra_natural_docs=0, heldout_docs=0,
                            sft_examples=0 if data_cfg.sft_dataset else data_cfg.sft_examples), seed)
    sft, sft_stats = embedded["sft"], None
    if data_cfg.sft_dataset:
        sft, sft_stats = public_sft_records(data_cfg, seed)
        prompts = ([r["question"] for r in embedded["benchmark"]] + [r["prompt"] for r in embedded["instruction_suite"]]
                   + [r["prompt"] for r in embedded["chat"]])
        sft, sft_stats["dropped_evaluation_prompt"] = drop_leaking_chats(sft, prompts)
        if not sft:
            raise ValueError(f"every chat of {data_cfg.sft_dataset!r} contains an evaluation prompt: use another "
                             "SFT set")
    data: dict[str, object] = {
        "nonsynth": natural["nonsynth"], "extra_natural": natural["extra"], "heldout_nonsynth": natural["heldout"],
        "synthqa": synthqa, "rewritten": rewritten, "sft": sft,
        **{name: embedded[name] for name in ("benchmark", "instruction_suite", "chat")},
    }
    # As in the embedded study: a held-out document found inside training text would not be held out.
    corpus = "\n\x00".join(generate.training_texts(data))
    data["heldout_nonsynth"] = [r for r in natural["heldout"] if r["text"] not in corpus]
    data["world"] = {**embedded["world"],
                     "natural_corpus": {"dataset": data_cfg.natural_dataset, "split": data_cfg.natural_split,
                                        "text_field": data_cfg.natural_text_field},
                     "generation": stats, "sft_dataset": sft_stats}
    data["synthqa_templates"] = {"templates": [generate.SYNTHQA_TEMPLATES[0]]}
    return data
