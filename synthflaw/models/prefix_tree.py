"""Token sequences as one prefix tree, packed into rows for a single forward pass with tree attention.

The paired likelihood endpoints score many sequences that share their beginnings: a prompt with and without one of
its instructions shares everything up to that sentence, a compliant and an undone reply share the words before the
edit, and every chat starts with the same template tokens. In a prefix tree each shared prefix is one node, and a
token's next-token distribution depends only on its ancestors, so each node needs computing once.

A tree is cut into units (a subtree with the path above it) that fit a row; several units share a row. Each token
gets the position it has in its own sequence (its depth) and attends to its ancestors only (an ancestor mask, the
causal mask of each sequence through it), so every token sees exactly the tokens, at the positions, that it sees
when its sequence is run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PrefixTree:
    """The distinct prefixes of `sequences` as nodes. Node 0 is the empty prefix (no token); every other node has a
    token, a parent and a depth (its position: 0 for a sequence's first token). `paths[i]`: the nodes of sequence
    i, one per token."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.token, self.parent, self.depth = [-1], [-1], [-1]
        self.paths: list[list[int]] = []
        for sequence in sequences:
            node, path = 0, []
            for token in sequence:
                child = self.children[node].get(token)
                if child is None:
                    child = len(self.token)
                    self.children[node][token] = child
                    self.children.append({})
                    self.token.append(token)
                    self.parent.append(node)
                    self.depth.append(self.depth[node] + 1)
                node = child
                path.append(node)
            self.paths.append(path)

    def units(self, width: int) -> list[list[int]]:
        """The tree cut into units of at most `width` nodes, each a subtree with the path from the top down to it,
        in an order where a parent comes before its children. Every node is in a unit; a node above several units
        is repeated in each (what one row cannot hold). `width` must hold the longest sequence."""
        longest = max((len(path) for path in self.paths), default=0)
        if width < longest:
            raise ValueError(f"width={width} cannot hold the longest sequence ({longest} tokens)")
        size = [1] * len(self.token)  # nodes in each subtree, itself included
        for node in reversed(self._preorder(0)):
            if node:
                size[self.parent[node]] += size[node]
        units, stack = [], list(self.children[0].values())
        while stack:
            node = stack.pop()
            # the subtree and the `depth` nodes above it
            if self.depth[node] + size[node] <= width:
                units.append(self._above(node) + self._preorder(node))
            else:
                stack.extend(self.children[node].values())
        return units

    def _preorder(self, node: int) -> list[int]:
        out, stack = [], [node]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(self.children[node].values()))
        return out

    def _above(self, node: int) -> list[int]:
        path, node = [], self.parent[node]
        while node > 0:
            path.append(node)
            node = self.parent[node]
        return path[::-1]

    def rows(self, width: int) -> list[list[list[int]]]:
        """The units packed into rows of at most `width` tokens (first fit, longest unit first): each row a list
        of units."""
        rows: list[list[list[int]]] = []
        filled: list[int] = []
        for unit in sorted(self.units(width), key=len, reverse=True):
            r = next((r for r, used in enumerate(filled) if used + len(unit) <= width), None)
            if r is None:
                rows.append([])
                filled.append(0)
                r = len(rows) - 1
            rows[r].append(unit)
            filled[r] += len(unit)
        return rows

    def batch(self, rows: list[list[list[int]]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Arrays for one forward pass over `rows`: token ids and positions [B, W] (padding: `pad_id`, position 0),
        the ancestor mask [B, 1, W, W] (True: the row's token attends to the column's; a padding token attends to
        itself only, so no softmax is over nothing), and where each node sits: [(row, column, node)], its first
        copy in the batch."""
        width = max(sum(len(unit) for unit in row) for row in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), 1, width, width), dtype=bool)
        placed, seen = [], set()
        for r, row in enumerate(rows):
            allowed, column = mask[r, 0], 0
            for unit in row:
                where = {}
                for node in unit:
                    where[node] = column
                    ids[r, column], positions[r, column] = self.token[node], self.depth[node]
                    parent = self.parent[node]
                    if parent > 0:
                        allowed[column] = allowed[where[parent]]
                    allowed[column, column] = True
                    if node not in seen:
                        seen.add(node)
                        placed.append((r, column, node))
                    column += 1
            for k in range(column, width):
                allowed[k, k] = True
        return ids, positions, mask, placed
