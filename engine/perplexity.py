"""Perplexity of a model on a text: the quality check for a weight format (bf16 vs FP8).

Sliding windows as is usual for fixed-context models: each window of ``window`` tokens starts
``stride`` tokens after the previous one, and only the tokens not scored by an earlier window
are scored, each with at least ``window - stride`` tokens of context (except at the start)."""

from __future__ import annotations

import math

import torch

from engine.errors import EngineError
from engine.model.llama import LlamaModel


def perplexity(model: LlamaModel, ids: list[int], window: int = 512, stride: int = 256) -> dict:
    if len(ids) < 2:
        raise EngineError("the text is too short: it needs at least 2 tokens")
    if window < 2:
        raise EngineError(f"window must be at least 2 tokens (one predicts the next), got {window}")
    if not 0 < stride <= window:
        raise EngineError(f"stride must be in 1..window ({window}), got {stride}")
    window = min(window, model.cfg.max_position_embeddings)
    cache = model.new_cache(window)
    nll, scored, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, stride):
            end = min(start + window, len(ids))
            chunk = torch.tensor([ids[start:end]], device=model.device)
            logits = model.forward_all(chunk, cache, 0)[0, :-1]
            targets = chunk[0, 1:]
            # position i of the window predicts token start + i + 1; score only the new ones
            first_new = max(prev_end - start - 1, 0)
            logp = torch.log_softmax(logits[first_new:].float(), dim=-1)
            nll -= logp.gather(1, targets[first_new:, None]).sum().item()
            scored += len(targets) - first_new
            prev_end = end
            if end == len(ids):
                break
    if not math.isfinite(nll):
        raise EngineError("the model's log-probabilities are not finite (NaN or infinite weights?)")
    return {"perplexity": math.exp(nll / scored), "tokens": scored}
