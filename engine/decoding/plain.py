"""Plain decoding: one token per step over a dense KV cache (engine/model/kv_cache.py)."""

from __future__ import annotations

import torch

from engine.decoding.base import Decoder

PREFILL_CHUNK = 512  # prompt tokens per forward pass


class PlainDecoder(Decoder):
    name = "plain"

    def __init__(self, model, context: int):
        super().__init__(model, context)
        self.cache = model.new_cache(context)

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the cache to hold ``prompt`` and return the logits [vocab] and the final-normed
        hidden state [H] after its last token. The longest prefix already in the cache (the
        earlier turns of a chat) is reused; the last token always runs."""
        reuse = 0
        for a, b in zip(self.cached_ids, prompt[:-1]):
            if a != b:
                break
            reuse += 1
        pos, last = reuse, None
        self.cached_ids = self.cached_ids[:reuse]
        while pos < len(prompt):
            chunk = prompt[pos:pos + PREFILL_CHUNK]
            last = self.model.last_hidden(self._ids(chunk), self.cache, pos)[0]
            pos += len(chunk)
        self.cached_ids = list(prompt)
        return self.model.logits(last), last

    def generate(self, prompt, params, sampler, eos):
        logits, _ = self.prefill(prompt)
        cache, model = self.cache, self.model
        return (yield from self._one_token_steps(
            logits, params, sampler, eos, lambda: cache.length >= cache.max_len,
            lambda tok: model.forward(self._ids([tok]), cache, cache.length)[0, -1]))

    def kv_bytes(self) -> tuple[int, int]:
        used = self.cache.nbytes_used()
        return used, used

    def free(self) -> None:
        super().free()
        self.cache = None
