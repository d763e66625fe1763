"""Real corpora for stage 01 on real data (the paper preset, ``data.source = "hub"``): the natural corpus and a
public SFT set, from the Hugging Face hub or local files.

- NonSynth, extra_natural and heldout_nonsynth (and the source documents SynthQA is generated from) are documents
  of a natural corpus (`data.natural_dataset`: a hub id, streamed; or a local folder or .jsonl/.json/.parquet/.csv
  file), taken in a seeded random order, exact duplicates and empty texts skipped, cut into disjoint sets.
- The SFT set: `data.sft_examples` chats of a public SFT set (`data.sft_dataset`, e.g. HuggingFaceTB/smoltalk; a
  "messages" column of [{"role", "content"}, ...]) in a seeded random order, in the package's sft.jsonl schema with
  no constraints; chats that are not user/assistant(/system) conversations, or that contain an evaluation prompt,
  are skipped and counted.

Hub names are only touched when the hub is on (:func:`synthflaw.hub.require_hub`).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from synthflaw.hub import require_hub

# Seeded shuffle buffer for streamed hub corpora (a full shuffle would need the whole corpus on disk).
SHUFFLE_BUFFER = 10_000
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHAT_ROLES = ("system", "user", "assistant")
NATURAL_KEYS = ("data.natural_dataset", "data.natural_split", "data.natural_text_field")
SFT_KEYS = ("data.sft_dataset", "data.sft_split", "data.sft_messages_field")


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
