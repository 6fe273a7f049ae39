"""FP8 linear layers: e4m3 weights with per-tensor or per-output-channel scales, activations
quantized per token (dynamic) or per tensor (static input scale), fp32 accumulation.

Runs our Triton kernels on CUDA and their PyTorch references elsewhere (kernels/ dispatches)."""

from __future__ import annotations

import torch

from kernels.fp8_gemm import fp8_gemm
from kernels.fp8_quant import quantize_rows, quantize_static


class Fp8Linear:
    """y = dequant(quant(x) @ W_fp8^T) (+ b) (+ residual); W kept [out, in] as checkpoints store it."""

    splits = 1  # one block: see llama.Linear

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        assert weight.dtype == torch.float8_e4m3fn and weight.dim() == 2
        self.weight = weight  # [N, K] fp8
        self.weight_scale = weight_scale.float().reshape(-1, 1) if weight_scale.numel() > 1 \
            else weight_scale.float().reshape(())
        self.input_scale = None if input_scale is None else input_scale.float().reshape(())
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Fp8Linear":
        """From a high-precision weight [N, K]: per-output-channel scales, dynamic per-token
        activations (the scheme of compressed-tensors' FP8-dynamic checkpoints)."""
        q, scale = quantize_rows(weight)
        return cls(q, scale, None, bias)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            xq, xs = quantize_rows(x2)
        else:
            xq, xs = quantize_static(x2, self.input_scale), self.input_scale
        out = fp8_gemm(xq, self.weight, xs, self.weight_scale, self.bias, out_dtype=x.dtype)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if residual is None else out + residual

    def nbytes(self) -> int:
        n = self.weight.numel() + self.weight_scale.numel() * 4
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())
