"""A draft tree: the candidate continuations one verification step checks, as the buffers the
verifier (engine/decoding/speculative/verify.py) needs. Node 0 is the root (the token the base
model chose next); every other node is a drafted token whose parent is an earlier node, so node
ids grow along every path. Any proposer builds one (Medusa's fixed tree of rank paths,
engine/decoding/medusa/tree.py; the lookup proposer's chains of earlier text, one per step).

- ``parents`` [N]: the parent node (-1 for the root);
- ``position_offsets`` [N]: the node's depth (its position after the last accepted token);
- ``attn_mask`` [N, N] bool: a node attends to itself and its ancestors (and to the whole cache);
- ``retrieve_indices`` [R, D + 1]: one row per leaf, the node ids from the root down, padded
  with -1 (``valid`` marks the real entries, so padding can never be accepted);
- ``inner`` [I]: the nodes with children (only their logits are needed to judge the proposals);
  ``parent_slot`` [N - 1]: for nodes 1.., the row of their parent in ``inner``."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import torch


@dataclass
class DraftTree:
    parents: torch.Tensor
    position_offsets: torch.Tensor
    attn_mask: torch.Tensor
    retrieve_indices: torch.Tensor
    valid: torch.Tensor
    inner: torch.Tensor
    parent_slot: torch.Tensor
    retrieve_rows: list[list[int]]  # retrieve_indices on the host, without the padding
    inner_rows: dict[int, int]  # node id -> its row in ``inner``

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return self.retrieve_indices.shape[1] - 1

    def to(self, device) -> "DraftTree":
        """The tree with its tensors on ``device`` (the host lists stay)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def tree_buffers(parents: list[int]) -> dict:
    """The DraftTree fields of the tree whose node k > 0 has parent ``parents[k]`` < k
    (``parents[0]`` is -1, the root)."""
    n = len(parents)
    assert n >= 1 and parents[0] == -1 and all(0 <= parents[k] < k for k in range(1, n)), parents
    depth = [0] * n
    for k in range(1, n):
        depth[k] = depth[parents[k]] + 1
    mask = torch.eye(n, dtype=torch.bool)
    for k in range(1, n):
        mask[k] |= mask[parents[k]]
    has_child = set(parents[1:])
    leaves = [k for k in range(n) if k not in has_child]
    rows = []
    for leaf in leaves:
        row = [leaf]
        while row[-1] != 0:
            row.append(parents[row[-1]])
        rows.append(row[::-1])
    most = max(depth)
    retrieve = torch.full((len(rows), most + 1), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        retrieve[r, :len(row)] = torch.tensor(row)
    inner = sorted(has_child)
    slot = {node: i for i, node in enumerate(inner)}
    return dict(parents=torch.tensor(parents, dtype=torch.long), position_offsets=torch.tensor(depth, dtype=torch.long),
                attn_mask=mask, retrieve_indices=retrieve, valid=retrieve >= 0,
                inner=torch.tensor(inner, dtype=torch.long),
                parent_slot=torch.tensor([slot[p] for p in parents[1:]], dtype=torch.long),
                retrieve_rows=rows, inner_rows=slot)


@lru_cache(maxsize=512)
def draft_tree(parents: tuple[int, ...], device: str = "cpu") -> DraftTree:
    """The DraftTree of ``parents`` (see tree_buffers) on ``device``, built once per shape: the
    trees a proposer drafts step after step have few distinct shapes (chains of a few lengths)."""
    return DraftTree(**tree_buffers(list(parents))).to(device)
