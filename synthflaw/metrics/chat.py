"""Chat quality (the MT-Bench analog): reference-based scores on a 0-10 scale, and an optional LLM judge.

The chat score (`content_chat_scores`) is 10 x ROUGE-L F1 on the content the reply adds: words that are neither
function words nor in the prompt. Plain ROUGE-L (`reference_chat_scores`, kept as `chat_rouge_l`) ranked trivial
replies above the models' answers in the 3-seed reference (echoing the prompt 1.6-2.0, a constant sentence
0.5-0.8, the models 0.2-1.0): the prompt's own words and function words are most of what a reply shares with a
reference. Both are offline and deterministic; the judge scores like MT-Bench's
single-answer grading with a reference: called as `judge(question, reference, response)` it returns the 1-10
rating parsed from "Rating: [[N]]" (MT-Bench's output format, Zheng et al., 2023), or None when its output holds no
such rating; `judge.unparseable` counts those, `judge.calls` counts all calls. The judge is any chat client of
:mod:`synthflaw.models.chat_client`: an OpenAI-compatible endpoint or a local model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from synthflaw.metrics.text import FUNCTION_WORDS, words


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def reference_chat_scores(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Reference-based chat score on MT-Bench's 0-10 scale: 10 x ROUGE-L F1 on lower-cased word tokens.

    ROUGE-L (Lin, 2004): with LCS the longest common subsequence of response words r and reference words g,
    P = LCS / |r|, R = LCS / |g|, F1 = 2PR / (P + R); an empty response scores 0.
    Why this score: offline and deterministic (CI has no judge), it rewards saying the reference's content in a
    sensible order rather than bag-of-words overlap, F1 penalises both padding and truncation, and ROUGE-L is the
    standard reference-based metric for open instruction following (Super-NaturalInstructions, Wang et al., 2022,
    found it tracks human ratings there). It measures closeness to one reference, not quality: use a judge for
    claims about quality.
    """
    if len(responses) != len(references):
        raise ValueError(f"got {len(responses)} responses but {len(references)} references; pass one per chat item")
    scores = []
    for i, (response, reference) in enumerate(zip(responses, references)):
        ref_words, resp_words = words(reference), words(response)
        if not ref_words:
            raise ValueError(f"chat reference {i} has no words; every chat item needs a reference answer")
        lcs = _lcs_length(resp_words, ref_words)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(resp_words), lcs / len(ref_words)
        scores.append(10.0 * 2 * precision * recall / (precision + recall))
    return scores


def _rouge_l_f1(response_words: list[str], reference_words: list[str]) -> float:
    lcs = _lcs_length(response_words, reference_words)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(response_words), lcs / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def content_words(text: str, prompt: str) -> list[str]:
    """The words of `text` that carry content of its own: lower-cased, neither function words nor prompt words."""
    left_out = FUNCTION_WORDS | set(words(prompt))
    return [w for w in words(text) if w not in left_out]


def content_chat_scores(responses: Sequence[str], references: Sequence[str], prompts: Sequence[str]) -> list[float]:
    """The chat score: 10 x ROUGE-L F1 between the content words (`content_words`) of response and reference.

    Echoing the prompt scores 0 by construction, and so does any reply that adds no content of the reference's;
    a reference whose content is all in its prompt would score nothing for anyone, so such items score 0 (counted
    in the mean) rather than raise.
    """
    if not len(responses) == len(references) == len(prompts):
        raise ValueError(f"got {len(responses)} responses, {len(references)} references and {len(prompts)} prompts; "
                         "pass one of each per chat item")
    return [10.0 * _rouge_l_f1(content_words(r, p), content_words(g, p)) if content_words(g, p) and
            content_words(r, p) else 0.0 for r, g, p in zip(responses, references, prompts)]


# --------------------------------------------------------------------------------------------------------------
# The optional LLM judge
# --------------------------------------------------------------------------------------------------------------

JUDGE_SYSTEM_PROMPT = "You are a helpful assistant."

# MT-Bench's reference-guided single-answer grading, reworded; the output format is MT-Bench's.
JUDGE_PROMPT = (
    "[Instruction]\n"
    "Act as an impartial judge of the response an AI assistant gave to the user question below. Judge its "
    "correctness and helpfulness. You are given a reference answer and the assistant's answer: compare the "
    "assistant's answer with the reference first, and point out any mistakes. Be as objective as possible. After a "
    "short explanation, rate the response on a scale of 1 to 10, strictly in this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{response}\n[The End of Assistant's Answer]"
)

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def judge_prompt(question: str, reference: str, response: str) -> str:
    """The user message a judge receives."""
    return JUDGE_PROMPT.format(question=question, reference=reference, response=response)


def parse_rating(text: str) -> float | None:
    """The last "[[N]]" rating in a judge's output if it lies in 1-10, else None (MT-Bench counts these as -1).

    The last one is taken because a judge may quote the format ("...like [[5]]") before giving its verdict.
    """
    ratings = [float(m) for m in _RATING.findall(text)]
    if not ratings or not 1.0 <= ratings[-1] <= 10.0:
        return None
    return ratings[-1]


class RatingJudge:
    """An LLM judge over a chat client (anything with `complete(messages) -> Generation`)."""

    def __init__(self, client) -> None:
        self.client = client
        self.calls = 0
        self.unparseable = 0

    def __repr__(self) -> str:
        return f"RatingJudge({self.client!r})"

    def __call__(self, question: str, reference: str, response: str) -> float | None:
        output = self.client.complete([{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                                       {"role": "user", "content": judge_prompt(question, reference, response)}])
        if output.error:
            raise RuntimeError(f"the chat judge {self.client!r} failed ({output.error}): {output.detail}")
        self.calls += 1
        rating = parse_rating(output.text)
        if rating is None:
            self.unparseable += 1
        return rating


def make_judge(cfg):
    """The optional chat judge named by the `evaluate` config section (None when no judge is set)."""
    from synthflaw.models.chat_client import make_chat_client

    if not cfg.judge:
        return None
    return RatingJudge(make_chat_client(cfg.judge, cfg.judge_endpoint, cfg.judge_api_key_env, max_new_tokens=512,
                                        key="evaluate.judge", key_env_setting="evaluate.judge_api_key_env"))
