"""Pre-training on packed text (stage 03), and continued pre-training (CPT) per branch (stage 04).

Branches (the paper's CPT runs, plus two controls this project adds):
- `natural`: NonSynth only (the paper's control).
- `synthetic`: NonSynth with SynthQA mixed in at `synthetic_fraction` of the tokens (the paper's 2% run).
- `rewritten`: NonSynth with the same facts as SynthQA rewritten in diverse natural styles, at the same fraction
  (separates the Q-A format from the knowledge it carries).
- `more_natural`: extra natural data, trained on top of the `natural` checkpoint (the paper's "300B more natural
  tokens" alternative to unlearning). The caller passes the natural branch's model; its budget is the caller's.

Every branch trains on exactly the same number of tokens: the budget becomes a number of optimizer steps over
fully packed blocks (`steps_for_token_budget`), independent of the corpus.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import numpy as np

from synthflaw.config import BRANCHES
from synthflaw.training.scaffold import data_parallel_processes, train_causal_lm, write_summary


def pack_texts(tokenizer, texts: list[str], block_size: int) -> datasets.Dataset:
    """Tokenise `texts` once, join them with eos after every document and cut the stream into full blocks.

    Every block holds exactly `block_size` real tokens, so a step of `batch_size` blocks trains on exactly
    `batch_size * block_size` tokens and never on padding. The tail that does not fill a block is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: a causal LM block needs at least 2 tokens (use e.g. 256).")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token to separate packed documents; set tokenizer.eos_token.")
    ids = document_token_ids(tokenizer, texts)
    stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int64)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"The corpus has {len(stream)} tokens, fewer than one block of {block_size}: pass more text or a "
            "smaller block_size."
        )
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)
    return datasets.Dataset.from_dict({"input_ids": blocks.tolist()})


def document_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds the eos separators itself)."""
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to tokenise: pass a non-empty list of documents.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Document {i} is a {type(text).__name__}, not a string; pass the documents' text.")
    ids: list[list[int]] = []
    # Batches of 1000 keep the fast tokenizer parallel without a second full copy of the corpus in flight.
    for start in range(0, len(texts), 1000):
        ids.extend(tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"])
    return ids


def steps_for_token_budget(
    max_tokens: int, *, block_size: int, batch_size: int, num_processes: int = 1, gradient_accumulation_steps: int = 1
) -> int:
    """Optimizer steps that train on at most `max_tokens` tokens of packed data.

    One step consumes `block_size * batch_size * num_processes * gradient_accumulation_steps` tokens, all real
    (packed blocks have no padding), so two runs given the same budget and batch shape train on exactly
    `steps * tokens_per_step` tokens each, whatever their corpus.
    """
    tokens_per_step = block_size * batch_size * num_processes * gradient_accumulation_steps
    steps = max_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(
            f"max_tokens={max_tokens} is less than one optimizer step of {tokens_per_step} tokens "
            f"(block {block_size} x batch {batch_size} x {num_processes} processes x {gradient_accumulation_steps} "
            "accumulation): raise max_tokens or shrink the batch."
        )
    return steps


def branch_mixture(
    branch: str,
    nonsynth: list[str],
    synthqa: list[str],
    rewritten: list[str],
    extra_natural: list[str],
    synthetic_fraction: float,
    seed: int,
    *,
    tokenizer,
) -> tuple[list[str], dict]:
    """The documents of one CPT branch, in a seeded shuffled order (see `mix_at_token_fraction` for the mixing), and
    the corpus's token counts: natural, mixed-in and the realised mixed-in fraction."""
    if branch not in BRANCHES:
        raise ValueError(f"Unknown CPT branch {branch!r}: choose one of {', '.join(BRANCHES)}.")
    if branch == "natural":
        return mix_at_token_fraction(tokenizer, _require(nonsynth, "nonsynth", branch), [], 0.0, seed)
    if branch == "more_natural":
        return mix_at_token_fraction(tokenizer, _require(extra_natural, "extra_natural", branch), [], 0.0, seed)
    mixed_in_name = "synthqa" if branch == "synthetic" else "rewritten"
    mixed_in = synthqa if branch == "synthetic" else rewritten
    if not 0.0 < synthetic_fraction < 1.0:
        raise ValueError(
            f"synthetic_fraction={synthetic_fraction}: the {branch} branch mixes in a share of the tokens strictly "
            "between 0 and 1 (the paper: 0.02)."
        )
    natural = _require(nonsynth, "nonsynth", branch)
    mixed_in = _require(mixed_in, mixed_in_name, branch)
    return mix_at_token_fraction(tokenizer, natural, mixed_in, synthetic_fraction, seed)


def _require(texts: list[str], name: str, branch: str) -> list[str]:
    if not texts:
        raise ValueError(f"The {branch} branch needs {name} documents, but none were given: pass the {name} texts.")
    return list(texts)


def mix_at_token_fraction(
    tokenizer, natural: list[str], mixed_in: list[str], fraction: float, seed: int
) -> tuple[list[str], dict]:
    """All `natural` documents plus `mixed_in` documents making up `fraction` of the corpus's tokens.

    Definition. A document's tokens are its tokenizer tokens plus the one eos that separates it when packed, so
    counts match what training sees. With T_nat the natural tokens, mixed-in documents are taken in a seeded
    random order (cycling through them again if there are too few, i.e. upsampling) until their tokens T_mix
    reach fraction / (1 - fraction) * T_nat, so that T_mix / (T_nat + T_mix) = fraction to within one document.
    All documents are then shuffled together with the same seed. Training draws its fixed token budget from the
    packed, shuffled corpus, so the mixed-in share of the trained tokens is `fraction` in expectation (exactly,
    for whole passes over the corpus).
    """
    rng = random.Random(seed)
    natural_tokens = sum(n + 1 for n in map(len, document_token_ids(tokenizer, natural)))
    chosen: list[str] = []
    mixed_tokens = 0
    if fraction > 0:
        target = fraction / (1.0 - fraction) * natural_tokens
        lengths = [n + 1 for n in map(len, document_token_ids(tokenizer, mixed_in))]
        order = list(range(len(mixed_in)))
        while mixed_tokens < target:
            rng.shuffle(order)  # each pass over the mixed-in set is a fresh seeded permutation
            for i in order:
                if mixed_tokens >= target:
                    break
                chosen.append(mixed_in[i])
                mixed_tokens += lengths[i]
    corpus = list(natural) + chosen
    rng.shuffle(corpus)
    stats = {
        "documents": len(corpus),
        "natural_tokens": natural_tokens,
        "mixed_in_tokens": mixed_tokens,
        "mixed_in_fraction": mixed_tokens / (natural_tokens + mixed_tokens),
        "mixed_in_documents": len(chosen),
    }
    return corpus, stats


def pretrain(
    model,
    tokenizer,
    texts: list[str],
    out_dir: str | Path,
    *,
    max_tokens: int,
    block_size: int,
    batch_size: int,
    gradient_accumulation_steps: int = 1,
    **train_kwargs,
) -> dict:
    """Next-token training on `texts` packed into blocks, for exactly the steps that `max_tokens` buys.

    Stage 03 calls it on NonSynth with a fresh model; `continue_pretraining` calls it per branch. `train_kwargs`
    (learning rate, seed, checkpoints, ...) are :func:`synthflaw.training.scaffold.make_trainer`'s. The summary is
    `train_causal_lm`'s plus the budget: `tokens` trained on equals `planned_tokens` = steps * tokens per step.
    """
    if block_size > model.config.max_position_embeddings:
        raise ValueError(
            f"block_size={block_size} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}: lower block_size."
        )
    num_processes = data_parallel_processes()
    steps = steps_for_token_budget(max_tokens, block_size=block_size, batch_size=batch_size,
                                   num_processes=num_processes, gradient_accumulation_steps=gradient_accumulation_steps)
    dataset = pack_texts(tokenizer, texts, block_size)
    summary = train_causal_lm(model, tokenizer, dataset, out_dir, max_steps=steps, batch_size=batch_size,
                              gradient_accumulation_steps=gradient_accumulation_steps, **train_kwargs)
    tokens_per_step = block_size * batch_size * num_processes * gradient_accumulation_steps
    return write_summary(out_dir, {
        **summary, "max_tokens": max_tokens, "planned_tokens": steps * tokens_per_step, "packed_blocks": len(dataset),
        "epochs": round(steps * tokens_per_step / (len(dataset) * block_size), 4),
    })


def continue_pretraining(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    branch: str,
    nonsynth: list[str],
    synthqa: list[str],
    rewritten: list[str],
    extra_natural: list[str],
    synthetic_fraction: float,
    seed: int,
    **pretrain_kwargs,
) -> dict:
    """CPT of `model` (the base; for `more_natural`, the natural branch's model) on one branch's corpus.

    `pretrain_kwargs` (the budget, the block and the training settings) are :func:`pretrain`'s. Every branch given
    the same `max_tokens` and batch shape trains on the same number of tokens. The summary adds the corpus's
    composition (`corpus`: natural and mixed-in token counts, realised fraction).
    """
    texts, corpus_stats = branch_mixture(branch, nonsynth, synthqa, rewritten, extra_natural, synthetic_fraction,
                                         seed, tokenizer=tokenizer)
    summary = pretrain(model, tokenizer, texts, out_dir, seed=seed, **pretrain_kwargs)
    return write_summary(out_dir, {**summary, "branch": branch, "corpus": corpus_stats})
