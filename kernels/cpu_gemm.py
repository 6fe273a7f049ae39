"""Small-M float32 GEMM for x86 CPUs (cpu_gemm.cpp): y = x @ W (+ bias) (+ residual) with W
(float32, bf16, FP8 or int8) packed in 16-column panels, read once per call whatever the number of rows. On our CPUs the
GEMM library's cost grows steeply from M = 1 to M = 2…16 (a Medusa tree's verify pass); this
kernel's barely does.

It is part of the CPU library (kernels/cpu_ops.py: built on first use); ``available()`` says
whether it could be built, and callers fall back to the GEMM library where not."""

from __future__ import annotations

import functools

import torch

from .cpu_ops import available, why_not  # noqa: F401 (the kernel is usable where the CPU library is)

PANEL = 16
SMALL_M = 64  # rows up to which the kernel beats widening narrow weights once for the BLAS library
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8)  # what the panels may hold
# bf16 and FP8 panel rows are stored as 8 pairs (column j, column j + 8): as 32-bit (bf16) or
# 16-bit (FP8) words, the low halves are the first 8 columns and the high halves the last 8,
# which the kernel widens with a shift or a mask in place (no shuffles, which would bound the loop)
PAIR_ORDER = torch.tensor([c for j in range(8) for c in (j, j + 8)])
PAIRED = (torch.bfloat16, torch.float8_e4m3fn)
# Where the CPU has AVX-512 BF16 and VBMI (``quads()``), FP8 panels with K a multiple of 4 hold
# groups of 4 k x 16 columns as 64 bytes in QUAD_ORDER (position -> k * 16 + column within the
# group): the kernel's byte interleave turns them into the bf16 pairs (k, k + 1) and (k + 2, k + 3)
# of the 16 columns (cpu_gemm.cpp)
QUAD = 4
QUAD_ORDER = torch.tensor([(2 * (u // 8) + (8 * lane + u % 8) % 2) * PANEL + (8 * lane + u % 8) // 2
                           for lane in range(4) for u in range(16)])


def packs(device, dtype) -> bool:
    """Whether weights of this dtype on this device go into the kernel's panels: one of
    WEIGHT_DTYPES on a CPU where the kernel is usable."""
    return torch.device(device).type == "cpu" and dtype in WEIGHT_DTYPES and available()


@functools.cache
def quads() -> bool:
    """Whether this CPU's kernel reads FP8 panels (K a multiple of 4) in QUAD_ORDER
    (``available()`` must be true)."""
    return bool(torch.ops.chatapp_cpu.fp8_quads())


def _in_quads(dtype, k: int) -> bool:
    return dtype == torch.float8_e4m3fn and k % QUAD == 0 and quads()


def pack(weight_t: torch.Tensor) -> torch.Tensor:
    """W [K, N] -> panels [ceil(N / 16), K, 16] (the last one zero-padded), 32-byte aligned, in
    W's dtype (one of WEIGHT_DTYPES; bf16 and FP8 rows in PAIR_ORDER, or FP8 groups of 4 rows in
    QUAD_ORDER where the kernel reads them so)."""
    assert weight_t.dtype in WEIGHT_DTYPES, f"no CPU kernel for {weight_t.dtype} weights"
    k, n = weight_t.shape
    w = _bits(weight_t)
    panels = -(-n // PANEL)
    if n % PANEL:
        w = torch.nn.functional.pad(w, (0, panels * PANEL - n))
    w = w.reshape(k, panels, PANEL).transpose(0, 1)
    if _in_quads(weight_t.dtype, k):
        w = w.reshape(panels, k // QUAD, QUAD * PANEL)[..., QUAD_ORDER]
    elif weight_t.dtype in PAIRED:
        w = w[..., PAIR_ORDER]
    return w.contiguous().view(panels, k, PANEL).view(weight_t.dtype)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """panels [P, K, 16] -> W [K, n]."""
    w = _bits(packed)
    panels, k = packed.shape[:2]
    if _in_quads(packed.dtype, k):
        w = w.reshape(panels, k // QUAD, QUAD * PANEL)[..., torch.argsort(QUAD_ORDER)].reshape(panels, k, PANEL)
    elif packed.dtype in PAIRED:
        w = w[..., torch.argsort(PAIR_ORDER)]
    return w.transpose(0, 1).reshape(k, -1)[:, :n].view(packed.dtype)


def _bits(w: torch.Tensor) -> torch.Tensor:
    """FP8 as bytes: padding and copies are defined for them everywhere."""
    return w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w


def gemm(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
         col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> [M, n] float32 (``available()`` must be true). FP8 panels take the
    scales: ``row_scale`` [M] or [1] (x's, per token or per tensor) and ``col_scale`` [n] or [1]
    (W's, per channel or per tensor), float32; then x holds the quantized activations' values.
    int8 panels take ``col_scale`` only (x as it is)."""
    return torch.ops.chatapp_cpu.small_gemm(x, packed, n, bias, residual, row_scale, col_scale)


def quantize_activations(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 activations for ``gemm``: x [M, K] float32 -> (e4m3 values as float32 [M, K], scale
    [M] float32 per row, or the static ``scale`` as [1]): the values and scales of
    kernels/fp8_quant's ``quantize_rows`` / ``quantize_static``, in one call."""
    return torch.ops.chatapp_cpu.quantize_e4m3(x, None if scale is None else scale.float().reshape(1))


def gemm_reference(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                   col_scale: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ unpack(packed, n).float()
    if row_scale is not None:
        y = y * row_scale.reshape(-1, 1) * col_scale.reshape(1, -1)
    elif col_scale is not None:
        y = y * col_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias
    return y if residual is None else y + residual
