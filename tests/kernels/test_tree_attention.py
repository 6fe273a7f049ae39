"""Tree attention (Medusa verification): the reference against a per-head softmax, the Triton
kernel against the reference (Triton's interpreter on machines without a GPU) at small and odd
shapes, and the kernel inside the model's tree forward pass."""

import math
from pathlib import Path

import pytest
import torch

from engine.formats.tensor_source import TensorSource
from engine.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.decoding.medusa.tree import CARD_CHOICES, build_tree
from engine.model.weights import from_source
from kernels.tree_attention import tree_attention, tree_attention_reference, tree_attention_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(BLOCK_M=16, BLOCK_N=16)  # several prefix blocks and a partial one at these shapes


def random_mask(t: int, seed: int = 0) -> torch.Tensor:
    mask = torch.rand(t, t, generator=torch.Generator().manual_seed(seed)) < 0.4
    return mask.fill_diagonal_(True)


def operands(b, h, hkv, t, start, d, dtype=torch.float32, extra=3, seed=0):
    """q [B, H, T, D] (a transposed view, as the model makes it) and a cache with `extra` slots
    after start + T holding NaN: a kernel that reads them would return NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
    length = start + t + extra
    k = torch.randn(b, hkv, length, d, generator=g)
    v = torch.randn(b, hkv, length, d, generator=g)
    k[:, :, start + t:] = float("nan")
    v[:, :, start + t:] = float("nan")
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def naive(q, k, v, start, tree_mask, scale=None):
    """One head at a time, in float64."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    end = start + t
    allowed = torch.cat([torch.ones(t, start, dtype=torch.bool), tree_mask.cpu()], dim=1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.empty(b, h, t, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hkv)
            s = q[bi, hi].double().cpu() @ k[bi, kv, :end].double().cpu().T * scale
            p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[bi, hi] = p @ v[bi, kv, :end].double().cpu()
    return out


@pytest.mark.parametrize("h,hkv,t,start,scale", [(4, 2, 5, 3, None), (4, 4, 17, 0, None), (6, 2, 1, 37, 0.3)])
def test_reference_is_attention_over_prefix_and_tree(h, hkv, t, start, scale):
    q, k, v = operands(2, h, hkv, t, start, 16)
    mask = random_mask(t).to(DEV)
    got = tree_attention_reference(q, k, v, start, mask, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double().cpu(), naive(q, k, v, start, mask, scale), atol=1e-5, rtol=1e-5)


def test_reference_does_not_reuse_the_last_mask_for_another_tree():
    """The reference keeps the last full mask it built (per tree mask object and start)."""
    q, k, v = operands(1, 4, 2, 5, 3, 16)
    mask = random_mask(5).to(DEV)
    tree_attention_reference(q, k, v, 3, mask)
    other = mask.clone()
    other[4, :4] = ~other[4, :4]
    torch.testing.assert_close(tree_attention_reference(q, k, v, 3, other).double().cpu(), naive(q, k, v, 3, other),
                               atol=1e-5, rtol=1e-5)
    q2, k2, v2 = operands(1, 4, 2, 5, 4, 16)
    torch.testing.assert_close(tree_attention_reference(q2, k2, v2, 4, other).double().cpu(),
                               naive(q2, k2, v2, 4, other), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start", [0, 3, 37])
@pytest.mark.parametrize("t", [1, 5, 17])
def test_kernel_matches_reference_fp32(t, start):
    q, k, v = operands(2, 4, 2, t, start, 16, seed=t + start)
    mask = random_mask(t, seed=start).to(DEV)
    got = tree_attention_triton(q, k, v, start, mask, config=SMALL)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, tree_attention_reference(q, k, v, start, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b,h,hkv,t,start,d", [
    (1, 4, 4, 5, 37, 64),  # H == Hkv
    (2, 4, 2, 17, 3, 64),
    (1, 2, 1, 5, 20, 40),  # D not a power of two: a masked D block
])
def test_kernel_shapes_and_default_config(b, h, hkv, t, start, d):
    q, k, v = operands(b, h, hkv, t, start, d)
    mask = random_mask(t).to(DEV)
    expected = tree_attention_reference(q, k, v, start, mask)
    torch.testing.assert_close(tree_attention_triton(q, k, v, start, mask), expected, atol=1e-5, rtol=1e-5)


def test_kernel_any_strides():
    """A cache laid out [B, L, Hkv, D] and read through a transposed view, a head dimension
    with stride 2, a non-contiguous mask, an explicit scale."""
    b, h, hkv, t, start, d = 2, 4, 2, 5, 21, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, t, 2 * d, generator=g)[..., ::2].to(DEV)
    k = torch.randn(b, start + t, hkv, d, generator=g).transpose(1, 2).to(DEV)
    v = torch.randn(b, start + t, hkv, d, generator=g).transpose(1, 2).to(DEV)
    mask = random_mask(t).T.to(DEV)
    got = tree_attention_triton(q, k, v, start, mask, scale=0.2, config=SMALL)
    torch.testing.assert_close(got, tree_attention_reference(q, k, v, start, mask, 0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,start", [(5, 37), (17, 3)])
def test_kernel_half_precision(dtype, t, start):
    q, k, v = operands(2, 4, 2, t, start, 64, dtype=dtype)
    mask = random_mask(t).to(DEV)
    got = tree_attention_triton(q, k, v, start, mask, config=SMALL)
    assert got.dtype == dtype
    expected = tree_attention_reference(q.float(), k.float(), v.float(), start, mask)  # same inputs, fp32
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_kernel_with_a_medusa_tree():
    mask = build_tree(CARD_CHOICES, num_heads=3).attn_mask.to(DEV)
    t = mask.shape[0]
    q, k, v = operands(1, 4, 2, t, 37, 16)
    got = tree_attention_triton(q, k, v, 37, mask, config=dict(BLOCK_M=32, BLOCK_N=32))
    torch.testing.assert_close(got, tree_attention_reference(q, k, v, 37, mask), atol=1e-5, rtol=1e-5)


def test_dispatch():
    q, k, v = operands(1, 4, 2, 5, 3, 16)
    mask = random_mask(5).to(DEV)
    got = tree_attention(q, k, v, 3, mask)
    if DEV == "cpu":
        assert torch.equal(got, tree_attention_reference(q, k, v, 3, mask))
    else:
        torch.testing.assert_close(got, tree_attention_reference(q, k, v, 3, mask), atol=1e-5, rtol=1e-5)


def tiny_model() -> LlamaModel:
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      vocab_size=101, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for li in range(cfg.num_layers):
        p = f"model.layers.{li}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (cfg.q_size, h), p + "self_attn.k_proj.weight": (cfg.kv_size, h),
                       p + "self_attn.v_proj.weight": (cfg.kv_size, h), p + "self_attn.o_proj.weight": (h, cfg.q_size),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    tensors = {name: torch.randn(shape, generator=g) * 0.2 + (1.0 if len(shape) == 1 else 0.0)
               for name, shape in shapes.items()}
    return from_source(cfg, TensorSource.from_tensors(tensors, Path("tiny.pt")), device=DEV)


def test_model_tree_forward_with_the_kernel(monkeypatch):
    """The model's tree branch gives the same logits and cache with the Triton kernel as with
    the reference (the kernel's output is a [B, T, H, D]-ordered view)."""
    model = tiny_model()
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]).to(DEV)
    prompt = torch.randint(0, 101, (1, 23), generator=torch.Generator().manual_seed(1)).to(DEV)
    nodes = torch.randint(0, 101, (1, tree.num_nodes), generator=torch.Generator().manual_seed(2)).to(DEV)
    results = []
    for attention in (tree_attention_reference, tree_attention_triton):
        monkeypatch.setattr("engine.model.llama.tree_attention", attention)
        cache = model.new_cache(64)
        model.forward(prompt, cache, 0)
        logits = model.logits(model.tree_hidden(nodes, cache, 23, tree.position_offsets, tree.attn_mask))
        results.append((logits, cache.k.clone(), cache.v.clone()))
    (ref, ref_k, ref_v), (got, got_k, got_v) = results
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the first layer's keys/values come before any tree attention; later layers' are close
    assert torch.equal(got_k[0], ref_k[0]) and torch.equal(got_v[0], ref_v[0])
    torch.testing.assert_close(got_k, ref_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, ref_v, atol=1e-5, rtol=1e-5)
