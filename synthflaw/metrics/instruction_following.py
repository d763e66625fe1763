"""Instruction following (the FollowBench / IFEval analog): every constraint of a suite item checked on a response by
:mod:`synthflaw.data.constraints`; hard and soft satisfaction rates, per level, IFEval strict and loose accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synthflaw.data.constraints import check_response, check_response_loose
from synthflaw.metrics.text import CONSTANT_REPLY


def _rate(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def instruction_following(items: Sequence[dict], responses: Sequence[str]) -> tuple[dict, list[dict]]:
    """Constraint satisfaction of `responses` to the instruction suite `items` (FollowBench and IFEval metrics).

    With s_ij in {0, 1} the strict verdict on constraint j of item i (n_i constraints, m items):
      hard satisfaction rate HSR = (1/m) sum_i prod_j s_ij              (FollowBench, Jiang et al., 2024)
      soft satisfaction rate SSR = (1/m) sum_i (1/n_i) sum_j s_ij       (FollowBench)
      IFEval prompt-level accuracy      = HSR's formula                 (Zhou et al., 2023)
      IFEval instruction-level accuracy = sum_ij s_ij / sum_i n_i       (pooled over all constraints)
    each with the strict checker and with IFEval's loose one (the response also tried without its first/last line
    and without markdown emphasis). HSR and SSR are also given per level 1-5 (`hsr_by_level` keyed "1".."5").

    Returns (metrics, verdicts), verdicts[i] = {"strict": [bool per constraint], "loose": [...]}.
    """
    if len(items) != len(responses):
        raise ValueError(f"got {len(items)} suite items but {len(responses)} responses; generate one per item")
    if not items:
        raise ValueError("the instruction suite is empty; check instruction_suite.jsonl")
    verdicts, by_level = [], {}
    for item, response in zip(items, responses):
        if not item.get("constraints"):
            raise ValueError(f"suite item {item.get('id')!r} has no constraints; every suite item needs 1-5")
        strict = [bool(v) for v in check_response(response, item["constraints"])]
        loose = [bool(v) for v in check_response_loose(response, item["constraints"])]
        verdicts.append({"strict": strict, "loose": loose})
        by_level.setdefault(str(item["level"]), []).append(strict)

    def hard(rows): return _rate([float(all(r)) for r in rows])
    def soft(rows): return _rate([sum(r) / len(r) for r in rows])
    def pooled(rows): return float(sum(map(sum, rows)) / sum(map(len, rows)))

    strict_rows = [v["strict"] for v in verdicts]
    loose_rows = [v["loose"] for v in verdicts]
    levels = sorted(by_level, key=lambda level: (len(level), level))
    metrics = {
        "hard_satisfaction_rate": hard(strict_rows),
        "soft_satisfaction_rate": soft(strict_rows),
        "hsr_by_level": {level: hard(by_level[level]) for level in levels},
        "ssr_by_level": {level: soft(by_level[level]) for level in levels},
        "count_by_level": {level: len(by_level[level]) for level in levels},
        "ifeval_prompt_strict": hard(strict_rows),
        "ifeval_instruction_strict": pooled(strict_rows),
        "ifeval_prompt_loose": hard(loose_rows),
        "ifeval_instruction_loose": pooled(loose_rows),
        "suite_prompts": len(items),
        "suite_constraints": sum(map(len, strict_rows)),
    }
    return metrics, verdicts


def null_replies(items: Sequence[dict]) -> dict[str, list[str]]:
    """What replies that do not follow the instructions score: the same constant reply for every item, the prompt
    echoed, and the item's plain answer with no constraint applied (where the item has one)."""
    replies = {"constant": [CONSTANT_REPLY] * len(items), "echo": [item["prompt"] for item in items]}
    if all("plain" in item for item in items):
        replies["plain"] = [item["plain"] for item in items]
    return replies
