"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from engine.events import SamplingParams


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities [V] after temperature, top-k and top-p (in that order, as transformers does)."""
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p; always keep the first
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits.softmax(-1)


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        params.check()
        self.params = params
        self.greedy = params.temperature == 0
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] for the last position."""
        if self.greedy:
            return int(logits.argmax())
        probs = filtered_probs(logits, self.params)
        return int(torch.multinomial(probs, 1, generator=self.generator))
