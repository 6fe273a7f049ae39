"""Medusa as a proposer: the heads fill the planned tree (engine/decoding/medusa/plan.py) from
the hidden state that chose the root, every step."""

from __future__ import annotations

from engine.decoding.medusa.heads import MedusaHeads
from engine.decoding.medusa.tree import MedusaTree
from engine.decoding.speculative.proposer import Draft, Proposer
from engine.decoding.speculative.verify import DenseTarget, TreeGraph


class MedusaProposer(Proposer):
    name = "medusa"

    def __init__(self, model, heads: MedusaHeads, tree: MedusaTree):
        self.model, self.heads, self.tree = model, heads, tree
        self.max_nodes = tree.num_nodes
        self.sources = [""] + [self.name] * (tree.num_nodes - 1)
        self._graph = None  # the verify pass as a CUDA graph over a dense cache, captured at the first reply on a GPU

    def begin(self, prompt, target) -> None:
        if not isinstance(target, DenseTarget):
            self._graph = None
        elif self._graph is None or self._graph.cache is not target.cache:
            self._graph = TreeGraph.for_device(self.model, self.tree, target.cache)

    def propose(self, hidden, root) -> Draft:
        return Draft(self.tree, self.heads.propose(hidden, self.model, self.tree, root), self.sources, self._graph)
