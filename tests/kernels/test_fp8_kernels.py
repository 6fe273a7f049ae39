"""FP8 kernels against their PyTorch references (Triton's interpreter on machines without a GPU),
at small and odd shapes, including saturation at +-448."""

import pytest
import torch

from kernels.fp8_gemm import fp8_gemm_reference, fp8_gemm_triton, pick_config
from kernels.fp8_quant import FP8, quantize_rows_reference, quantize_rows_triton, quantize_static_reference, \
    quantize_static_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=0)


def test_e4m3_rounding_covers_every_value():
    """Every representable magnitude, the midpoints between neighbours (ties to even) and points
    just off them: the kernel rounds as PyTorch's conversion does."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()  # all non-negative finite values
    mids = (grid[:-1] + grid[1:]) / 2
    x = torch.cat([grid, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), torch.tensor([448.0, 460.0, 1e9, 1e-12])])
    x = torch.cat([x, -x]).to(DEV)
    one = torch.ones((), device=DEV)
    exact(quantize_static_triton(x, one), quantize_static_reference(x, one))


@pytest.mark.parametrize("shape", [(1, 7), (3, 100), (17, 1030), (5, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows(shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).to(DEV)
    x[0, 0] = 0  # a zero
    if shape[0] > 2:
        x[2] = 0  # an all-zero row: scale falls back to EPS / 448, values stay 0
    q, s = quantize_rows_triton(x)
    q_ref, s_ref = quantize_rows_reference(x)
    exact(s, s_ref)
    exact(q, q_ref)
    assert q.float().abs().max() <= 448


def test_quantize_static_saturates():
    x = torch.tensor([1000.0, -1000.0, 447.0, -449.0, 0.3, 0.0], device=DEV)
    scale = torch.tensor(0.5, device=DEV)
    q = quantize_static_triton(x, scale)
    exact(q, quantize_static_reference(x, scale))
    assert q.float().tolist()[:4] == [448.0, -448.0, 448.0, -448.0]


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, sa = quantize_rows_reference(torch.randn(m, k, generator=g))
    w, sw = quantize_rows_reference(torch.randn(n, k, generator=g) * 0.05)
    return a.to(DEV), w.to(DEV), sa.to(DEV), sw.to(DEV)


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (3, 40, 200), (17, 72, 130), (16, 64, 1000)])
@pytest.mark.parametrize("scales", ["tensor", "token_channel"])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_reference(m, n, k, scales, bias):
    a, w, sa, sw = _operands(m, n, k)
    if scales == "tensor":
        sa, sw = sa.max(), sw.max()
    b = torch.randn(n, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).to(DEV) if bias else None
    expected = fp8_gemm_reference(a, w, sa, sw, b)
    # the decode and the prefill launch shapes, with and without split-K, small tiles for the interpreter
    configs = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=s, GROUP_M=1) for s in (1, 3)]
    configs.append(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=2))
    for cfg in configs:
        got = fp8_gemm_triton(a, w, sa, sw, b, config=cfg)
        assert got.dtype == torch.bfloat16
        # fp32 accumulation in another order: agreement to bf16 rounding
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1.6e-2)


def test_gemm_with_default_configs():
    a, w, sa, sw = _operands(2, 96, 512)
    cfg = pick_config(2, 96, 512)
    assert cfg["BLOCK_M"] == 16 and cfg["SPLIT_K"] > 1  # decode: split-K to fill the SMs
    got = fp8_gemm_triton(a, w, sa, sw)
    torch.testing.assert_close(got.float(), fp8_gemm_reference(a, w, sa, sw).float(), atol=1e-2, rtol=1.6e-2)


def test_autotuning_times_the_candidates_once_per_shape_and_keeps_the_fastest(monkeypatch):
    from kernels import fp8_gemm as mod

    monkeypatch.setattr(mod, "_tuned", {})
    g = torch.Generator().manual_seed(5)
    a, sa = quantize_rows_reference(torch.randn(3, 512, generator=g))
    w, sw = quantize_rows_reference(torch.randn(40, 512, generator=g) * 0.05)
    cands = mod.candidate_configs(3, 40, 512)
    assert cands[0] == pick_config(3, 40, 512) and len(cands) > 3
    assert len({c["SPLIT_K"] for c in cands}) > 1 and len({c["BLOCK_N"] for c in cands}) > 1
    times = [5.0] * len(cands)
    times[2] = 1.0
    timed = []

    def timer(fn):
        if len(timed) == 1:
            timed.append("failed")
            raise RuntimeError("out of resources")  # a configuration the GPU cannot run is skipped
        out = fn()
        torch.testing.assert_close(out.float(), fp8_gemm_reference(a, w, sa, sw, out_dtype=torch.float32),
                                   atol=2e-2, rtol=2e-2)
        timed.append(out)
        return times[len(timed) - 1]

    best = mod.tuned_config(a, w, sa, sw, None, torch.bfloat16, timer=timer)
    assert best == cands[2] and len(timed) == len(cands)
    # the same shape bucket (M 3 -> 4) is not timed again; another one falls back to the pick off a GPU
    assert mod.tuned_config(a[:2].contiguous().repeat(2, 1), w, sa.repeat(2, 1)[:4], sw, None, torch.bfloat16) \
        == cands[2]
    assert mod.tuned_config(a[:1], w, sa[:1], sw, None, torch.bfloat16) == pick_config(1, 40, 512)
    prefill = mod.candidate_configs(300, 256, 512)
    assert prefill[0] == pick_config(300, 256, 512) and all(c["SPLIT_K"] == 1 for c in prefill)
