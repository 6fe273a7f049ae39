"""A preallocated, contiguous KV cache: one K and one V buffer per layer."""

from __future__ import annotations

import torch

from engine.config import ModelConfig


def kv_cache_bytes(cfg: ModelConfig, max_len: int, batch: int, dtype: torch.dtype) -> int:
    """What a KVCache of ``max_len`` positions holds, K and V of every layer."""
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * max_len * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, cfg: ModelConfig, max_len: int, batch: int, device, dtype):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions 0..length-1 hold valid entries

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, Hkv, T, D]) at positions start..start+T-1 of one layer and return the
        layer's keys and values for positions 0..start+T-1."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes_used(self) -> int:
        per_pos = self.k[:, :, :, 0].numel() * self.k.element_size() * 2
        return per_pos * self.length

    def nbytes_allocated(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()  # = kv_cache_bytes(...)
