"""Small-M float32 GEMM for x86 CPUs (cpu_gemm.cpp): y = x @ W (+ bias) (+ residual) with W
packed in 16-column panels, read once per call whatever the number of rows. On our CPUs the
GEMM library's cost grows steeply from M = 1 to M = 2…16 (a Medusa tree's verify pass); this
kernel's barely does.

It is part of the CPU library (kernels/cpu_ops.py: built on first use); ``available()`` says
whether it could be built, and callers fall back to the GEMM library where not."""

from __future__ import annotations

import torch

from .cpu_ops import available, why_not  # noqa: F401 (the kernel is usable where the CPU library is)

PANEL = 16


def pack(weight_t: torch.Tensor) -> torch.Tensor:
    """W [K, N] -> panels [ceil(N / 16), K, 16] (the last one zero-padded), 32-byte aligned."""
    k, n = weight_t.shape
    panels = -(-n // PANEL)
    if n % PANEL:
        weight_t = torch.nn.functional.pad(weight_t, (0, panels * PANEL - n))
    return weight_t.reshape(k, panels, PANEL).transpose(0, 1).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """panels [P, K, 16] -> W [K, n]."""
    return packed.transpose(0, 1).reshape(packed.shape[1], -1)[:, :n]


def gemm(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> [M, n] float32 (``available()`` must be true)."""
    return torch.ops.chatapp_cpu.small_gemm(x, packed, n, bias, residual)


def gemm_reference(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ unpack(packed, n)
    if bias is not None:
        y = y + bias
    return y if residual is None else y + residual
