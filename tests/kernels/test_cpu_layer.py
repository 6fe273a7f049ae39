"""The CPU decoder-layer kernel (kernels/cpu_layer.cpp) against the same layer in PyTorch
operations, for the weight kinds the engine stores (float32, bfloat16 and FP8 panels), a decode
step, a causal block of tokens and a Medusa tree, and inside the model against the
op-by-op forward."""

import pytest
import torch

from kernels import cpu_gemm, cpu_layer
from kernels.fp8_quant import quantize_rows_reference

pytestmark = pytest.mark.skipif(not cpu_layer.available(), reason="needs the CPU kernels (x86-64 with AVX2)")

H, HEADS, KV, D, INTER = 96, 6, 2, 16, 160


def panels(kind: str, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    shapes = ((H, (HEADS + 2 * KV) * D), (HEADS * D, H), (H, 2 * INTER), (INTER, H))
    out = []
    for k, n in shapes:
        w = torch.randn(k, n, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g) * 0.1 if bias else None
        if kind == "fp8":
            q, s = quantize_rows_reference(w.t())
            static = torch.tensor([0.02]) if n == H else None  # some layers with a static input scale
            out.append((cpu_gemm.pack(q.t()), b, s.reshape(-1).contiguous(), static))
        else:
            out.append((cpu_gemm.pack(w.to(getattr(torch, kind))), b, None, None))
    return out


def inputs(t: int, start: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g)
    norms = [1 + 0.1 * torch.randn(H, generator=g) for _ in range(2)]
    k_cache, v_cache = (torch.randn(KV, 40, D, generator=g) for _ in range(2))
    ang = torch.randn(t, D // 2, generator=g)
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([-ang.sin(), ang.sin()], -1)
    return x, norms, k_cache, v_cache, cos, sin


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "fp8"])
@pytest.mark.parametrize("t,start,tree", [(1, 0, False), (1, 17, False), (5, 9, False), (7, 12, True)])
def test_layer_equals_the_reference(kind, t, start, tree):
    x, norms, kc, vc, cos, sin = inputs(t, start, seed=t + start)
    p = panels(kind, seed=3, bias=kind != "bfloat16")
    mask = None
    if tree:  # node i sees itself, the root and the node before it
        mask = torch.eye(t, dtype=torch.bool)
        mask[:, 0] = True
        mask[torch.arange(1, t), torch.arange(t - 1)] = True
    kc2, vc2 = kc.clone(), vc.clone()
    got = cpu_layer.decoder_layer(x, norms, 1e-5, p, HEADS, KV, kc, vc, start, cos, sin, mask)
    want = cpu_layer.decoder_layer_reference(x, norms, 1e-5, p, HEADS, KV, kc2, vc2, start, cos, sin, mask)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(kc, kc2, atol=1e-5, rtol=1e-5)  # the new keys and values, where they belong
    torch.testing.assert_close(vc, vc2, atol=1e-5, rtol=1e-5)


def test_a_token_gets_the_same_result_alone_as_in_a_tree():
    """A tree's node whose mask row sees only the root and itself, at the root's position + 1, is
    the token a one-token step after the root would compute: bit for bit."""
    x, norms, kc, vc, cos, sin = inputs(3, 10, seed=5)
    p = panels("fp8", seed=4, bias=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    cos[2], sin[2] = cos[1], sin[1]
    x[2] = x[1]
    tree = cpu_layer.decoder_layer(x, norms, 1e-5, p, HEADS, KV, kc.clone(), vc.clone(), 10, cos, sin, mask)
    kc1, vc1 = kc.clone(), vc.clone()
    root = cpu_layer.decoder_layer(x[:1], norms, 1e-5, p, HEADS, KV, kc1, vc1, 10, cos[:1], sin[:1])
    one = cpu_layer.decoder_layer(x[1:2], norms, 1e-5, p, HEADS, KV, kc1, vc1, 11, cos[1:2], sin[1:2])
    assert torch.equal(tree[0], root[0]) and torch.equal(tree[1], one[0]) and torch.equal(tree[2], one[0])


def test_bad_arguments_are_one_line_errors():
    x, norms, kc, vc, cos, sin = inputs(2, 0, seed=6)
    p = panels("float32", seed=7, bias=False)
    with pytest.raises(RuntimeError, match="do not fit in the cache"):
        cpu_layer.decoder_layer(x, norms, 1e-5, p, HEADS, KV, kc, vc, 39, cos, sin)
    with pytest.raises(RuntimeError, match="wrong shape or type"):
        cpu_layer.decoder_layer(x, norms, 1e-5, [p[1], p[0], p[2], p[3]], HEADS, KV, kc, vc, 0, cos, sin)
    q = panels("fp8", seed=7, bias=False)
    with pytest.raises(RuntimeError, match="FP8 panels need their scales"):
        cpu_layer.decoder_layer(x, norms, 1e-5, [(q[0][0], None, None, None), *q[1:]], HEADS, KV, kc, vc, 0, cos, sin)


@pytest.mark.parametrize("kind", ["float32", "fp8"])
def test_a_stack_of_layers_equals_one_layer_after_another(kind):
    """Three layers in one call: each layer's keys and values in its own cache, and the output of
    the reference layers run in turn."""
    x, norms, kc, vc, cos, sin = inputs(4, 6, seed=8)
    layers = [([n * (1 + 0.05 * i) for n in norms], panels(kind, seed=10 + i, bias=i != 1)) for i in range(3)]
    k_all, v_all = kc[None].repeat(3, 1, 1, 1), vc[None].repeat(3, 1, 1, 1)
    got = cpu_layer.LayerStack(layers)(x, 1e-5, HEADS, KV, k_all, v_all, 6, cos, sin)
    want = x
    for i, (nm, p) in enumerate(layers):
        kc_i, vc_i = kc.clone(), vc.clone()
        want = cpu_layer.decoder_layer_reference(want, nm, 1e-5, p, HEADS, KV, kc_i, vc_i, 6, cos, sin)
        torch.testing.assert_close(k_all[i], kc_i, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v_all[i], vc_i, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
