"""Medusa tree buffers from medusa_choices."""

import pytest
import torch

from engine.errors import EngineError
from engine.decoding.medusa.tree import CARD_CHOICES, build_tree


def test_small_worked_example():
    t = build_tree([[0], [1], [0, 0]])
    assert t.topk == [2, 1] and t.num_nodes == 4
    assert t.tree_indices.tolist() == [0, 1, 2, 3]  # candidates: [root, head0 #0, head0 #1, head1 #0]
    assert t.position_offsets.tolist() == [0, 1, 1, 2]
    assert t.attn_mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert sorted(t.retrieve_indices.tolist()) == [[0, 1, 3], [0, 2, -1]]
    assert t.parents.tolist() == [-1, 0, 0, 1]


def test_card_tree():
    t = build_tree(CARD_CHOICES, num_heads=3)
    assert t.num_nodes == 62 and t.depth == 3 and t.topk == [10, 10, 10]
    nodes = [()] + t.paths
    # attention: exactly the ancestors and the node itself
    for i, p in enumerate(nodes):
        for j, q in enumerate(nodes):
            assert bool(t.attn_mask[i, j]) == (p[:len(q)] == q), (p, q)
    # each retrieve row walks parent -> child from the root to a leaf; together they cover every node
    covered = set()
    for row, ok in zip(t.retrieve_indices.tolist(), t.valid.tolist()):
        ids = [n for n, v in zip(row, ok) if v]
        assert ids[0] == 0 and all(t.parents[b] == a for a, b in zip(ids, ids[1:]))
        assert not any(t.parents[k] == ids[-1] for k in range(t.num_nodes))  # a leaf
        covered.update(ids)
    assert covered == set(range(t.num_nodes))


def test_tree_indices_pick_each_nodes_token():
    t = build_tree(CARD_CHOICES)
    g = torch.Generator().manual_seed(0)
    root = torch.tensor([7])
    topk = [torch.randint(0, 1000, (k,), generator=g) for k in t.topk]  # each head's ranked tokens
    candidates = torch.cat([root, *topk])
    tokens = candidates[t.tree_indices]
    assert tokens[0] == 7
    for k, path in enumerate(t.paths, start=1):
        assert tokens[k] == topk[len(path) - 1][path[-1]]
        assert t.position_offsets[k] == len(path)


def test_missing_prefixes_are_added_and_bad_choices_named():
    t = build_tree([[0, 1, 2]])
    assert t.paths == [(0,), (0, 1), (0, 1, 2)] and t.topk == [1, 2, 3]
    with pytest.raises(EngineError, match="model has 2 Medusa heads"):
        build_tree([[0, 0, 0]], num_heads=2)
    for bad in ([[]], [[-1]], [["a"]], [], [[0.5]]):
        with pytest.raises(EngineError, match="medusa choice"):
            build_tree(bad)
