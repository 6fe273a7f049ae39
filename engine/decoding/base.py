"""What every decoding offers the session: one object per decoding that owns its cache.

    decoder.generate(prompt, params, sampler, eos)   # a generator of the tokens accepted per step
                                                     # (lists of ids, ``Accepted`` where drafted);
                                                     # its return value is why it stopped: "eos"
                                                     # or "length"
    decoder.prefill(prompt)                          # the cache brought to hold the prompt, the
                                                     # longest prefix it already holds reused
    decoder.kv_bytes()                               # (K/V bytes held, what a dense cache holds)
    decoder.reset()                                  # forget what the cache holds
    decoder.free()                                   # drop the cache's memory

``cached_ids`` are the tokens whose keys/values the cache holds, in order. The decodings are
engine/decoding/plain.py, dmc.py and speculative/decoder.py (a proposer over one of the first two);
their names are events.DECODINGS."""

from __future__ import annotations

from collections.abc import Generator

import torch

from engine.decoding.sampling import Sampler
from engine.events import SamplingParams


class Accepted(list):
    """The tokens one step of a decoding produced (a list of ids) and, per token, the proposer
    that drafted it ("" for the base model's own choice: every token of a one-token step, the
    first of a speculative one; "medusa+lookup" where both drafted it). ``draft_nodes``: the
    tokens drafted for the step (its tree's nodes after the root), ``draft_depth``: the longest
    drafted path."""

    def __init__(self, ids, drafted_by: list[str] | None = None, draft_nodes: int = 0, draft_depth: int = 0):
        super().__init__(ids)
        self.drafted_by = drafted_by if drafted_by is not None else [""] * len(self)
        self.draft_nodes, self.draft_depth = draft_nodes, draft_depth


class Decoder:
    name = ""
    setup: str | None = None  # how the decoding was set up, for the model info (the Medusa tree)

    def __init__(self, model, context: int):
        self.model, self.context = model, context
        self.cached_ids: list[int] = []

    def prefill(self, prompt: list[int]):
        raise NotImplementedError

    def generate(self, prompt: list[int], params: SamplingParams, sampler: Sampler,
                 eos: frozenset[int]) -> Generator[list[int], None, str]:
        raise NotImplementedError

    def kv_bytes(self) -> tuple[int, int]:
        raise NotImplementedError

    def reset(self) -> None:
        self.cached_ids = []

    def free(self) -> None:
        self.reset()

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], device=self.model.device)

    def _one_token_steps(self, logits, params: SamplingParams, sampler: Sampler, eos, full, advance):
        """The loop of the one-token-per-step decodings: sample, stop at EOS, the token limit or
        when ``full()``, else ``advance(token)`` to the next logits."""
        produced = 0
        while True:
            tok = sampler(logits)
            if tok in eos:
                return "eos"
            yield [tok]
            produced += 1
            if produced >= params.max_new_tokens or full():
                return "length"
            logits = advance(tok)
            self.cached_ids.append(tok)
