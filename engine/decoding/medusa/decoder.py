"""Medusa decoding: the heads' proposals verified as a tree, several tokens per step (greedy
acceptance when greedy, typical acceptance when sampling), over the cache of the decoding it is
put on: the dense KV cache (plain) or a DMC cache (``medusa+dmc``)."""

from __future__ import annotations

from engine.decoding.base import Decoder
from engine.decoding.dmc import DMCDecoder
from engine.decoding.medusa.heads import MedusaHeads
from engine.decoding.medusa.plan import Plan
from engine.decoding.medusa.verify import DenseTarget, DMCTarget, TreeGraph, TypicalAcceptance, accept_greedy
from engine.decoding.medusa.verify import generate as medusa_generate
from engine.decoding.plain import PlainDecoder


class MedusaDecoder(Decoder):
    """Medusa over ``base``, the one-token decoding whose cache holds the conversation
    (PlainDecoder or DMCDecoder): its prefill, its cache, and its steps where no tree pays."""

    def __init__(self, base: PlainDecoder | DMCDecoder, heads: MedusaHeads, plan: Plan):
        self.base = base
        super().__init__(base.model, base.context)
        self.name = "medusa" if base.name == "plain" else f"medusa+{base.name}"
        self.heads, self.plan = heads, plan
        self.setup = plan.choices
        self._graph = None  # the verify pass as a CUDA graph, captured at the first reply on a GPU

    @property
    def cached_ids(self) -> list[int]:
        return self.base.cached_ids

    @cached_ids.setter
    def cached_ids(self, ids: list[int]) -> None:
        self.base.cached_ids = ids

    @property
    def tree(self):
        """The tree verified per step (None: no tree beats one-token decoding on this device)."""
        return self.plan.tree

    def _target(self):
        if isinstance(self.base, DMCDecoder):
            return DMCTarget(self.base.dmc)
        return DenseTarget(self.model, self.base.cache)

    def prefill(self, prompt):
        return self.base.prefill(prompt)

    def generate(self, prompt, params, sampler, eos):
        if self.tree is None:
            return (yield from self.base.generate(prompt, params, sampler, eos))
        greedy = params.temperature == 0
        accept = accept_greedy if greedy else TypicalAcceptance(params.temperature)
        logits, hidden = self.base.prefill(prompt)
        target = self._target()
        if self._graph is None and isinstance(target, DenseTarget):
            self._graph = TreeGraph.for_device(self.model, self.tree, target.cache)
        produced = 0
        for ids in medusa_generate(self.model, self.heads, self.tree, target, logits, hidden,
                                   params.max_new_tokens, eos, None if greedy else sampler, accept, self._graph):
            produced += len(ids)
            self.cached_ids += ids  # every accepted token's keys/values are in the cache, in order
            yield ids
        return "length" if produced >= params.max_new_tokens or \
            target.length + self.tree.num_nodes > target.max_len else "eos"

    def kv_bytes(self) -> tuple[int, int]:
        return self.base.kv_bytes()

    def reset(self) -> None:
        self.base.reset()

    def free(self) -> None:
        self.base.free()
        self._graph = None
