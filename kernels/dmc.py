"""Dynamic Memory Compression (DMC) kernels: the per-token cache update and decode attention
over ragged, paged per-head caches.

Update (one token, one layer). For each (batch row b, KV head h), with q [B, H, D] and k, v
[B, Hkv, D] the raw (pre-RoPE) projections and G = H // Hkv query heads per KV head:

    merge   = k[b, h, D-1] > init_val, and never for the first token (first=True)
    w       = sigmoid(mean_g q[b, h*G + g, D-1] + init_val) + 2**-7
    kw, vw  = w * k (dim D-1 set to 0), w * v                              (fp32)
    run     = run + 1 if merge else 1                  (tokens in the current slot)
    drop    = run > window                             (the entry of `window` tokens ago leaves)
    ksum    = ksum * merge - drop * win_k[ptr] + kw    (same for vsum, wsum with w)
    win_k[ptr], win_v[ptr], win_w[ptr] = kw, vw, w
    slot    = lens - 1 + (1 - merge)                   (a merge overwrites the last slot)
    lens    = slot + 1
    k_slot, v_slot = ksum / wsum, vsum / wsum          (in k's dtype; pre-RoPE)

State: ksum, vsum [B, Hkv, D], wsum [B, Hkv] fp32; win_k, win_v [W, B, Hkv, D], win_w [W, B, Hkv]
fp32; run, lens [B, Hkv] int32; all contiguous and updated in place. ``ptr`` is the circular
window index of this token (the caller advances it by one per token). Returns k_slot, v_slot
[B, Hkv, D] and slot [B, Hkv] int32.

Decode attention. One query token per head, q [B, H, D]; the keys and values of (b, h) are the
first lens[b, h] slots of its pages: slot s lives in page block_table[b, h, s // P] at row s % P
of k_pages / v_pages [num_pages, P, D]. Query head h reads KV head h // G. Returns [B, H, D].

The Triton kernels run one program per (b, KV head): the update loads one row of each state
tensor; the attention stacks the G query heads of a KV head as the rows of one tile and folds
the pages in with an online softmax in fp32 (as kernels/tree_attention.py does), reading each
page of K/V once per KV head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

WEIGHT_EPS = 2.0 ** -7  # added to the importance weight (bfloat16's eps in the reference code)


def _check_update(q, k, v, ksum, win_k):
    b, h, d = q.shape
    assert k.dim() == 3 and k.shape == v.shape, "k, v: [B, Hkv, D]"
    bk, hkv, dk = k.shape
    assert bk == b and dk == d and h % hkv == 0, f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}"
    assert ksum.shape == k.shape and win_k.shape[1:] == k.shape, "state shapes do not fit k"
    return b, h, hkv, d


# ---- references ----------------------------------------------------------------------------
def dmc_update_reference(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr: int, first: bool,
                         init_val: float = 5.0, window: int = 12):
    b, h, hkv, d = _check_update(q, k, v, ksum, win_k)
    merge = k[..., d - 1].float() > init_val
    if first:
        merge = torch.zeros_like(merge)
    w = torch.sigmoid(q[..., d - 1].float().view(b, hkv, h // hkv).mean(-1) + init_val) + WEIGHT_EPS
    kf = k.float().masked_fill(torch.arange(d, device=k.device) == d - 1, 0.0)  # k itself is left as it is
    kw = kf * w[..., None]
    vw = v.float() * w[..., None]
    run.copy_(torch.where(merge, run + 1, torch.ones_like(run)))
    drop = run > window
    keep = merge.float()
    dropf = drop.float()
    ksum.copy_(ksum * keep[..., None] - dropf[..., None] * win_k[ptr] + kw)
    vsum.copy_(vsum * keep[..., None] - dropf[..., None] * win_v[ptr] + vw)
    wsum.copy_(wsum * keep - dropf * win_w[ptr] + w)
    win_k[ptr], win_v[ptr], win_w[ptr] = kw, vw, w
    slot = lens - merge.to(lens.dtype)
    lens.copy_(slot + 1)
    k_slot = (ksum / wsum[..., None]).to(k.dtype)
    v_slot = (vsum / wsum[..., None]).to(v.dtype)
    return k_slot, v_slot, slot


def _check_attention(q, k_pages, v_pages, block_table, lens):
    b, h, d = q.shape
    assert k_pages.dim() == 3 and k_pages.shape == v_pages.shape and k_pages.shape[2] == d, \
        "k_pages, v_pages: [num_pages, P, D]"
    assert block_table.dim() == 3 and block_table.shape[0] == b and lens.shape == block_table.shape[:2], \
        "block_table: [B, Hkv, max_pages], lens: [B, Hkv]"
    hkv = block_table.shape[1]
    assert h % hkv == 0, f"{h} query heads do not group over {hkv} KV heads"
    return b, h, hkv, d, k_pages.shape[1]


def dmc_decode_attention_reference(q, k_pages, v_pages, block_table, lens, scale: float | None = None):
    """The pages gathered into padded [B, Hkv, max_pages * P, D] tensors, slots past each
    head's length masked out, and PyTorch's scaled_dot_product_attention."""
    b, h, hkv, d, page = _check_attention(q, k_pages, v_pages, block_table, lens)
    groups = h // hkv
    # only the table's columns that some head uses (a compressed cache uses a fraction of them)
    used = max(1, -(-int(lens.max()) // page)) if lens.numel() else 1
    pages = block_table[..., :used].long().clamp(min=0)  # unused entries (-1) point at page 0 and are masked
    length = pages.shape[2] * page
    mask = torch.arange(length, device=q.device)[None, None, :] < lens[..., None]  # [B, Hkv, L]
    # slots past a head's length may hold anything (another head's page, stale rows): zeroed,
    # so that nothing there reaches the output, not even a NaN times a zero weight
    keys = k_pages[pages].view(b, hkv, length, d).masked_fill(~mask[..., None], 0)
    values = v_pages[pages].view(b, hkv, length, d).masked_fill(~mask[..., None], 0)
    qg = q.reshape(b, hkv, groups, d)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask[:, :, None, :], scale=scale)
    return out.reshape(b, h, d)


# ---- Triton --------------------------------------------------------------------------------
if triton is not None:
    from .tree_attention import _dot, _online_softmax_step

    @triton.jit
    def _dmc_update_kernel(q_ptr, k_ptr, v_ptr, ksum_ptr, vsum_ptr, wsum_ptr, wk_ptr, wv_ptr, ww_ptr,
                           run_ptr, lens_ptr, ks_ptr, vs_ptr, slot_ptr,
                           sqb, sqh, sqd, skb, skh, skd, svb, svh, svd,
                           HKV, ptr_off_d, ptr_off_w, init_val, window, first, groups,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
        h = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        row = b * HKV + h  # index into the contiguous [B, Hkv] state
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        offs_g = tl.arange(0, BLOCK_G)
        qlast = tl.load(q_ptr + b * sqb + (h * groups + offs_g) * sqh + (HEAD_DIM - 1) * sqd,
                        mask=offs_g < groups, other=0.0).to(tl.float32)
        w = tl.sigmoid(tl.sum(qlast, axis=0) / groups + init_val) + 0.0078125

        k = tl.load(k_ptr + b * skb + h * skh + offs_d * skd, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * svb + h * svh + offs_d * svd, mask=d_ok, other=0.0).to(tl.float32)
        klast = tl.sum(tl.where(offs_d == HEAD_DIM - 1, k, 0.0), axis=0)
        merge = (klast > init_val) & (first == 0)
        keep = merge.to(tl.float32)
        k = tl.where(offs_d < HEAD_DIM - 1, k, 0.0)
        kw = k * w
        vw = v * w

        run = tl.load(run_ptr + row)
        run = tl.where(merge, run + 1, 1)
        tl.store(run_ptr + row, run)
        drop = (run > window).to(tl.float32)

        state = row * HEAD_DIM + offs_d
        old_k = tl.load(wk_ptr + ptr_off_d + state, mask=d_ok, other=0.0)
        old_v = tl.load(wv_ptr + ptr_off_d + state, mask=d_ok, other=0.0)
        old_w = tl.load(ww_ptr + ptr_off_w + row)
        ksum = tl.load(ksum_ptr + state, mask=d_ok, other=0.0) * keep - drop * old_k + kw
        vsum = tl.load(vsum_ptr + state, mask=d_ok, other=0.0) * keep - drop * old_v + vw
        wsum = tl.load(wsum_ptr + row) * keep - drop * old_w + w
        tl.store(ksum_ptr + state, ksum, mask=d_ok)
        tl.store(vsum_ptr + state, vsum, mask=d_ok)
        tl.store(wsum_ptr + row, wsum)
        tl.store(wk_ptr + ptr_off_d + state, kw, mask=d_ok)
        tl.store(wv_ptr + ptr_off_d + state, vw, mask=d_ok)
        tl.store(ww_ptr + ptr_off_w + row, w)

        slot = tl.load(lens_ptr + row) - merge.to(tl.int32)
        tl.store(lens_ptr + row, slot + 1)
        tl.store(slot_ptr + row, slot)
        tl.store(ks_ptr + state, (ksum / wsum).to(ks_ptr.dtype.element_ty), mask=d_ok)
        tl.store(vs_ptr + state, (vsum / wsum).to(vs_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _dmc_decode_attention_kernel(q_ptr, kp_ptr, vp_ptr, bt_ptr, lens_ptr, out_ptr, groups, qk_scale,
                                     sqb, sqh, sqd, skp, skl, skd, svp, svl, svd, sbb, sbh, sbp,
                                     slb, slh, sob, soh, sod,
                                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                     PAGE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        kvh = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < groups
        head = kvh * groups + rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        length = tl.load(lens_ptr + b * slb + kvh * slh)
        offs_n = tl.arange(0, PAGE)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, length, PAGE):
            page = tl.load(bt_ptr + b * sbb + kvh * sbh + (n0 // PAGE) * sbp).to(tl.int64)
            col_ok = (n0 + offs_n) < length
            k = tl.load(kp_ptr + page * skp + offs_n[None, :] * skl + offs_d[:, None] * skd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(vp_ptr + page * svp + offs_n[:, None] * svl + offs_d[None, :] * svd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k, PRECISION, UPCAST) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

        l_i = tl.where(l_i > 0, l_i, 1.0)
        out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * sob + head[:, None] * soh + offs_d[None, :] * sod, out,
                 mask=row_ok[:, None] & d_ok[None, :])


def dmc_update_triton(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr: int, first: bool,
                      init_val: float = 5.0, window: int = 12):
    b, h, hkv, d = _check_update(q, k, v, ksum, win_k)
    for t in (ksum, vsum, wsum, win_k, win_v, win_w):
        assert t.dtype == torch.float32 and t.is_contiguous(), "DMC sums and window: contiguous float32"
    for t in (run, lens):
        assert t.dtype == torch.int32 and t.is_contiguous() and t.shape == (b, hkv), "run, lens: [B, Hkv] int32"
    k_slot = torch.empty((b, hkv, d), dtype=k.dtype, device=k.device)
    v_slot = torch.empty((b, hkv, d), dtype=v.dtype, device=v.device)
    slot = torch.empty((b, hkv), dtype=torch.int32, device=k.device)
    groups = h // hkv
    _dmc_update_kernel[(hkv, b)](
        q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, k_slot, v_slot, slot,
        *q.stride(), *k.stride(), *v.stride(),
        hkv, ptr * b * hkv * d, ptr * b * hkv, float(init_val), int(window), int(bool(first)), groups,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_G=triton.next_power_of_2(groups), num_warps=1)
    return k_slot, v_slot, slot


def dmc_decode_attention_triton(q, k_pages, v_pages, block_table, lens, scale: float | None = None):
    b, h, hkv, d, page = _check_attention(q, k_pages, v_pages, block_table, lens)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {q.dtype}"
    assert k_pages.dtype == q.dtype and v_pages.dtype == q.dtype, "q and the pages must share a dtype"
    assert page >= 16 and page & (page - 1) == 0, "page size: a power of two, at least 16"
    groups = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    _dmc_decode_attention_kernel[(hkv, b)](
        q, k_pages, v_pages, block_table, lens, out, groups, scale * math.log2(math.e),
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *lens.stride(), *out.stride(),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=max(16, triton.next_power_of_2(groups)),
        PAGE=page, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=4)
    return out


# ---- dispatch ------------------------------------------------------------------------------
def dmc_update(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr: int, first: bool,
               init_val: float = 5.0, window: int = 12):
    """One token's DMC cache update for one layer (see the module docstring); returns k_slot,
    v_slot [B, Hkv, D] (pre-RoPE) and the slot index each (b, KV head) writes, [B, Hkv] int32."""
    fn = dmc_update_triton if use_triton(k) else dmc_update_reference
    return fn(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr, first, init_val, window)


def dmc_decode_attention(q, k_pages, v_pages, block_table, lens, scale: float | None = None):
    """Attention of one query token per head, q [B, H, D], over each KV head's first lens[b, h]
    slots of its pages; [B, H, D] in q's dtype."""
    if use_triton(q):
        return dmc_decode_attention_triton(q, k_pages, v_pages, block_table, lens, scale)
    return dmc_decode_attention_reference(q, k_pages, v_pages, block_table, lens, scale)
