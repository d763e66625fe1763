"""synthflaw.models.prefix_tree: each distinct prefix one node, units that hold every sequence whole within a row's
width, and rows whose masks give each token its own sequence's causal view."""

import random

import numpy as np
import pytest

from synthflaw.models.prefix_tree import PrefixTree


def sequences(seed, n=12):
    """Sequences over a small vocabulary with shared beginnings (a few stems, each continued several ways)."""
    rng = random.Random(seed)
    stems = [[rng.randrange(1, 9) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    return [rng.choice(stems) + [rng.randrange(1, 9) for _ in range(rng.randint(0, 7))] for _ in range(n)]


def test_each_distinct_prefix_is_one_node():
    seqs = [[1, 2, 3], [1, 2, 4], [1, 2], [5]]
    tree = PrefixTree(seqs)
    assert len(tree.token) - 1 == len({tuple(s[:n]) for s in seqs for n in range(1, len(s) + 1)}) == 5
    for seq, path in zip(seqs, tree.paths):
        assert [tree.token[node] for node in path] == seq
        assert [tree.depth[node] for node in path] == list(range(len(seq)))
    assert tree.paths[0][:2] == tree.paths[1][:2] == tree.paths[2]


@pytest.mark.parametrize("width", [13, 18, 80])  # the longest sequence: 13
def test_units_hold_every_sequence_whole_and_fit_the_width(width):
    seqs = sequences(seed=width)
    tree = PrefixTree(seqs)
    units = tree.units(width)
    assert all(len(unit) <= width for unit in units)
    assert {node for unit in units for node in unit} == set(range(1, len(tree.token)))
    for path in tree.paths:
        assert any(set(path) <= set(unit) for unit in units)
    for unit in units:  # a parent before its children, so a row is built top-down
        seen = set()
        for node in unit:
            assert tree.parent[node] == 0 or tree.parent[node] in seen
            seen.add(node)
    if width >= len(tree.token) - 1:
        assert sum(len(unit) for unit in units) == len(tree.token) - 1  # it all fits: no node repeated


def test_a_width_below_the_longest_sequence_is_refused():
    with pytest.raises(ValueError, match="longest sequence"):
        PrefixTree([[1, 2, 3, 4]]).units(3)


def test_a_rows_mask_is_each_sequences_causal_mask_and_padding_sees_itself():
    seqs = sequences(seed=3)
    tree = PrefixTree(seqs)
    rows = tree.rows(13)
    assert all(sum(len(unit) for unit in row) <= 13 for row in rows)
    ids, positions, mask, placed = tree.batch(rows, pad_id=0)
    assert mask.shape == (len(rows), 1, ids.shape[1], ids.shape[1])
    where = {node: (r, c) for r, c, node in placed}
    assert set(where) == set(range(1, len(tree.token)))
    for seq, path in zip(seqs, tree.paths):
        r, c = where[path[-1]]
        # the last token of the sequence sees exactly its sequence, in order, at positions 0..n-1
        seen = np.flatnonzero(mask[r, 0, c])
        assert ids[r, seen].tolist() == seq
        assert positions[r, seen].tolist() == list(range(len(seq)))
    for r, row in enumerate(rows):
        used = sum(len(unit) for unit in row)
        for k in range(used, ids.shape[1]):
            assert ids[r, k] == 0 and np.flatnonzero(mask[r, 0, k]).tolist() == [k]
