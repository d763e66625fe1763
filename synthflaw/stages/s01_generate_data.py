"""Stage 01: the data. NonSynth, SynthQA, the rewritten set, the SFT set, the benchmark, the instruction-following
suite and the chat set, from the generated world (embedded) or from real corpora and a generator (hub)."""

from __future__ import annotations

from synthflaw.data.embedded import build_embedded
from synthflaw.data.schema import find_leaks, write_data
from synthflaw.records import write_json


def check(cfg) -> list[str]:
    """Problems of a hub configuration, found before any step runs (an offline hub name, a missing corpus...)."""
    if cfg.data.source != "hub":
        return []
    from synthflaw.data.synthqa_generation import check_hub_data

    try:
        check_hub_data(cfg.data)
    except (ValueError, RuntimeError) as error:
        return [str(error)]
    return []


def make_generator(data_cfg):
    """The SynthQA generator the `data` section names: an OpenAI-compatible endpoint, or a local model."""
    from synthflaw.models.chat_client import make_chat_client

    return make_chat_client(data_cfg.generator, data_cfg.generator_endpoint, data_cfg.generator_api_key_env,
                            data_cfg.generator_max_new_tokens, concurrency=data_cfg.generator_batch_size,
                            key="data.generator", key_env_setting="data.generator_api_key_env")


def run(cfg, step) -> dict:
    """Build the data into ``<step>/data`` and check that no evaluation item leaks into training text."""
    if cfg.data.source == "hub":
        from synthflaw.data.synthqa_generation import build_from_hub

        data = build_from_hub(cfg, step.path / "data", make_generator(cfg.data))
    else:
        data = build_embedded(cfg.data, cfg.seed)
    leaks = find_leaks(data)
    if leaks:
        raise RuntimeError(f"{len(leaks)} evaluation items occur in training text, e.g. {leaks[:5]}; "
                           "this is a bug in the generator: report it")
    counts = write_data(data, step.path / "data")
    stats = {"counts": counts, "facts": len(data["world"]["facts"]),
             "stated_facts": len(data["world"]["stated_fact_ids"]),
             "synthqa_only_facts": len(data["world"]["synthqa_only_fact_ids"]),
             "words": {n: sum(len(r["text"].split()) for r in data[n])
                       for n in ("nonsynth", "extra_natural", "synthqa", "rewritten")}}
    write_json(step.path / "summary.json", stats)
    return stats
