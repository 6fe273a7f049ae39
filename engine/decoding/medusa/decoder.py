"""Medusa decoding: the heads' proposals verified as a tree over the dense KV cache, several
tokens per step (greedy acceptance when greedy, typical acceptance when sampling)."""

from __future__ import annotations

from engine.decoding.medusa.heads import MedusaHeads
from engine.decoding.medusa.plan import Plan
from engine.decoding.medusa.verify import TreeGraph, TypicalAcceptance, accept_greedy
from engine.decoding.medusa.verify import generate as medusa_generate
from engine.decoding.plain import PlainDecoder


class MedusaDecoder(PlainDecoder):
    name = "medusa"

    def __init__(self, model, context: int, heads: MedusaHeads, plan: Plan):
        super().__init__(model, context)
        self.heads, self.plan = heads, plan
        self.setup = plan.choices
        self._graph = None  # the verify pass as a CUDA graph, captured at the first reply on a GPU

    @property
    def tree(self):
        """The tree verified per step (None: no tree beats plain decoding on this device)."""
        return self.plan.tree

    def generate(self, prompt, params, sampler, eos):
        if self.tree is None:
            return (yield from super().generate(prompt, params, sampler, eos))
        greedy = params.temperature == 0
        accept = accept_greedy if greedy else TypicalAcceptance(params.temperature)
        logits, hidden = self.prefill(prompt)
        if self._graph is None:
            self._graph = TreeGraph.for_device(self.model, self.tree, self.cache)
        produced = 0
        for ids in medusa_generate(self.model, self.heads, self.tree, self.cache, logits, hidden,
                                   params.max_new_tokens, eos, None if greedy else sampler, accept, self._graph):
            produced += len(ids)
            self.cached_ids += ids  # every accepted token's keys/values are in the cache, in order
            yield ids
        return "length" if produced >= params.max_new_tokens or \
            self.cache.length + self.tree.num_nodes > self.cache.max_len else "eos"

    def free(self) -> None:
        super().free()
        self._graph = None
