"""Speculative decoding: a proposer's drafts verified as a tree, several tokens per step (greedy
acceptance when greedy, typical acceptance when sampling), over the cache of the decoding it is
put on: the dense KV cache (plain) or a DMC cache. The proposer: Medusa heads
(engine/decoding/medusa/), lookup in the conversation (engine/decoding/lookup/), or both joined
in one tree (engine/decoding/speculative/proposer.py)."""

from __future__ import annotations

from engine.decoding.base import Decoder
from engine.decoding.dmc import DMCDecoder
from engine.decoding.plain import PlainDecoder
from engine.decoding.speculative.proposer import Proposer
from engine.decoding.speculative.verify import DenseTarget, DMCTarget, TypicalAcceptance, accept_greedy
from engine.decoding.speculative.verify import generate as speculative_generate


class SpeculativeDecoder(Decoder):
    """``proposer`` over ``base``, the one-token decoding whose cache holds the conversation
    (PlainDecoder or DMCDecoder): its prefill, its cache, and its steps where no proposer pays
    (``proposer`` None: the Medusa plan found no tree faster than plain decoding here).
    ``name``: the decoding's name (events.DECODINGS); ``plan``: the Medusa plan
    (engine/decoding/medusa/plan.py) where Medusa is a proposer, whose choice is the set-up shown
    in the model info."""

    def __init__(self, base: PlainDecoder | DMCDecoder, proposer: Proposer | None, name: str, plan=None):
        self.base = base
        super().__init__(base.model, base.context)
        self.proposer, self.name, self.plan = proposer, name, plan
        self.setup = plan.choices if plan is not None else None

    @property
    def cached_ids(self) -> list[int]:
        return self.base.cached_ids

    @cached_ids.setter
    def cached_ids(self, ids: list[int]) -> None:
        self.base.cached_ids = ids

    def _target(self):
        if isinstance(self.base, DMCDecoder):
            return DMCTarget(self.base.dmc)
        return DenseTarget(self.model, self.base.cache)

    def prefill(self, prompt):
        return self.base.prefill(prompt)

    def generate(self, prompt, params, sampler, eos):
        if self.proposer is None:
            return (yield from self.base.generate(prompt, params, sampler, eos))
        greedy = params.temperature == 0
        accept = accept_greedy if greedy else TypicalAcceptance(params.temperature)
        logits, hidden = self.base.prefill(prompt)
        target = self._target()
        self.proposer.begin(prompt, target)
        produced = 0
        for ids in speculative_generate(self.model, self.proposer, target, logits, hidden, params.max_new_tokens,
                                        eos, None if greedy else sampler, accept):
            produced += len(ids)
            self.cached_ids += ids  # every accepted token's keys/values are in the cache, in order
            yield ids
        return "length" if produced >= params.max_new_tokens or \
            target.length + self.proposer.max_nodes > target.max_len else "eos"

    def kv_bytes(self) -> tuple[int, int]:
        return self.base.kv_bytes()

    def reset(self) -> None:
        self.base.reset()

    def free(self) -> None:
        self.base.free()
        self.proposer = None
