"""The linear layer kinds, the one place a weight format plugs in: ``Linear`` (float weights, our
CPU kernel or a batched GEMM), ``Fp8Linear`` (e4m3 weights with per-tensor or per-channel
scales, activations quantized per token or per tensor, fp32 accumulation: our Triton kernels on
CUDA, our CPU kernel on an x86 CPU, the PyTorch reference elsewhere) and ``Int8Linear`` (int8
weights with per-channel scales, float32 activations and arithmetic: the lm_head of FP8 models
on a CPU). All are called as ``lin(x, residual=None)``."""

from __future__ import annotations

import torch

from kernels import cpu_gemm
from kernels.fp8_gemm import fp8_gemm
from kernels.fp8_quant import quantize_rows, quantize_static


class Linear:
    """y = x @ W (+ b) (+ residual). The one place a weight format plugs in.

    On an x86 CPU with AVX2, float32 and bfloat16 weights (``--quantize bf16``: half the bytes,
    widened to float32 in registers) are packed in 16-column panels for our small-M
    GEMM (kernels/cpu_gemm): at 1…16 rows it reads W once per call, where the GEMM library's
    cost doubles or triples from one row to a few (a Medusa tree's verify pass). Elsewhere W is
    stored as ``splits`` column blocks, [splits, in, out / splits], and multiplied with one
    batched GEMM: on a CPU without our kernel, a batch of two blocks runs on both cores and
    reads the weights ~25 % faster than one matrix product; each output is the same dot
    product as with one block."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None = None, splits: int = 1):
        k, n = weight_t.shape
        self.in_features, self.out_features, self.bias = k, n, bias
        self.packed = None
        if cpu_gemm.packs(weight_t.device, weight_t.dtype):
            self.packed, self.weight, self.splits = cpu_gemm.pack(weight_t), None, 1
            return
        if weight_t.device.type == "cpu" and weight_t.dtype == torch.bfloat16:
            weight_t = weight_t.float()  # a CPU without our kernel computes in float32
        if n % splits:
            splits = 1
        self.splits = splits
        self.weight = weight_t.view(k, splits, n // splits).transpose(0, 1).contiguous()

    @property
    def device(self) -> torch.device:
        return (self.weight if self.packed is None else self.packed).device

    def dense(self) -> torch.Tensor:
        """W as [in, out] (a copy when the storage is blocked or packed)."""
        if self.packed is not None:
            return cpu_gemm.unpack(self.packed, self.out_features)
        return self.weight.transpose(0, 1).reshape(self.in_features, self.out_features)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The product as [splits, tokens, out / splits] (no bias): for a fused weight whose
        blocks are its parts (gate | up), the parts come out separate, with no copy."""
        x2 = x.reshape(1, -1, self.in_features)
        return torch.bmm(x2.expand(self.splits, -1, -1), self.weight)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            x2 = x.reshape(-1, self.in_features).contiguous()
            r2 = None if residual is None else residual.reshape(x2.shape[0], self.out_features).contiguous()
            out = cpu_gemm.gemm(x2, self.packed, self.out_features, self.bias, r2)
            return out.view(*x.shape[:-1], self.out_features)
        if self.splits == 1:
            x2 = x.reshape(-1, self.in_features)
            if residual is not None and self.bias is None:
                return torch.addmm(residual.reshape(x2.shape[0], -1), x2, self.weight[0]).view(residual.shape)
            out = x2 @ self.weight[0]
        else:
            out = self.blocks(x).transpose(0, 1).reshape(-1, self.out_features)
        out = out.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out if residual is None else out + residual

    def cpu_panels(self) -> tuple | None:
        """(panels, bias, None, None) for our CPU kernels (kernels/cpu_layer.py), where stored so."""
        return None if self.packed is None else (self.packed, self.bias, None, None)

    def nbytes(self) -> int:
        w = self.weight if self.packed is None else self.packed
        n = w.numel() * w.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def default_splits(device) -> int:
    """Column blocks per weight (see Linear): two on a CPU, one on a GPU."""
    return 2 if torch.device(device).type == "cpu" else 1


class Fp8Linear:
    """y = dequant(quant(x) @ W_fp8^T) (+ b) (+ residual); W kept [out, in] as checkpoints store it,
    or, on an x86 CPU with our kernel (kernels/cpu_gemm), in its 16-column panels as bytes: the
    activations are quantized per token (or with the static input scale) exactly as on a GPU, the
    weights widened to float32 in registers and the scales applied after the fp32 sum."""

    splits = 1  # one block: see Linear

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        assert weight.dtype == torch.float8_e4m3fn and weight.dim() == 2
        self.weight_scale = weight_scale.float().reshape(-1, 1) if weight_scale.numel() > 1 \
            else weight_scale.float().reshape(())
        self.input_scale = None if input_scale is None else input_scale.float().reshape(())
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.packed = None
        if cpu_gemm.packs(weight.device, weight.dtype):
            self.packed, self._weight = cpu_gemm.pack(weight.t()), None
            self._col_scale = self.weight_scale.reshape(-1).contiguous()
            self._bias = None if bias is None else bias.float().contiguous()
            self._input_scale = None if self.input_scale is None else self.input_scale.reshape(1)
        else:
            self._weight = weight  # [N, K] fp8

    @property
    def weight(self) -> torch.Tensor:
        """W [out, in] in FP8 (a copy where it is stored in panels)."""
        return self._weight if self.packed is None else cpu_gemm.unpack(self.packed, self.out_features).t()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Fp8Linear":
        """From a high-precision weight [N, K]: per-output-channel scales, dynamic per-token
        activations (the scheme of compressed-tensors' FP8-dynamic checkpoints)."""
        q, scale = quantize_rows(weight)
        return cls(q, scale, None, bias)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None and x.dtype == torch.float32:
            xv, xs = cpu_gemm.quantize_activations(x2.contiguous(), self._input_scale)
            r2 = None if residual is None else residual.reshape(x2.shape[0], self.out_features).contiguous()
            # a long prompt: the weights widened once for the BLAS library's large-M kernels (our
            # kernel widens them again for every few rows)
            gemm = cpu_gemm.gemm if x2.shape[0] <= cpu_gemm.SMALL_M else cpu_gemm.gemm_reference
            out = gemm(xv, self.packed, self.out_features, self._bias, r2, xs, self._col_scale)
            return out.view(*x.shape[:-1], self.out_features)
        if self.input_scale is None:
            xq, xs = quantize_rows(x2)
        else:
            xq, xs = quantize_static(x2, self.input_scale), self.input_scale
        out = fp8_gemm(xq, self.weight, xs, self.weight_scale, self.bias, out_dtype=x.dtype)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if residual is None else out + residual

    def dense(self) -> torch.Tensor:
        """W dequantized, as [in, out] float32 (e4m3 * scale: the weights this layer computes with)."""
        return (self.weight.float() * self.weight_scale).t()

    def cpu_panels(self) -> tuple | None:
        """(panels, bias, weight scales, static input scale or None) for our CPU kernels
        (kernels/cpu_layer.py), where stored so."""
        if self.packed is None:
            return None
        return self.packed, self._bias, self._col_scale, self._input_scale

    def nbytes(self) -> int:
        n = self.out_features * self.in_features + self.weight_scale.numel() * 4
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class Int8Linear:
    """y = (x @ W_int8^T) * scale (+ b) (+ residual): int8 weights rounded to nearest per output
    channel (scale = max |row| / 127), activations and arithmetic in float32, the scale applied
    after the sum. One byte per weight like FP8, with 127 evenly spaced levels per channel
    instead of e4m3's 3 mantissa bits: the lm_head of FP8 models on a CPU, where a small
    model's lm_head is a large share of the bytes a decode step reads (the embedded model's:
    +0.14 % perplexity against a bf16 lm_head's +0.02 %, where an FP8 one costs +3.9 %). In our
    CPU kernel's panels (kernels/cpu_gemm) where it serves, else the dequantized float32 weight."""

    splits = 1  # one block: see Linear

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        assert weight.dtype == torch.int8 and weight.dim() == 2
        self.out_features, self.in_features = weight.shape
        self.weight_scale = weight_scale.float().reshape(-1).contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.packed = cpu_gemm.pack(weight.t()) if self.in_panels(weight.device) else None
        self._dense = None if self.packed is not None else weight.float().t() * self.weight_scale

    @staticmethod
    def in_panels(device) -> bool:
        """Whether int8 weights on this device are our CPU kernel's (else dequantized)."""
        return cpu_gemm.packs(device, torch.int8)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """From a high-precision weight [N, K]: per-row scales, rounded to nearest."""
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scale, bias)

    @property
    def device(self) -> torch.device:
        return (self._dense if self.packed is None else self.packed).device

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        r2 = None if residual is None else residual.reshape(x2.shape[0], self.out_features).float().contiguous()
        if self.packed is not None:
            # a long prompt: the weights widened once for the BLAS library's large-M kernels (as Fp8Linear)
            gemm = cpu_gemm.gemm if x2.shape[0] <= cpu_gemm.SMALL_M else cpu_gemm.gemm_reference
            out = gemm(x2, self.packed, self.out_features, self.bias, r2, None, self.weight_scale)
        else:
            out = x2 @ self._dense
            out = out if self.bias is None else out + self.bias
            out = out if r2 is None else out + r2
        return out.view(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        """W dequantized, as [in, out] float32 (the weights this layer computes with)."""
        if self.packed is None:
            return self._dense
        return cpu_gemm.unpack(self.packed, self.out_features).float() * self.weight_scale

    def cpu_panels(self) -> tuple | None:
        return None  # not a decoder layer's kind

    def nbytes(self) -> int:
        n = self.out_features * self.in_features + self.weight_scale.numel() * 4
        return n + (0 if self.bias is None else self.bias.numel() * 4)
