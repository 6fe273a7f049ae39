"""The Triton kernels against their PyTorch references at the shapes of the models the engine is
built around (Llama-3.1-8B's linears and attention, Llama-2-7B's DMC cache), in bf16 and FP8,
through the dispatchers the engine calls (autotuning included). Too big for Triton's
interpreter: these run where there is a CUDA GPU (bench/gpu_run.sh) and are skipped elsewhere."""

import pytest
import torch

from kernels import dmc, fp8_gemm, fp8_quant, tree_attention

pytestmark = pytest.mark.cuda
DEV = "cuda"

LLAMA31_8B_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def randn(*shape, seed=0, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("name", list(LLAMA31_8B_LINEARS))
@pytest.mark.parametrize("m", [1, 7, 16, 64, 512])
@pytest.mark.parametrize("scales", ["tensor", "token_channel"])
def test_fp8_gemm_at_the_8b_linears(name, m, scales):
    n, k = LLAMA31_8B_LINEARS[name]
    a, sa = fp8_quant.quantize_rows(randn(m, k, seed=1))
    w, sw = fp8_quant.quantize_rows(randn(n, k, seed=2, scale=0.02))
    if scales == "tensor":
        sa, sw = sa.max(), sw.max()
    got = fp8_gemm.fp8_gemm(a, w, sa, sw)  # the dispatcher: tuned on this GPU
    want = fp8_gemm.fp8_gemm_reference(a, w, sa, sw, out_dtype=torch.float32)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1.6e-2)
    for cfg in fp8_gemm.candidate_configs(m, n, k, fp8_gemm._num_sms(a.device), fp8_gemm._capability(a.device)):
        got = fp8_gemm.fp8_gemm_triton(a, w, sa, sw, config=cfg)  # every configuration the tuner may pick
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1.6e-2, msg=lambda s: f"{cfg}: {s}")


@pytest.mark.parametrize("m", [1, 16, 512])
def test_fp8_quantize_at_the_8b_hidden_size(m):
    x = randn(m, 4096, seed=3, scale=4.0)
    q, s = fp8_quant.quantize_rows_triton(x)
    q_ref, s_ref = fp8_quant.quantize_rows_reference(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("t", [1, 6, 16, 64])
def test_tree_attention_at_the_8b_heads(t):
    h, hkv, d, start = 32, 8, 128, 1500
    q = randn(1, h, t, d, seed=4)
    k, v = randn(1, hkv, 2048, d, seed=5), randn(1, hkv, 2048, d, seed=6)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=DEV))
    mask[t // 2:, : t // 3] = False  # branches that do not see each other
    mask |= torch.eye(t, dtype=torch.bool, device=DEV)
    got = tree_attention.tree_attention(q, k, v, start, mask)
    want = tree_attention.tree_attention_reference(q.float(), k.float(), v.float(), start, mask)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def paged_cache(b, hkv, d, lens, page=16, seed=7):
    """A paged DMC cache whose heads hold ``lens`` slots, pages in a shuffled order."""
    need = [-(-n // page) for n in lens]
    order = torch.randperm(sum(need), generator=torch.Generator().manual_seed(seed)).to(DEV)
    k_pages, v_pages = randn(sum(need), page, d, seed=seed), randn(sum(need), page, d, seed=seed + 1)
    table = torch.full((b, hkv, max(need)), -1, dtype=torch.int32, device=DEV)
    at = 0
    for r, count in enumerate(need):
        table.view(b * hkv, -1)[r, :count] = order[at:at + count].int()
        at += count
    return k_pages, v_pages, table, torch.tensor(lens, dtype=torch.int32, device=DEV).view(b, hkv)


def ragged(b, hkv, most, seed=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, most, (b * hkv,), generator=g).tolist()


@pytest.mark.parametrize("b", [1, 4])
def test_dmc_decode_attention_at_the_7b_heads(b):
    h = hkv = 32
    d = 128
    k_pages, v_pages, table, lens = paged_cache(b, hkv, d, ragged(b, hkv, 600))
    q = randn(b, h, d, seed=9)
    got = dmc.dmc_decode_attention(q, k_pages, v_pages, table, lens)
    want = dmc.dmc_decode_attention_reference(q.float(), k_pages.float(), v_pages.float(), table, lens)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("m", [6, 64, 256])
def test_dmc_tree_and_prefill_attention_at_the_7b_heads(m):
    b, h, hkv, d = 1, 32, 32, 128
    k_pages, v_pages, table, lens = paged_cache(b, hkv, d, ragged(b, hkv, 600, seed=10))
    q, k_new, v_new = randn(b, h, m, d, seed=11), randn(b, hkv, m, d, seed=12), randn(b, hkv, m, d, seed=13)
    visible = torch.tril(torch.ones(m, m, dtype=torch.bool, device=DEV)).expand(b, hkv, m, m).contiguous()
    got = dmc.dmc_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, table, lens)
    want = dmc.dmc_tree_attention_reference(q.float(), k_new.float(), v_new.float(), visible, k_pages.float(),
                                            v_pages.float(), table, lens)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_dmc_update_at_the_7b_heads():
    b, h, hkv, d, window = 2, 32, 32, 128, 12

    def state():
        z = dict(device=DEV, dtype=torch.float32)
        return dict(ksum=torch.zeros(b, hkv, d, **z), vsum=torch.zeros(b, hkv, d, **z), wsum=torch.zeros(b, hkv, **z),
                    win_k=torch.zeros(window, b, hkv, d, **z), win_v=torch.zeros(window, b, hkv, d, **z),
                    win_w=torch.ones(window, b, hkv, **z), run=torch.zeros(b, hkv, dtype=torch.int32, device=DEV),
                    lens=torch.zeros(b, hkv, dtype=torch.int32, device=DEV))

    ref, tri = state(), state()
    for t in range(20):
        q, k, v = randn(b, h, d, seed=20 + t), randn(b, hkv, d, seed=40 + t), randn(b, hkv, d, seed=60 + t)
        k[..., -1] = torch.where(randn(b, hkv, seed=80 + t) > -0.5, 6.0, 4.0).to(k.dtype)  # mostly merges
        want = dmc.dmc_update_reference(q, k, v, **ref, ptr=t % window, first=t == 0, window=window)
        got = dmc.dmc_update_triton(q, k, v, **tri, ptr=t % window, first=t == 0, window=window)
        torch.testing.assert_close(got[2], want[2])
        for g_, w_ in zip(got[:2], want[:2]):
            torch.testing.assert_close(g_.float(), w_.float(), atol=1e-2, rtol=1e-2)
        for name in ref:
            torch.testing.assert_close(tri[name], ref[name], atol=1e-4, rtol=1e-4)
