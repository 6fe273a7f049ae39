"""Medusa candidate trees: from a list of ``medusa_choices`` to the buffers one verification
step needs.

A choice is a path ``(a, b, c)``: the a-th most likely token of head 0, then the b-th of head 1,
then the c-th of head 2. Node 0 is the root (the base model's own next token); node k > 0 is a
path. Besides the draft tree's buffers (engine/decoding/speculative/tree.py):

- ``tree_indices`` [N]: where each node's token is in the candidate vector
  ``[root, head0 top-k0, head1 top-k1, ...]`` (each head contributes only the ranks used);
- ``levels``: per depth d, what heads whose input depends on the path (``MedusaHeads.path_proj``)
  need to propose the nodes of depth d + 1 parent by parent (see ``Level``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.decoding.speculative.tree import DraftTree, tree_buffers
from engine.errors import EngineError

MAX_NODES = 256  # the largest tree verified (the card's has 64 nodes; a step's cost grows with the size)

# The tree of the nvidia/Llama-3.1-8B-Medusa-FP8 model card (3 heads, depth 3).
CARD_CHOICES = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 1, 1], [0, 0, 6], [0, 3, 0],
    [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0],
    [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [1, 6], [0, 7, 0],
]


@dataclass
class Level:
    """The nodes of one depth d + 1 and their parents (the nodes of depth d with children): head
    d runs once per parent. ``ancestors`` [P, d]: each parent's path, the node ids at depths
    1..d (empty for the root); ``children`` [C] node ids; ``child_parent`` [C]: the row of each
    child's parent in ``parents``; ``child_rank`` [C]: the child's rank among that parent's
    proposals."""

    parents: torch.Tensor
    ancestors: torch.Tensor
    children: torch.Tensor
    child_parent: torch.Tensor
    child_rank: torch.Tensor

    def to(self, device) -> "Level":
        return Level(*(t.to(device) for t in (self.parents, self.ancestors, self.children, self.child_parent,
                                              self.child_rank)))


@dataclass
class MedusaTree(DraftTree):
    """A Medusa tree: the draft tree of ``paths`` and what the heads need to fill its nodes."""

    paths: list[tuple[int, ...]]  # node k (k >= 1) is paths[k - 1]; breadth-first, then lexicographic
    topk: list[int]  # ranks used per head
    tree_indices: torch.Tensor
    levels: list[Level]

    @property
    def depth(self) -> int:
        return len(self.topk)

    def to(self, device) -> "MedusaTree":
        return replace(super().to(device), levels=[lv.to(device) for lv in self.levels])


def build_tree(choices, num_heads: int | None = None) -> MedusaTree:
    """Buffers for ``choices``; missing prefixes are added (a path implies its ancestors).
    ``num_heads``: the model's head count; a path deeper than that is an error."""
    paths: set[tuple[int, ...]] = set()
    for c in choices:
        path = tuple(c) if isinstance(c, (list, tuple)) else None
        if not path or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise EngineError(f"medusa choice {c!r} is not a non-empty list of token ranks (integers >= 0)")
        for d in range(1, len(path) + 1):
            paths.add(path[:d])
    if not paths:
        raise EngineError("medusa choices are empty")
    if len(paths) + 1 > MAX_NODES:
        raise EngineError(f"medusa choices make a tree of {len(paths) + 1} nodes; chatapp verifies at most {MAX_NODES}")
    ordered = sorted(paths, key=lambda p: (len(p), p))
    depth = len(ordered[-1])
    if num_heads is not None and depth > num_heads:
        raise EngineError(f"medusa choices are {depth} deep but the model has {num_heads} Medusa heads")
    topk = [max(p[d] for p in ordered if len(p) > d) + 1 for d in range(depth)]
    offsets = [1]
    for k in topk[:-1]:
        offsets.append(offsets[-1] + k)
    node = {p: i + 1 for i, p in enumerate(ordered)}
    n = len(ordered) + 1

    tree_indices = torch.zeros(n, dtype=torch.long)
    parents = [-1] * n
    for p, i in node.items():
        tree_indices[i] = offsets[len(p) - 1] + p[-1]
        parents[i] = node[p[:-1]] if len(p) > 1 else 0
    return MedusaTree(**tree_buffers(parents), paths=ordered, topk=topk, tree_indices=tree_indices,
                      levels=_levels(ordered, node, depth))


def _levels(ordered: list[tuple[int, ...]], node: dict[tuple[int, ...], int], depth: int) -> list[Level]:
    levels = []
    for d in range(depth):
        kids = [p for p in ordered if len(p) == d + 1]
        par = sorted({p[:-1] for p in kids}, key=lambda p: node.get(p, 0))
        row = {p: i for i, p in enumerate(par)}
        levels.append(Level(
            torch.tensor([node.get(p, 0) for p in par], dtype=torch.long),
            torch.tensor([[node[p[:j]] for j in range(1, d + 1)] for p in par], dtype=torch.long).reshape(len(par), d),
            torch.tensor([node[p] for p in kids], dtype=torch.long),
            torch.tensor([row[p[:-1]] for p in kids], dtype=torch.long),
            torch.tensor([p[-1] for p in kids], dtype=torch.long)))
    return levels
