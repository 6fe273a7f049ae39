"""DMC kernels: the update reference against a plain per-head loop over many tokens (merges,
appends, window overflow), the Triton kernels against the references in Triton's interpreter
(on machines without a GPU) at small shapes, and decode and tree attention against a per-head
softmax."""

import math

import pytest
import torch

from kernels import cpu_ops
from kernels.dmc import (dmc_decode_attention, dmc_decode_attention_reference, dmc_decode_attention_triton,
                         dmc_tree_attention, dmc_tree_attention_cpu, dmc_tree_attention_reference,
                         dmc_tree_attention_triton, dmc_update_cpu, dmc_update_reference, dmc_update_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
WINDOW = 4  # small, so that runs overflow it within a short test


def new_state(b, hkv, d, window=WINDOW):
    z = dict(device=DEV, dtype=torch.float32)
    return dict(ksum=torch.zeros(b, hkv, d, **z), vsum=torch.zeros(b, hkv, d, **z), wsum=torch.zeros(b, hkv, **z),
                win_k=torch.zeros(window, b, hkv, d, **z), win_v=torch.zeros(window, b, hkv, d, **z),
                win_w=torch.ones(window, b, hkv, **z),
                run=torch.zeros(b, hkv, dtype=torch.int32, device=DEV),
                lens=torch.zeros(b, hkv, dtype=torch.int32, device=DEV))


def token_stream(n, b, h, hkv, d, seed=0):
    """Raw q, k, v per token; k's last dim is above 5 (merge) about 70 % of the time, so runs
    longer than the window occur."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        q = torch.randn(b, h, d, generator=g)
        q[..., -1] = torch.randn(b, h, generator=g) * 4 - 5  # weights over most of (0, 1)
        k = torch.randn(b, hkv, d, generator=g)
        k[..., -1] = torch.where(torch.rand(b, hkv, generator=g) < 0.7, 6.0, 4.0)
        v = torch.randn(b, hkv, d, generator=g)
        yield q.to(DEV), k.to(DEV), v.to(DEV)


def naive_slots(stream, window):
    """Per head: the list of slots, each the weighted mean of the last <= window tokens of its
    merge run, recomputed from the token list (float64)."""
    slots, runs = {}, {}
    for t, (q, k, v) in enumerate(stream):
        b, h, d = q.shape
        hkv = k.shape[1]
        for bi in range(b):
            for hi in range(hkv):
                merge = t > 0 and k[bi, hi, -1].item() > 5.0
                w = torch.sigmoid(q[bi, hi * (h // hkv):(hi + 1) * (h // hkv), -1].double().mean() + 5) + 2 ** -7
                kk = k[bi, hi].double().clone()
                kk[-1] = 0
                run = runs.setdefault((bi, hi), [])
                sl = slots.setdefault((bi, hi), [])
                if not merge:
                    run.clear()
                run.append((w, kk, v[bi, hi].double()))
                part = run[-window:]
                ws = sum(x[0] for x in part)
                entry = (sum(x[0] * x[1] for x in part) / ws, sum(x[0] * x[2] for x in part) / ws)
                if merge:
                    sl[-1] = entry
                else:
                    sl.append(entry)
    return slots


@pytest.mark.parametrize("h,hkv", [(2, 2), (4, 2)])
def test_update_reference_is_windowed_weighted_mean_of_the_run(h, hkv):
    b, d, n = 2, 8, 30
    stream = list(token_stream(n, b, h, hkv, d))
    st = new_state(b, hkv, d)
    got = {}
    overflowed = False
    for t, (q, k, v) in enumerate(stream):
        ks, vs, slot = dmc_update_reference(q, k, v, **st, ptr=t % WINDOW, first=t == 0, window=WINDOW)
        overflowed |= bool((st["run"] > WINDOW).any())
        for bi in range(b):
            for hi in range(hkv):
                sl = got.setdefault((bi, hi), [])
                s = slot[bi, hi].item()
                assert s in (len(sl) - 1, len(sl))  # overwrite the last slot or append one
                if s == len(sl):
                    sl.append(None)
                sl[s] = (ks[bi, hi].double(), vs[bi, hi].double())
                assert st["lens"][bi, hi].item() == len(sl)
    assert overflowed
    want = naive_slots(stream, WINDOW)
    for key, slots in want.items():
        assert len(got[key]) == len(slots)
        for (gk, gv), (wk, wv) in zip(got[key], slots):
            torch.testing.assert_close(gk.cpu(), wk.cpu(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gv.cpu(), wv.cpu(), atol=1e-5, rtol=1e-5)
    lens = st["lens"].cpu()
    assert (lens < n).all() and (lens > 1).all()  # some merges and some appends in every head


@pytest.mark.parametrize("h,hkv,d,dtype", [(2, 2, 16, torch.float32), (6, 2, 8, torch.float32),
                                           (4, 1, 12, torch.float32), (4, 2, 16, torch.bfloat16),
                                           (4, 2, 16, torch.float16)])
def test_update_kernel_matches_reference(h, hkv, d, dtype):
    b, n = 2, 14
    ref_state, tri_state = new_state(b, hkv, d), new_state(b, hkv, d)
    for t, (q, k, v) in enumerate(token_stream(n, b, h, hkv, d, seed=d)):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k = k.transpose(0, 1).contiguous().transpose(0, 1)  # any strides
        want = dmc_update_reference(q, k, v, **ref_state, ptr=t % WINDOW, first=t == 0, window=WINDOW)
        got = dmc_update_triton(q, k, v, **tri_state, ptr=t % WINDOW, first=t == 0, window=WINDOW)
        torch.testing.assert_close(got[2], want[2])
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # slots round to dtype: one ulp apart at most
        torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
        torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol)
        for name in ref_state:
            torch.testing.assert_close(tri_state[name], ref_state[name], atol=1e-5, rtol=1e-5)


def paged_operands(b, h, hkv, d, lens, page=16, dtype=torch.float32, seed=0):
    """Pages for ragged lengths, handed out in a shuffled order; unused rows of the pages and
    an unused page hold NaN (a kernel that read them would return NaN)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32).view(b, hkv)
    need = [(-(-int(n) // page)) for n in lens.flatten()]
    total = sum(need) + 1
    order = torch.randperm(total, generator=g)
    k_pages = torch.full((total, page, d), float("nan"))
    v_pages = torch.full((total, page, d), float("nan"))
    max_pages = max(need) + 1
    table = torch.full((b, hkv, max_pages), -1, dtype=torch.int32)
    dense_k, dense_v = {}, {}
    nxt = 0
    for r, n in enumerate(lens.flatten().tolist()):
        bi, hi = divmod(r, hkv)
        kk, vv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        dense_k[bi, hi], dense_v[bi, hi] = kk, vv
        for p in range(need[r]):
            pid = order[nxt].item()
            nxt += 1
            table[bi, hi, p] = pid
            rows = slice(p * page, min(n, (p + 1) * page))
            k_pages[pid, : rows.stop - rows.start] = kk[rows]
            v_pages[pid, : rows.stop - rows.start] = vv[rows]
    q = torch.randn(b, h, d, generator=g)
    to = dict(device=DEV, dtype=dtype)
    return (q.to(**to), k_pages.to(**to), v_pages.to(**to), table.to(DEV), lens.to(DEV)), (dense_k, dense_v)


def naive_attention(q, dense, h, hkv, scale=None):
    dense_k, dense_v = dense
    b, _, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.empty(b, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kk, vv = dense_k[bi, hi // (h // hkv)].double(), dense_v[bi, hi // (h // hkv)].double()
            out[bi, hi] = (q[bi, hi].double().cpu() @ kk.T * scale).softmax(-1) @ vv
    return out


CASES = [(1, 2, 2, 16, [1, 16]), (2, 4, 2, 16, [17, 3, 40, 33]), (1, 6, 2, 8, [5, 70]), (1, 4, 4, 12, [2, 9, 31, 16])]


@pytest.mark.parametrize("b,h,hkv,d,lens", CASES)
def test_decode_attention_reference_is_per_head_softmax(b, h, hkv, d, lens):
    args, dense = paged_operands(b, h, hkv, d, lens)
    got = dmc_decode_attention_reference(*args)
    assert got.shape == (b, h, d)
    torch.testing.assert_close(got.double().cpu(), naive_attention(args[0], dense, h, hkv), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b,h,hkv,d,lens", CASES)
def test_decode_attention_kernel_matches_reference(b, h, hkv, d, lens):
    args, dense = paged_operands(b, h, hkv, d, lens, seed=1)
    want = dmc_decode_attention_reference(*args)
    got = dmc_decode_attention_triton(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_kernel_half_precision(dtype):
    args, dense = paged_operands(2, 4, 2, 16, [20, 1, 7, 35], dtype=dtype, seed=2)
    got = dmc_decode_attention_triton(*args, scale=0.2)
    want = naive_attention(args[0], dense, 4, 2, scale=0.2)
    torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)


# ---- tree attention: M queries over a ragged paged cache plus N new slots under a mask ---------
def tree_operands(b, h, hkv, d, lens, m, n, dtype=torch.float32, seed=0):
    """paged_operands' cache (NaN in every row no head holds), M queries, N new slots, and a
    random visibility mask in which query i always sees new slot i + (n - m) (its own)."""
    (q1, k_pages, v_pages, table, n_cached), dense = paged_operands(b, h, hkv, d, lens, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    to = dict(device=DEV, dtype=dtype)
    q = torch.randn(b, h, m, d, generator=g).to(**to)
    k_new = torch.randn(b, hkv, n, d, generator=g).to(**to)
    v_new = torch.randn(b, hkv, n, d, generator=g).to(**to)
    visible = torch.rand(b, hkv, m, n, generator=g) < 0.4
    visible[:, :, torch.arange(m), torch.arange(m) + (n - m)] = True
    return (q, k_new, v_new, visible.to(DEV), k_pages, v_pages, table, n_cached), dense


def naive_tree_attention(args, dense, scale=None):
    q, k_new, v_new, visible = args[:4]
    dense_k, dense_v = dense
    b, h, m, d = q.shape
    hkv = k_new.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.empty(b, h, m, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hkv)
            for i in range(m):
                seen = visible[bi, kv, i].cpu()
                kk = torch.cat([dense_k[bi, kv].double(), k_new[bi, kv].double().cpu()[seen]])
                vv = torch.cat([dense_v[bi, kv].double(), v_new[bi, kv].double().cpu()[seen]])
                out[bi, hi, i] = (q[bi, hi, i].double().cpu() @ kk.T * scale).softmax(-1) @ vv
    return out


TREE_CASES = [(1, 2, 2, 16, [1, 16], 5, 5), (2, 4, 2, 16, [17, 0, 40, 33], 7, 7), (1, 6, 2, 8, [5, 70], 3, 9),
              (1, 9, 3, 16, [0, 0, 0], 11, 11), (1, 4, 4, 12, [2, 9, 31, 16], 40, 40)]


@pytest.mark.parametrize("b,h,hkv,d,lens,m,n", TREE_CASES)
def test_tree_attention_reference_is_per_head_softmax(b, h, hkv, d, lens, m, n):
    args, dense = tree_operands(b, h, hkv, d, lens, m, n)
    got = dmc_tree_attention_reference(*args)
    assert got.shape == (b, h, m, d)
    torch.testing.assert_close(got.double().cpu(), naive_tree_attention(args, dense), atol=1e-5, rtol=1e-5)
    # told how many table columns the cache uses, it reads no count back and gives the same
    pages = -(-max(lens) // 16)
    torch.testing.assert_close(dmc_tree_attention(*args, cached_pages=pages), got)


@pytest.mark.parametrize("b,h,hkv,d,lens,m,n", TREE_CASES)
def test_tree_attention_kernel_matches_reference(b, h, hkv, d, lens, m, n):
    args, _ = tree_operands(b, h, hkv, d, lens, m, n, seed=3)
    want = dmc_tree_attention_reference(*args)
    got = dmc_tree_attention_triton(*args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_attention_kernel_half_precision(dtype):
    args, dense = tree_operands(1, 6, 2, 16, [20, 37], 9, 9, dtype=dtype, seed=4)
    got = dmc_tree_attention_triton(*args, scale=0.2)
    want = naive_tree_attention(args, dense, scale=0.2)
    torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)


cpu_kernels = pytest.mark.skipif(not cpu_ops.available(), reason=f"CPU kernels: {cpu_ops.why_not()}")


@cpu_kernels
@pytest.mark.parametrize("b,h,hkv,d,lens,m,n", TREE_CASES + [(1, 9, 3, 64, [100, 3, 57], 6, 6)])
def test_tree_attention_cpu_kernel_matches_reference(b, h, hkv, d, lens, m, n):
    args, dense = tree_operands(b, h, hkv, d, lens, m, n, seed=5)
    args = tuple(a.cpu() for a in args)
    got = dmc_tree_attention_cpu(*args)
    assert got.shape == (b, h, m, d) and got.transpose(1, 2).is_contiguous()  # laid out [B, M, H, D]
    torch.testing.assert_close(got, dmc_tree_attention_reference(*args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), naive_tree_attention(args, dense), atol=1e-5, rtol=1e-5)
    # strided operands (the engine passes permuted views) read as their values
    q, k_new, v_new, visible = args[:4]
    views = (q.transpose(1, 2).contiguous().transpose(1, 2), k_new.transpose(2, 3).contiguous().transpose(2, 3),
             v_new, visible.transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(dmc_tree_attention_cpu(*views, *args[4:], scale=0.3),
                               dmc_tree_attention_reference(*args, scale=0.3), atol=1e-5, rtol=1e-5)


@cpu_kernels
@pytest.mark.parametrize("b,h,hkv,d,lens", CASES)
def test_decode_attention_on_cpu_matches_reference(b, h, hkv, d, lens):
    args, _ = paged_operands(b, h, hkv, d, lens, seed=6)
    args = tuple(a.cpu() for a in args)
    torch.testing.assert_close(dmc_decode_attention(*args), dmc_decode_attention_reference(*args),
                               atol=1e-5, rtol=1e-5)


@cpu_kernels
def test_tree_attention_cpu_kernel_refuses_a_count_beyond_its_table():
    args, _ = tree_operands(1, 2, 2, 16, [3, 20], 2, 2)
    args = [a.cpu() for a in args]
    args[7] = torch.tensor([[3, 200]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="n_cached beyond the block table"):
        dmc_tree_attention_cpu(*args)


@cpu_kernels
@pytest.mark.parametrize("h,hkv,d", [(2, 2, 16), (6, 2, 8), (4, 1, 12), (9, 3, 64)])
def test_update_cpu_kernel_matches_reference(h, hkv, d):
    b, n = 2, 14
    ref_state, cpu_state = new_state(b, hkv, d), new_state(b, hkv, d)
    ref_state, cpu_state = ({k: v.cpu() for k, v in st.items()} for st in (ref_state, cpu_state))
    for t, (q, k, v) in enumerate(token_stream(n, b, h, hkv, d, seed=d + 1)):
        q, k, v = q.cpu(), k.cpu().transpose(0, 1).contiguous().transpose(0, 1), v.cpu()  # any strides
        want = dmc_update_reference(q, k, v, **ref_state, ptr=t % WINDOW, first=t == 0, window=WINDOW)
        got = dmc_update_cpu(q, k, v, **cpu_state, ptr=t % WINDOW, first=t == 0, window=WINDOW)
        assert torch.equal(got[2], want[2])
        for a, b_ in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-6)
        for name in ref_state:
            torch.testing.assert_close(cpu_state[name], ref_state[name], atol=1e-6, rtol=1e-6)
