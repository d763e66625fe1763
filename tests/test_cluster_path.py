"""The path every interval of a per-item endpoint rests on, end to end: the generated learnable items name their base
prompt (`base_id`), stage 07's items.csv carries it as each row's cluster (`learnable_rows`), the aggregate reads that
column back, and the finding's standard error is the cluster-robust one over base prompts, not the item-level one.

The values are made so that clustering matters: the contrast between two models moves with the base prompt (all three
levels of a base share one shift) and barely within it. Clustered by base, each seed's variance is about three times
the item-level one; a bug anywhere on the path (items clustered by item id in items.csv, the column not read, a key
mismatch) gives the item-level variance and fails here."""

import csv
import json

import numpy as np
import pytest

from synthflaw import config, runs
from synthflaw.data.embedded import build_embedded
from synthflaw.metrics.evaluation import learnable_rows
from synthflaw.metrics.statistics import clustered_variance_of_mean, combine_seeds, item_contrast
from synthflaw.reporting import aggregate
from synthflaw.reporting.findings import Contrasts

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def seed_items():
    """The learnable tier as stage 01 generates it, per seed (the smoke world: 30 items, 10 bases)."""
    return {seed: build_embedded(config.resolve("smoke", {"seed": seed}).data, seed)["learnable_suite"]
            for seed in SEEDS}


def _values(items, seed: int, model: str) -> list[dict[str, float]]:
    """Per item, a compliance margin whose harmed - natural contrast is a shift per base prompt plus small noise."""
    bases = sorted({i["base_id"] for i in items})
    drawn = np.random.default_rng([seed, 7]).normal(0, 0.3, len(bases))
    # centred in each seed: the seeds agree on -0.05, so the interval is the items', clustered or not
    shifts = dict(zip(bases, drawn - drawn.mean() - 0.05))
    noise = np.random.default_rng([seed, 11, len(model)]).normal(0, 0.01, len(items))
    return [{"compliance_margin": (shifts[item["base_id"]] if model == "harmed" else 0.0) + float(noise[k])}
            for k, item in enumerate(items)]


def _write_seed(run, items, seed):
    """Seed run `run` as stage 07 leaves it for two models: metrics.json, items.csv (learnable_rows), done.json."""
    for model in ("natural", "harmed"):
        path = run / "07_evaluate" / model
        path.mkdir(parents=True)
        rows = learnable_rows(items, _values(items, seed, model))
        with open(path / "items.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["set", "id", "metric", "value", "cluster"])
            writer.writeheader()
            writer.writerows(rows)
        (path / "metrics.json").write_text(json.dumps({"compliance_margin": 0.0}))
        (path / "config.json").write_text('{"fingerprint": "x"}')
        (path / "done.json").write_text(json.dumps({"fingerprint": "x", "finished": 0, "products": {},
                                                    "upstream": {}, "digest": runs.combined_digest({})}))


def test_every_learnable_item_names_its_base_and_each_base_holds_three_levels(seed_items):
    for items in seed_items.values():
        bases = {}
        for item in items:
            bases.setdefault(item["base_id"], []).append(item["level"])
        assert len(bases) == len(items) // 3 >= 2
        assert all(sorted(levels) == [1, 2, 3] for levels in bases.values())


def test_items_csv_names_each_rows_base_prompt_as_its_cluster(seed_items):
    items = seed_items[0]
    rows = learnable_rows(items, _values(items, 0, "harmed"))
    assert [r["cluster"] for r in rows] == [i["base_id"] for i in items]
    assert len({r["cluster"] for r in rows}) == len(items) // 3 < len(rows)


def test_the_generated_clusters_reach_the_findings_standard_error(tmp_path, seed_items):
    for seed, items in seed_items.items():
        _write_seed(tmp_path / f"seed-{seed}", items, seed)
    agg = aggregate.aggregate(aggregate.seed_runs(tmp_path), tmp_path / "out")

    # the aggregate read each item's base prompt as its cluster
    for seed, items in seed_items.items():
        by_item = {f"learnable_suite/{i['id']}": f"learnable_suite/{i['base_id']}" for i in items}
        assert agg["clusters"][str(seed)] == by_item

    # the finding's contrast is the clustered one: the seeds' sandwich variances over base prompts, combined
    stats = Contrasts(agg)("compliance_margin", [("harmed", 1.0), ("natural", -1.0)])
    expected = {}
    for seed, items in seed_items.items():
        d = np.array([h["compliance_margin"] - n["compliance_margin"]
                      for h, n in zip(_values(items, seed, "harmed"), _values(items, seed, "natural"))])
        order = np.argsort([f"learnable_suite/{i['id']}" for i in items])  # the estimator's sorted item keys
        clustered = clustered_variance_of_mean(d[order], [items[k]["base_id"] for k in order])
        assert clustered > 2 * d.var(ddof=1) / len(d)  # the shift moves with the base: clustering must widen it
        expected[str(seed)] = (float(d.mean()), clustered, len(d))
    assert stats["se"] == pytest.approx(combine_seeds(expected)["se"], rel=1e-9)
    unclustered = item_contrast(agg["items"]["compliance_margin"], [("harmed", 1.0), ("natural", -1.0)])
    assert stats["se"] > 1.5 * unclustered["se"]
