"""Word-level text statistics shared by the chat score, the output-shift measures and the data analysis."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"\w+")

# Closed-class English words: what a skeleton keeps of the words
# (data_patterns.skeleton), and what the chat score leaves out (it compares content).
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every all both either neither no none other another such
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what where when why how whether
is are was were be been being am do does did done have has had having will would shall should can could may
might must
not nor and or but if then than so as because while although though since until unless
of in on at by for with from to into onto about above below over under between among through during before after
against without within upon across along around behind beyond near off out up down
there here also only just very too again once more most much many few less least own same
yes
""".split())

# The one reply that reads nothing: a null for every instruction-following and chat measure.
CONSTANT_REPLY = "Thank you for your message. I am glad to help with that."


def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation: what ROUGE-L and the responses' distinct-n compare."""
    return _WORD.findall(text.lower())


def distinct_n(token_lists: Iterable[Sequence[str]], n: int, max_ngrams: int | None = None) -> float:
    """Corpus-level distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
    Models"): distinct n-grams / all n-grams over all texts, n-grams not crossing texts; lower means more
    repetitive, template-like text. 0.0 when the texts hold no n-gram.

    `token_lists` are the texts already tokenised (the caller's tokenisation is part of the metric's definition:
    `words` for responses, words and punctuation for the data analysis). The ratio falls as a corpus grows, so
    compare sets at one budget: `max_ngrams` counts only the first max_ngrams n-grams, in text order.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if max_ngrams is not None and max_ngrams < 1:
        raise ValueError(f"max_ngrams must be a positive count or None, got {max_ngrams}")
    grams = []
    for tokens in token_lists:
        for k in range(len(tokens) - n + 1):
            if max_ngrams is not None and len(grams) == max_ngrams:
                return len(set(grams)) / len(grams)
            grams.append(tuple(tokens[k:k + n]))
    return len(set(grams)) / len(grams) if grams else 0.0


def check_texts(texts, what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, not one string: wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} is empty: give at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{what} must hold strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
    return texts


def check_sets(texts_by_set: dict, min_sets: int = 1) -> dict[str, list[str]]:
    if not isinstance(texts_by_set, dict) or len(texts_by_set) < min_sets:
        raise ValueError(f"expected a dict of at least {min_sets} named text sets, e.g. "
                         f"{{'NonSynth': [...], 'SynthQA': [...]}}; got {type(texts_by_set).__name__} "
                         f"with {len(texts_by_set) if isinstance(texts_by_set, dict) else 0} entries")
    return {name: check_texts(texts, f"texts of set {name!r}") for name, texts in texts_by_set.items()}


# ----------------------------------------------------------------------------------------------- embeddings
