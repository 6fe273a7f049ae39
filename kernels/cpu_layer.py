"""Llama decoder layers for a few tokens, all of them in one call on an x86 CPU (cpu_layer.cpp):
a decode step or a Medusa tree's verify pass without the ~40 PyTorch operations per layer whose
dispatch costs as much as reading the weights at these sizes, nor a Python loop over the layers.
The projections are our small-M GEMM over the same panels (kernels/cpu_gemm.py);
``decoder_layer_reference`` is the same layer in PyTorch operations, which the kernel is tested
against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import cpu_gemm
from .cpu_ops import available  # noqa: F401 (usable where the CPU library is)


class LayerStack:
    """Consecutive decoder layers as the kernel takes them, flattened once: ``layers`` is per
    layer ((attention norm, MLP norm) [H], panels), ``panels`` per projection (qkv, o, gate_up,
    down) a tuple (packed panels, bias or None, FP8 weight scale [n] or [1] or None, FP8 static
    input scale [1] or None)."""

    def __init__(self, layers: list[tuple[list[torch.Tensor], list[tuple]]]):
        self.norms = [n for norms, _ in layers for n in norms]
        self.packed, self.bias, self.col, self.inp = ([p[i] for _, panels in layers for p in panels] for i in range(4))

    def __call__(self, x: torch.Tensor, eps: float, heads: int, kv_heads: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                 tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] float32 -> the last layer's output [T, H]. Each layer's T new keys and values go
        to slots start..start+T-1 of its ``k_cache``, ``v_cache`` [L, Hkv, Lmax, D]; the tokens
        attend to every earlier slot and, among themselves, causally or as ``tree_mask`` [T, T]
        allows. ``cos``, ``sin`` [T, D]: the rotation of their positions (engine/model/rope.py)."""
        return torch.ops.chatapp_cpu.decoder_layers(x, self.norms, eps, self.packed, self.bias, self.col, self.inp,
                                                    heads, kv_heads, k_cache, v_cache, start, cos, sin, tree_mask)


def decoder_layer(x: torch.Tensor, norms: list[torch.Tensor], eps: float, panels: list[tuple], heads: int,
                  kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, cos: torch.Tensor,
                  sin: torch.Tensor, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer (see LayerStack), its caches [Hkv, Lmax, D]."""
    return LayerStack([(norms, panels)])(x, eps, heads, kv_heads, k_cache[None], v_cache[None], start, cos, sin,
                                         tree_mask)


def decoder_layer_reference(x, norms, eps, panels, heads, kv_heads, k_cache, v_cache, start, cos, sin,
                            tree_mask=None) -> torch.Tensor:
    t, h = x.shape
    d = cos.shape[1]
    outs = ((heads + 2 * kv_heads) * d, h, 2 * panels[3][0].shape[1], h)

    def project(i, a, residual=None):
        packed, bias, col, inp = panels[i]
        if col is None:
            return cpu_gemm.gemm_reference(a, packed, outs[i], bias, residual)
        a, s = cpu_gemm.quantize_activations(a.contiguous(), inp)  # FP8: activations quantized as the kernel does
        return cpu_gemm.gemm_reference(a, packed, outs[i], bias, residual, s, col)

    qkv = project(0, F.rms_norm(x, (h,), norms[0], eps))
    q_size, kv_size = heads * d, kv_heads * d
    qk = qkv[:, :q_size + kv_size].view(t, heads + kv_heads, d)
    qk = qk * cos[:, None] + qk.roll(d // 2, -1) * sin[:, None]
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, q_size + kv_size:].view(t, kv_heads, d)
    k_cache[:, start:start + t] = k.transpose(0, 1)
    v_cache[:, start:start + t] = v.transpose(0, 1)
    end = start + t
    seen = torch.ones(t, end, dtype=torch.bool)
    seen[:, start:] = tree_mask if tree_mask is not None else torch.ones(t, t, dtype=torch.bool).tril()
    groups = heads // kv_heads
    keys = k_cache[:, :end].repeat_interleave(groups, 0)  # [heads, end, D]
    values = v_cache[:, :end].repeat_interleave(groups, 0)
    scores = torch.einsum("thd,hsd->hts", q, keys) / math.sqrt(d)
    attn = torch.einsum("hts,hsd->thd", scores.masked_fill(~seen, float("-inf")).softmax(-1), values)
    x1 = project(1, attn.reshape(t, q_size), x)
    gate, up = project(2, F.rms_norm(x1, (h,), norms[1], eps)).chunk(2, dim=-1)
    return project(3, F.silu(gate) * up, x1)
