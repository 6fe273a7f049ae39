"""Rotary position embeddings, including Llama 3.1's "llama3" frequency scaling."""

from __future__ import annotations

import math

import torch

from engine.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies (float32, head_dim // 2), scaled as the config says."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs.kind == "linear":
        return inv / rs.factor
    if rs.kind == "llama3":
        old_ctx = rs.original_max_position_embeddings
        low_wavelen = old_ctx / rs.low_freq_factor
        high_wavelen = old_ctx / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def cos_sin_table(cfg: ModelConfig, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for positions 0..length-1, each [length, head_dim].

    Rotation of pairs (i, i + D/2), as Hugging Face Llama does: x*cos + rotate_half(x)*sin with
    rotate_half(x) = (-x2, x1). The sin returned here has its first half negated, so that the
    rotation is x*cos + roll(x, D/2)*sin, one op fewer."""
    inv = inv_frequencies(cfg).to(device)
    pos = torch.arange(length, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : cfg.head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)
