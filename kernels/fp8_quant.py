"""FP8 (e4m3fn) quantization: static per-tensor, dynamic per-row (per-token activations,
per-output-channel weights). Saturating at +-448, round-to-nearest-even.

Scales are dequantization multipliers, as in both checkpoint formats (modelopt and
compressed-tensors): real = fp8 * scale, so q = saturate(x / scale). A dynamic row scale is
max(|row|, EPS) / 448.

Each function has a PyTorch reference (``*_reference``) of the same signature; the public function
runs the Triton kernel on CUDA (or under TRITON_INTERPRET=1) and the reference elsewhere."""

from __future__ import annotations

import torch

from ._triton import triton, tl, use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-12


# ---- references ---------------------------------------------------------------------------
def quantize_static_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (q [R, C] fp8, scale [R, 1] fp32)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# ---- Triton --------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _round_to_e4m3(v):
        """v (fp32, already within +-448) rounded to the nearest e4m3 value, ties to even, in fp32
        arithmetic, so that the conversion that follows is exact. (Converting unrounded values
        is right on the GPU but wrong in Triton's interpreter when rounding carries into the
        exponent.)"""
        bits = v.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
        magic = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to an integer, ties to even
        subnormal = ((v * 512.0 + magic) - magic) * (1.0 / 512.0)  # e4m3 subnormal step is 2**-9
        return tl.where(tl.abs(v) < 0.015625, subnormal, normal)

    @triton.jit
    def _quantize_static_kernel(x_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.clamp(x / tl.load(scale_ptr), -448.0, 448.0)
        tl.store(q_ptr + offs, _round_to_e4m3(v).to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, cols, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
        tl.store(s_ptr + row, scale)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.clamp(x / scale, -448.0, 448.0)
            tl.store(q_ptr + row * stride_q + offs, _round_to_e4m3(v).to(tl.float8e4nv), mask=mask)


def quantize_static_triton(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    n = x.numel()
    block = 1024
    _quantize_static_kernel[(triton.cdiv(n, block),)](x, q, scale.float().reshape(1), n, BLOCK=block)
    return q


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(-1) == 1
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8, device=x.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = min(1024, triton.next_power_of_2(cols))
    _quantize_rows_kernel[(rows,)](x, q, s, cols, x.stride(0), q.stride(0), BLOCK=block)
    return q, s


# ---- dispatch ------------------------------------------------------------------------------
def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor quantization with a given (dequantization) scale."""
    return quantize_static_triton(x, scale) if use_triton(x) else quantize_static_reference(x, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantization of x [R, C]: per-token activations, per-channel weights."""
    return quantize_rows_triton(x) if use_triton(x) else quantize_rows_reference(x)
