"""The positive control: an SFT set with a known harm, so a study can show that its instrument sees one.

`harmed_sft` takes the SFT set and, in a fixed share of its chats, replaces the reply with the same reply with one
constraint's edit undone: the reply a model that ignores that instruction would give (the learnable tier's
`undone` replies are built the same way). Everything else (prompts, the other chats, the order) is unchanged, so the
`harmed` model differs from `natural` only by how often its SFT replies follow the instruction. The share is fixed
on pilot seeds so that natural's learnable HSR above its null drops by the paper's relative size
(benchmarks/calibrate_positive_control.py); a study's findings then count the instrument as valid only where it
detects `harmed - natural`.
"""

from __future__ import annotations

import copy
import random

from synthflaw.data import constraints as cons


def harmed_sft(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A copy of `records` (SFT chats with `constraints` and the `plain` answer) in which round(fraction * n)
    chats, drawn by `seed`, reply with one constraint's edit undone (which one is drawn too). Each harmed record's
    provenance says which constraint was undone (`harmed`)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sft.harm_fraction must be in (0, 1], got {fraction}")
    usable = [i for i, r in enumerate(records) if r.get("constraints") and "plain" in r]
    if not usable:
        raise ValueError("the SFT set has no chat with checkable constraints and a plain answer to harm (a public "
                         "SFT set has none): set sft.positive_control=false")
    rng = random.Random(f"harmed-{seed}")
    chosen = set(rng.sample(usable, min(len(usable), round(fraction * len(records)))))
    out = []
    for i, record in enumerate(records):
        if i in chosen:
            record = copy.deepcopy(record)
            k = rng.randrange(len(record["constraints"]))
            kept = record["constraints"][:k] + record["constraints"][k + 1:]
            record["messages"][-1]["content"] = cons.compose(record["plain"], kept)
            record["provenance"] = {**record["provenance"], "harmed": record["constraints"][k]["type"]}
        out.append(record)
    return out
