"""The CPU small-M GEMM (kernels/cpu_gemm.cpp) against its reference, and the Linear layer that
uses it. Where the kernel cannot be built here (no AVX2, no compiler), the tests say so and skip;
CI's machines build it."""

import pytest
import torch

from kernels import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason=f"CPU GEMM kernel: {cpu_gemm.why_not()}")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_pack_round_trip_pads_the_last_panel():
    w = rand(37, 50)
    p = cpu_gemm.pack(w)
    assert p.shape == (4, 37, 16) and p.is_contiguous()
    assert torch.equal(p[3, :, 2:], torch.zeros(37, 14))
    assert torch.equal(cpu_gemm.unpack(p, 50), w)


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 8, 12, 13, 16, 40, 70])
@pytest.mark.parametrize("k,n", [(576, 960), (64, 40), (1536, 576), (3, 17)])
def test_gemm_against_reference(m, k, n):
    x, w, b, r = rand(m, k, seed=1), rand(k, n, seed=2), rand(n, seed=3), rand(m, n, seed=4)
    p = cpu_gemm.pack(w)
    for bias, res in ((None, None), (b, None), (None, r), (b, r)):
        got = cpu_gemm.gemm(x, p, n, bias, res)
        torch.testing.assert_close(got, cpu_gemm.gemm_reference(x, p, n, bias, res), atol=1e-4 * k ** 0.5, rtol=1e-5)


def test_a_row_does_not_depend_on_the_others():
    """Each output is one sum in k order whatever M is: a row multiplied alone or among 15
    others gives bit-identical results (plain decoding and a Medusa tree agree exactly)."""
    x, w = rand(16, 576, seed=5), rand(576, 3072, seed=6)
    p = cpu_gemm.pack(w)
    together = cpu_gemm.gemm(x, p, 3072)
    for i in (0, 5, 9, 15):
        assert torch.equal(cpu_gemm.gemm(x[i:i + 1], p, 3072)[0], together[i])


def test_strided_rows_and_bad_arguments():
    x = rand(4, 100, seed=7)[:, :64]  # rows with a stride of 100
    w = rand(64, 32, seed=8)
    p = cpu_gemm.pack(w)
    torch.testing.assert_close(cpu_gemm.gemm(x, p, 32), x @ w, atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="packed weight"):
        cpu_gemm.gemm(rand(2, 63), p, 32)
    with pytest.raises(RuntimeError, match="bad n"):
        cpu_gemm.gemm(x, p, 33)


def test_linear_uses_panels_on_cpu_and_matches_the_dense_product():
    from engine.model.linear import Linear

    w, b = rand(96, 80, seed=9), rand(80, seed=10)
    lin = Linear(w, b, splits=2)
    assert lin.packed is not None and lin.weight is None
    x, res = rand(3, 5, 96, seed=11), rand(3, 5, 80, seed=12)
    torch.testing.assert_close(lin(x, res), x @ w + b + res, atol=1e-4, rtol=1e-5)
    assert torch.equal(lin.dense(), w)
    assert lin.nbytes() == (96 * 80 + 80) * 4


def e4m3_every_value() -> torch.Tensor:
    """Every finite e4m3 value (both zeros, the subnormals, +-448), as bytes -> float8."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    f = b.view(torch.float8_e4m3fn)
    return f[~f.float().isnan()]


def test_fp8_int8_and_bf16_panels_widen_every_value_exactly():
    """One row of x with a single 1 picks out W's k-th row: every stored value comes back as its
    float32 value (the panel read widens exactly; FP8 with K a multiple of 4 and not, the two
    layouts where the CPU has AVX-512 BF16)."""
    for values in (e4m3_every_value(), e4m3_every_value()[:-16], torch.arange(-128, 128).to(torch.int8),
                   rand(4, 64, seed=13).to(torch.bfloat16).reshape(-1)):
        n = 16
        w = torch.nn.functional.pad(values.view(torch.uint8) if values.dtype == torch.float8_e4m3fn else values,
                                    (0, -len(values) % n)).view(values.dtype).reshape(-1, n)  # [K, 16]
        p = cpu_gemm.pack(w)
        assert p.dtype == values.dtype and torch.equal(cpu_gemm.unpack(p, n).float(), w.float())
        scales = {torch.float8_e4m3fn: (torch.ones(1), torch.ones(1)), torch.int8: (None, torch.ones(1))}.get(
            values.dtype, (None, None))
        for k in range(0, w.shape[0], 7):
            x = torch.zeros(1, w.shape[0])
            x[0, k] = 1.0
            assert torch.equal(cpu_gemm.gemm(x, p, n, None, None, *scales)[0], w[k].float()), k


@pytest.mark.parametrize("m", [1, 3, 6, 8, 16, 70])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 40), (62, 40)])
@pytest.mark.parametrize("scales", ["token_channel", "tensor"])
def test_fp8_gemm_against_the_dequantized_reference(m, k, n, scales):
    from kernels.fp8_quant import quantize_rows_reference

    wq, sw = quantize_rows_reference(rand(n, k, seed=14) * 0.05)  # [N, K], per-channel scales
    xq, sx = quantize_rows_reference(rand(m, k, seed=15))
    if scales == "tensor":
        sx, sw = sx.max().reshape(1), sw.max().reshape(1)
    sx, sw = sx.reshape(-1).float(), sw.reshape(-1).float()
    p = cpu_gemm.pack(wq.t())
    b, r = rand(n, seed=16), rand(m, n, seed=17)
    for bias, res in ((None, None), (b, r)):
        got = cpu_gemm.gemm(xq.float(), p, n, bias, res, sx, sw)
        torch.testing.assert_close(got, cpu_gemm.gemm_reference(xq.float(), p, n, bias, res, sx, sw),
                                   atol=1e-4 * k ** 0.5, rtol=1e-5)
    # the same as the FP8 GEMM's own reference (the one the GPU kernel is tested against)
    from kernels.fp8_gemm import fp8_gemm_reference

    want = fp8_gemm_reference(xq, wq, sx, sw, out_dtype=torch.float32)
    torch.testing.assert_close(cpu_gemm.gemm(xq.float(), p, n, None, None, sx, sw), want, atol=1e-4 * k ** 0.5,
                               rtol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 9, 70])
@pytest.mark.parametrize("k", [576, 61])
def test_int8_gemm_against_the_dequantized_reference(m, k):
    from engine.model.linear import Int8Linear

    w = rand(200, k, seed=22)
    lin = Int8Linear.quantize(w)
    assert lin.packed is not None and lin.packed.dtype == torch.int8 and lin.nbytes() == 200 * k + 200 * 4
    q = torch.round(w / (w.abs().amax(1, keepdim=True) / 127))
    torch.testing.assert_close(lin.dense(), (q * (w.abs().amax(1, keepdim=True) / 127)).t())
    x, r = rand(m, k, seed=23), rand(m, 200, seed=24)
    torch.testing.assert_close(lin(x, r), x @ lin.dense() + r, atol=1e-4 * k ** 0.5, rtol=1e-5)
    exact = x @ w.t()
    assert (lin(x) - exact).norm() < 0.01 * exact.norm()  # int8's own error: under 1 %
    if 1 < m <= cpu_gemm.SMALL_M:  # (more rows go to the BLAS library)
        assert torch.equal(lin(x[1:2])[0], lin(x)[1])


@pytest.mark.skipif(not cpu_gemm.quads(), reason="the CPU has no AVX-512 BF16: the AVX2 layout is the only one")
def test_the_avx2_layout_where_the_cpu_has_avx512():
    """The FP8 tests again with the AVX-512 path turned off (CHATAPP_CPU_ISA=avx2)."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "every_value or fp8_gemm_against or fp8_rows"],
                         env={**os.environ, "CHATAPP_CPU_ISA": "avx2"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "passed" in out.stdout and "failed" not in out.stdout


@pytest.mark.parametrize("m", [1, 5, 16])
def test_bf16_gemm_against_reference(m):
    w = rand(576, 1536, seed=18).to(torch.bfloat16)
    x = rand(m, 576, seed=19)
    p = cpu_gemm.pack(w)
    torch.testing.assert_close(cpu_gemm.gemm(x, p, 1536), x @ w.float(), atol=1e-4 * 24, rtol=1e-5)


def test_fp8_rows_do_not_depend_on_the_others_and_scales_are_checked():
    from kernels.fp8_quant import quantize_rows_reference

    wq, sw = quantize_rows_reference(rand(3072, 576, seed=20))
    xq, sx = quantize_rows_reference(rand(16, 576, seed=21))
    p, sx, sw = cpu_gemm.pack(wq.t()), sx.reshape(-1).float(), sw.reshape(-1).float()
    together = cpu_gemm.gemm(xq.float(), p, 3072, None, None, sx, sw)
    for i in (0, 7, 15):
        assert torch.equal(cpu_gemm.gemm(xq[i:i + 1].float(), p, 3072, None, None, sx[i:i + 1], sw)[0], together[i])
    with pytest.raises(RuntimeError, match="FP8 weights take both scales"):
        cpu_gemm.gemm(xq.float(), p, 3072)
    with pytest.raises(RuntimeError, match="row_scale"):
        cpu_gemm.gemm(xq.float(), p, 3072, None, None, sx[:3], sw)


@pytest.mark.parametrize("m,k", [(1, 576), (7, 1536), (3, 40)])
def test_activation_quantizer_equals_the_reference(m, k):
    """The kernel's FP8 activations are the PyTorch quantizer's, value for value: per row (with
    rows of zeros, tiny values in e4m3's subnormal range and ties) and with a static scale."""
    from kernels.fp8_quant import quantize_rows_reference, quantize_static_reference

    x = rand(m, k, seed=22) * 3
    x[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -2e-3, 448.0, 0.0107421875, 0.01171875, 17.0])
    if m > 1:
        x[1] = 0.0
    q, s = cpu_gemm.quantize_activations(x)
    want_q, want_s = quantize_rows_reference(x)
    assert torch.equal(s, want_s.reshape(-1)) and torch.equal(q, want_q.float())
    every = e4m3_every_value().float().sort().values  # values on the grid stay, their midpoints round to even
    grid = torch.cat([every, (every[1:] + every[:-1]) / 2]).reshape(1, -1)
    for scale in (torch.tensor(1.0), torch.tensor(0.37)):
        q, s = cpu_gemm.quantize_activations(grid * scale, scale)
        assert torch.equal(q, quantize_static_reference(grid * scale, scale).float()) and s.item() == scale.item()
