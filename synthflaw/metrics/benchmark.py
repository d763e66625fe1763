"""The knowledge benchmark (the MMLU analog): 4-option multiple choice scored by log-likelihood, as
lm-evaluation-harness scores MMLU; accuracy overall and per split ("stated": facts NonSynth states, "synthqa_only":
facts only SynthQA carries), so the benchmark gain can be attributed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synthflaw.models.scoring import continuation_logprobs
from synthflaw.models.tokenizer import encode_pair, pad_id, start_tokens

BENCHMARK_SPLITS = ("stated", "synthqa_only")


def score_choices(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  batch_size: int) -> list[list[tuple[float, int, int]]]:
    """Log-likelihood of every answer option: `log p(" " + choice | prompt)` summed over the choice's tokens.

    Returns, per prompt, one `(logprob_sum, n_tokens, n_chars)` per choice, `n_chars = len(choice)` (without the
    joining space, as lm-evaluation-harness normalises `acc_norm`). All (prompt, choice) pairs of all prompts are
    batched together with right padding.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"got {len(prompts)} prompts but {len(choices)} choice lists; pass one list per prompt")
    start = start_tokens(tokenizer)
    pairs, index = [], []
    for p, (prompt, options) in enumerate(zip(prompts, choices)):
        if not options:
            raise ValueError(f"prompt {p} has no choices; every benchmark item needs its answer options")
        for c, choice in enumerate(options):
            if not choice.strip():
                raise ValueError(f"choice {c} of prompt {p} is empty; every answer option needs text")
            context_ids, choice_ids = encode_pair(tokenizer, prompt, " " + choice)
            pairs.append((start + context_ids, choice_ids))
            index.append((p, c))
    scores = continuation_logprobs(model, pairs, batch_size, pad_id(tokenizer))
    out: list[list[tuple[float, int, int]]] = [[None] * len(options) for options in choices]
    for (p, c), (logprob, n_tokens) in zip(index, scores):
        out[p][c] = (logprob, n_tokens, len(choices[p][c]))
    return out


def predicted_choice(score: Sequence[tuple[float, int, int]], per_char: bool) -> int:
    values = [logprob / n_chars if per_char else logprob for logprob, _, n_chars in score]
    return int(np.argmax(values))  # ties go to the first option, as np.argmax in lm-evaluation-harness


def benchmark_metrics(records: Sequence[dict], scores: Sequence[Sequence[tuple[float, int, int]]]) -> dict:
    """Accuracy of log-likelihood multiple choice, overall and per split, with counts.

    accuracy = mean_i [argmax_j LL_ij == answer_i], LL_ij = sum of the choice's token log-probabilities;
    acc_norm = mean_i [argmax_j LL_ij / n_chars_ij == answer_i], the per-character normalisation of
    lm-evaluation-harness (Gao et al., 2021), which removes the bias towards short options.
    A split with no items reports None.
    """
    if len(records) != len(scores):
        raise ValueError(f"got {len(records)} benchmark records but {len(scores)} score lists; score every record")
    hits: dict[str, list[tuple[bool, bool]]] = {split: [] for split in BENCHMARK_SPLITS}
    for record, score in zip(records, scores):
        n_choices = len(record["choices"]) if "choices" in record else len(score)
        if len(score) != n_choices:
            raise ValueError(f"record {record.get('id')!r} has {n_choices} choices but {len(score)} scores")
        answer = record["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(score):
            raise ValueError(f"record {record.get('id')!r}: answer {answer!r} is not an index into its "
                             f"{len(score)} choices")
        split = record.get("split", "unsplit")
        hits.setdefault(split, []).append((predicted_choice(score, False) == answer,
                                           predicted_choice(score, True) == answer))

    def summary(rows: list[tuple[bool, bool]]) -> dict:
        if not rows:
            return {"accuracy": None, "acc_norm": None, "count": 0}
        return {"accuracy": float(np.mean([r[0] for r in rows])), "acc_norm": float(np.mean([r[1] for r in rows])),
                "count": len(rows)}

    everything = [row for rows in hits.values() for row in rows]
    if not everything:
        raise ValueError("no benchmark records to score; check benchmark.jsonl")
    return {**summary(everything), "by_split": {split: summary(rows) for split, rows in hits.items()}}
