"""The flaws of SynthQA against NonSynth (stage 02), measured on the data alone.

Two analyses from Chen et al. (EMNLP 2024 Findings, Sec. 3), plus plain pattern metrics:

- *Data distribution differences*: sentence embeddings of SynthQA and NonSynth, drawn with t-SNE, form largely
  non-overlapping clusters. Beside the picture, `cluster_separation` puts a number on "non-overlapping".
- *Pattern simplification*: a kernel-density plot of token frequencies shows sharp peaks on the structural tokens
  of the Q-A template (`plot_token_kde`). Template and skeleton concentration, distinct-n and gzip compression
  measure the same uniformity without a picture.

`analyse` computes everything into metrics and small tables (stage 02 writes them as JSON/CSV); the figures are drawn
from those CSVs only (:mod:`synthflaw.reporting.data_plots`), so stage 08 can redraw them without any model.
"""

from __future__ import annotations

import gzip
import random
import re
from collections import Counter
from typing import Callable

import numpy as np

from synthflaw.metrics.embeddings import (
    MiniLM,
    cluster_separation,
    embed_texts,
    load_minilm,
    tsne_rows,
)
from synthflaw.metrics.text import FUNCTION_WORDS, check_sets, check_texts, distinct_n

REFERENCE_SET = "NonSynth"

# Words and punctuation are separate tokens, so "Question:" counts as "Question" and ":"; a line break is a token
# of its own because the Q-A template puts one between question and answer.
TOKEN_RE = re.compile(r"\n|\w+|[^\w\s]")
WORD_RE = re.compile(r"\w+")
NEWLINE_TOKEN = "\\n"  # how a line break is written in CSVs and on plots (two visible characters)

def tokenize(text: str) -> list[str]:
    """Words, punctuation marks and line breaks (as `NEWLINE_TOKEN`), case kept: the template's "Question" is a
    capitalised marker, and lowercasing would merge it with the content word "question"."""
    return [NEWLINE_TOKEN if t == "\n" else t for t in TOKEN_RE.findall(text)]


def token_frequency_rows(texts_by_set: dict[str, list[str]], top_k: int | None = None,
                         reference: str = REFERENCE_SET) -> list[dict]:
    """Token counts per set on one shared rank axis: what `plot_token_kde` draws.

    The shared vocabulary is ordered by the token's count in the `reference` set (rank 1 = its most frequent token;
    ties by token string); tokens the reference never uses come after it, ordered by their count over the other
    sets. One row per (set, token) with a non-zero count: set, token, rank, count, share (= count / all tokens of
    the set), doc_share (share of the set's texts that contain the token), in_reference (1 if the reference uses
    the token), reference. `top_k` keeps the ranks 1..top_k only; shares stay relative to all of the set's tokens.
    """
    texts_by_set = check_sets(texts_by_set)
    if reference not in texts_by_set:
        raise ValueError(f"reference set {reference!r} is not among the sets {sorted(texts_by_set)}: "
                         f"pass reference= one of them")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of ranks or None (all), got {top_k}")
    counts, doc_counts = {}, {}
    for name, texts in texts_by_set.items():
        tokenised = [tokenize(t) for t in texts]
        counts[name] = Counter(tok for toks in tokenised for tok in toks)
        doc_counts[name] = Counter(tok for toks in tokenised for tok in set(toks))
    ref = counts[reference]
    others = sum((c for n, c in counts.items() if n != reference), Counter())
    vocab = sorted(ref, key=lambda t: (-ref[t], t)) + sorted((t for t in others if t not in ref),
                                                              key=lambda t: (-others[t], t))
    if top_k is not None:
        vocab = vocab[:top_k]
    rows = []
    for name, texts in texts_by_set.items():
        total = sum(counts[name].values())
        for rank, token in enumerate(vocab, start=1):
            count = counts[name][token]
            if count:
                rows.append({"set": name, "token": token, "rank": rank, "count": count,
                             "share": count / total, "doc_share": doc_counts[name][token] / len(texts),
                             "in_reference": int(token in ref), "reference": reference})
    return rows


def _first_words(text: str, n: int) -> tuple[str, ...]:
    return tuple(text.split()[:n])


def template_concentration(texts: list[str], n: int = 3) -> float:
    """Share of texts whose first n whitespace-separated words equal the most common first n words.

    1.0 when every text opens the same way ("Question: What is ..."), ~1/len(texts) when no two texts do. Texts
    shorter than n words count with all their words. Larger n separates a fixed header from varied openings."""
    texts = check_texts(texts)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    heads = Counter(_first_words(t, n) for t in texts)
    return heads.most_common(1)[0][1] / len(texts)


def skeleton(text: str) -> str:
    """The text with its content masked: what is left is the form.

    Rule: tokenise as `tokenize`; keep punctuation marks, line breaks and the closed-class words of
    `FUNCTION_WORDS` (lowercased); replace every maximal run of other tokens (content words, names, numbers,
    including the template's own words such as "Question") by one "_". So
    "Question: Who founded Arlo Mills?\\nAnswer: Ilara Venn." -> "_ : who _ ? \\n _ : _ ."
    """
    out: list[str] = []
    for tok in tokenize(text):
        if tok.lower() in FUNCTION_WORDS:
            out.append(tok.lower())
        elif not WORD_RE.fullmatch(tok):  # punctuation or a line break
            out.append(tok)
        elif not out or out[-1] != "_":
            out.append("_")
    return " ".join(out)


def skeleton_concentration(texts: list[str]) -> float:
    """Share of texts whose `skeleton` is the most common skeleton: ~1 for one fixed template with one question
    wording, the share of the commonest wording for several, ~1/len(texts) for free text of varied form."""
    texts = check_texts(texts)
    return Counter(skeleton(t) for t in texts).most_common(1)[0][1] / len(texts)


def lowered_tokens(texts: list[str]) -> list[list[str]]:
    """`tokenize` tokens of each text, lowercased: what the data analysis's distinct-n counts."""
    return [[t.lower() for t in tokenize(text)] for text in texts]


def count_ngrams(texts: list[str], n: int) -> int:
    """Number of n-grams `distinct_n` sees in the texts (to pick a shared `max_ngrams`)."""
    return sum(max(0, len(tokenize(t)) - n + 1) for t in check_texts(texts))


def _corpus_bytes(texts: list[str]) -> bytes:
    return "\n\n".join(texts).encode("utf-8")


def compression_ratio(texts: list[str], max_bytes: int | None = None) -> float:
    """gzip-compressed size / raw size of the texts joined by blank lines (UTF-8): lower = more repetitive.

    gzip finds repeats within a 32 KiB window, so longer corpora compress better; compare sets at one size with
    `max_bytes` (the first max_bytes bytes). mtime=0 keeps the output deterministic."""
    raw = _corpus_bytes(check_texts(texts))
    if max_bytes is not None:
        raw = raw[:max_bytes]
    if not raw:
        raise ValueError("the texts are empty: nothing to compress")
    return len(gzip.compress(raw, compresslevel=9, mtime=0)) / len(raw)


def length_rows(texts_by_set: dict[str, list[str]]) -> list[dict]:
    """One row per text: {set, index, words} with words = whitespace-separated words."""
    texts_by_set = check_sets(texts_by_set)
    return [{"set": name, "index": i, "words": len(t.split())}
            for name, texts in texts_by_set.items() for i, t in enumerate(texts)]


def pattern_metrics(texts: list[str], ngram_budget: dict[int, int] | None = None, byte_budget: int | None = None,
                    top_n: int = 10) -> dict:
    """The pattern-simplification numbers of one set (see each function); budgets as in `distinct_n` and
    `compression_ratio`. top_tokens: the `top_n` most frequent tokens with share and doc_share, where a template's
    structural tokens ("Question", ":", "\\n", "Answer") show as doc_share ~1; top5_token_share: the share of all
    token occurrences taken by the 5 commonest tokens, a number for how sharp the peaks are."""
    texts = check_texts(texts)
    ngram_budget = ngram_budget or {}
    tokenised = [tokenize(t) for t in texts]
    counts = Counter(tok for toks in tokenised for tok in toks)
    docs = Counter(tok for toks in tokenised for tok in set(toks))
    total = sum(counts.values())
    words = np.array([len(t.split()) for t in texts], dtype=float)
    metrics = {"n_texts": len(texts)}
    for n in (1, 2, 3):
        metrics[f"template_concentration_{n}"] = template_concentration(texts, n)
    metrics["skeleton_concentration"] = skeleton_concentration(texts)
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n(lowered_tokens(texts), n, ngram_budget.get(n))
    metrics["compression_ratio"] = compression_ratio(texts, byte_budget)
    metrics["mean_words"] = float(words.mean())
    metrics["std_words"] = float(words.std())
    metrics["top5_token_share"] = sum(c for _, c in counts.most_common(5)) / total if total else 0.0
    metrics["top_tokens"] = [{"token": tok, "share": c / total, "doc_share": docs[tok] / len(texts)}
                             for tok, c in counts.most_common(top_n)]
    return metrics


def sample_texts(texts: list[str], max_texts: int, seed: int, name: str) -> list[str]:
    """At most max_texts texts drawn without replacement, in corpus order; the draw depends on (seed, set name)
    only, so adding a set does not change another set's sample."""
    if len(texts) <= max_texts:
        return list(texts)
    keep = sorted(random.Random(f"{seed}/{name}").sample(range(len(texts)), max_texts))
    return [texts[i] for i in keep]


def _encoder_name(encoder) -> str:
    if isinstance(encoder, MiniLM):
        return encoder.name
    func = getattr(encoder, "func", encoder)  # functools.partial(hidden_state_embeddings, model, tokenizer)
    return getattr(func, "__name__", type(func).__name__)


def analyse(texts_by_set: dict[str, list[str]], seed: int, max_texts: int = 500,
            encoder: MiniLM | Callable[[list[str]], np.ndarray] | None = None,
            reference: str = REFERENCE_SET) -> tuple[dict, dict[str, list[dict]]]:
    """Both analyses and the pattern metrics on at most `max_texts` texts per set (seeded sample).

    `encoder`: a `MiniLM` (default: `load_minilm()`), or any callable texts -> (n, d) array, such as
    `functools.partial(hidden_state_embeddings, model, tokenizer)` for a model's own representations.
    Returns (metrics, tables). metrics: {"sets": {name: pattern_metrics}, "separation": {name: cluster_separation of
    that set against the reference}, "settings": {...}}; tables, the rows of each CSV: tsne.csv (set, index, x, y),
    token_frequency.csv (see `token_frequency_rows`), lengths.csv (set, index, words).
    distinct-n and compression ratio are computed at the budget of the smallest set (n-grams, bytes), since both
    drift with corpus size.
    """
    texts_by_set = check_sets(texts_by_set, min_sets=2)
    if reference not in texts_by_set:
        raise ValueError(f"reference set {reference!r} is not among the sets {sorted(texts_by_set)}: "
                         f"pass reference= one of them")
    if max_texts < 3:
        raise ValueError(f"max_texts must be at least 3 (t-SNE and the probe need a few texts per set), "
                         f"got {max_texts}")
    sample = {name: sample_texts(texts, max_texts, seed, name) for name, texts in texts_by_set.items()}

    encoder = encoder if encoder is not None else load_minilm()
    embed = (lambda texts: embed_texts(texts, encoder)) if isinstance(encoder, MiniLM) else encoder
    embeddings = {name: np.asarray(embed(texts)) for name, texts in sample.items()}
    wrong = {name: e.shape for name, e in embeddings.items() if e.ndim != 2 or len(e) != len(sample[name])}
    if wrong:
        raise ValueError(f"the encoder must return one row per text, shape (n_texts, dim); got {wrong} for "
                         f"{ {name: len(t) for name, t in sample.items()} } texts")

    ngram_budget = {n: min(count_ngrams(t, n) for t in sample.values()) for n in (1, 2, 3)}
    byte_budget = min(len(_corpus_bytes(t)) for t in sample.values())
    metrics = {
        "sets": {name: pattern_metrics(texts, ngram_budget, byte_budget) for name, texts in sample.items()},
        "separation": {name: cluster_separation({reference: embeddings[reference], name: embeddings[name]}, seed)
                       for name in sample if name != reference},
        "settings": {"seed": seed, "max_texts": max_texts, "reference": reference,
                     "encoder": _encoder_name(encoder), "distinct_n_budget": {str(n): b for n, b in
                                                                              ngram_budget.items()},
                     "compression_bytes": byte_budget},
    }
    tables = {"tsne.csv": tsne_rows(embeddings, seed),
              "token_frequency.csv": token_frequency_rows(sample, reference=reference),
              "lengths.csv": length_rows(sample)}
    return metrics, tables
