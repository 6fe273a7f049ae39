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

Tree attention (verification of a Medusa tree, or a chunk of a prompt, over a DMC cache). M
query tokens q [B, H, M, D] attend to the first n_cached[b, h] slots of (b, h)'s pages (all of
them visible to every query) and to N new slots k_new, v_new [B, Hkv, N, D] where visible [B,
Hkv, M, N] (bool) allows: for a tree, a node sees its own slot and those of its ancestors that
stay slots on its path; for a chain, token i sees the earlier tokens' final slots. Each query must
see at least one slot. Returns [B, H, M, D].

The Triton kernels: the update runs one program per (b, KV head) and loads one row of each state
tensor; tree attention (decode attention is its case of one query and no new slots) runs one
program per (block of query rows, KV head, b), stacks the G query heads of a KV head as the rows
of one tile and folds the pages, then the new slots, in with an online softmax in fp32 (as
kernels/tree_attention.py does), reading each page of K/V once per row block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import cpu_ops
from ._triton import interpreting, tl, triton, use_triton

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


def _check_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached):
    b, h, m, d = q.shape
    assert k_new.dim() == 4 and k_new.shape == v_new.shape, "k_new, v_new: [B, Hkv, N, D]"
    bk, hkv, n, dk = k_new.shape
    assert bk == b and dk == d and h % hkv == 0, f"q {tuple(q.shape)} does not fit k_new {tuple(k_new.shape)}"
    assert visible.shape == (b, hkv, m, n) and visible.dtype == torch.bool, "visible: [B, Hkv, M, N] bool"
    assert k_pages.dim() == 3 and k_pages.shape == v_pages.shape and k_pages.shape[2] == d, \
        "k_pages, v_pages: [num_pages, P, D]"
    assert block_table.shape[:2] == (b, hkv) and n_cached.shape == (b, hkv), \
        "block_table: [B, Hkv, max_pages], n_cached: [B, Hkv]"
    return b, h, hkv, m, n, d, k_pages.shape[1]


def dmc_tree_attention_reference(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached,
                                 scale: float | None = None, cached_pages: int | None = None):
    """The cached slots gathered into padded [B, Hkv, pages * P, D] tensors (slots past n_cached
    zeroed and masked), the new slots after them, and PyTorch's scaled_dot_product_attention with
    the query heads of a KV head as its query rows (group-major). ``cached_pages``: the table's
    columns to read, when the caller knows it (saves reading n_cached back)."""
    b, h, hkv, m, n, d, page = _check_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, block_table,
                                                     n_cached)
    groups = h // hkv
    mask = visible
    keys, values = k_new, v_new
    if cached_pages is None:
        cached_pages = -(-int(n_cached.max()) // page) if n_cached.numel() else 0
    if cached_pages:
        pages = block_table[..., :cached_pages].long().clamp(min=0)  # -1 entries: page 0, masked
        length = cached_pages * page
        old = torch.arange(length, device=q.device) < n_cached[..., None].to(q.device)  # [B, Hkv, L]
        hide = ~old[..., None]
        old_k = k_pages[pages].view(b, hkv, length, d).masked_fill(hide, 0)  # nothing stale reaches the output
        old_v = v_pages[pages].view(b, hkv, length, d).masked_fill(hide, 0)
        keys = torch.cat([old_k.to(k_new.dtype), k_new], dim=2)
        values = torch.cat([old_v.to(v_new.dtype), v_new], dim=2)
        mask = torch.cat([old[:, :, None, :].expand(-1, -1, m, -1), visible], dim=3)
    qg = q.reshape(b, hkv, groups * m, d)
    mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, hkv, groups * m, -1)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
    return out.view(b, h, m, d)


# ---- Triton --------------------------------------------------------------------------------
if triton is not None:
    from .tree_attention import _dot, _online_softmax_step

    @triton.jit(do_not_specialize=["ptr_off_d", "ptr_off_w", "first"])  # new values every token
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

    @triton.jit(do_not_specialize=["M", "N"])
    def _dmc_tree_attention_kernel(q_ptr, kn_ptr, vn_ptr, vis_ptr, kp_ptr, vp_ptr, bt_ptr, nc_ptr, out_ptr,
                                   M, N, groups, qk_scale,
                                   sqb, sqh, sqm, sqd, sknb, sknh, sknn, sknd, svnb, svnh, svnn, svnd,
                                   smb, smh, smi, smj, skp, skl, skd, svp, svl, svd, sbb, sbh, sbp,
                                   scb, sch, sob, soh, som, sod,
                                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                                   UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        # query rows of this KV head: row r is query r % M of query head kvh * groups + r // M
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < groups * M
        g = rows // M
        qi = (rows - g * M).to(tl.int64)
        head = kvh * groups + g.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # the cached slots, page by page: all visible to every query
        length = tl.load(nc_ptr + b * scb + kvh * sch)
        offs_p = tl.arange(0, PAGE)
        for n0 in range(0, length, PAGE):
            page = tl.load(bt_ptr + b * sbb + kvh * sbh + (n0 // PAGE) * sbp).to(tl.int64)
            col_ok = (n0 + offs_p) < length
            k = tl.load(kp_ptr + page * skp + offs_p[None, :] * skl + offs_d[:, None] * skd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(vp_ptr + page * svp + offs_p[:, None] * svl + offs_d[None, :] * svd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k.to(q.dtype), PRECISION, UPCAST) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, PRECISION, UPCAST)

        # the new slots, under the visibility mask
        offs_n = tl.arange(0, BLOCK_N)
        kn_base = kn_ptr + b * sknb + kvh * sknh
        vn_base = vn_ptr + b * svnb + kvh * svnh
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < N
            k = tl.load(kn_base + cols[None, :].to(tl.int64) * sknn + offs_d[:, None] * sknd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(vn_base + cols[:, None].to(tl.int64) * svnn + offs_d[None, :] * svnd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k, PRECISION, UPCAST) * qk_scale
            seen = tl.load(vis_ptr + b * smb + kvh * smh + qi[:, None] * smi + cols[None, :].to(tl.int64) * smj,
                           mask=row_ok[:, None] & col_ok[None, :], other=0)
            s = tl.where(seen != 0, s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

        l_i = tl.where(l_i > 0, l_i, 1.0)  # padding rows only: every real query sees a slot
        out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * sob + head[:, None] * soh + qi[:, None] * som + offs_d[None, :] * sod, out,
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
    """The tree attention Triton kernel with one query and no new slots."""
    _check_attention(q, k_pages, v_pages, block_table, lens)
    assert k_pages.dtype == q.dtype and v_pages.dtype == q.dtype, "q and the pages must share a dtype"
    return _one_query(dmc_tree_attention_triton, q, k_pages, v_pages, block_table, lens, scale)


def _one_query(tree_attention, q, k_pages, v_pages, block_table, lens, scale):
    """Decode attention (q [B, H, D]) as a tree attention of one query per head over the cached
    slots and no new ones."""
    b, h, d = q.shape
    hkv = block_table.shape[1]
    none = q.new_empty(b, hkv, 0, d)
    nothing = torch.empty(b, hkv, 1, 0, dtype=torch.bool, device=q.device)
    return tree_attention(q[:, :, None], none, none, nothing, k_pages, v_pages, block_table, lens, scale)[:, :, 0]


def dmc_tree_attention_triton(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached,
                              scale: float | None = None, cached_pages: int | None = None):
    """The Triton kernel. The output is [B, H, M, D], laid out as [B, M, H, D] in memory (the
    order the output projection reads it in). ``cached_pages`` is not needed (each program
    reads its own head's count)."""
    b, h, hkv, m, n, d, page = _check_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, block_table,
                                                     n_cached)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {q.dtype}"
    assert k_new.dtype == q.dtype and v_new.dtype == q.dtype, "q, k_new and v_new must share a dtype"
    assert page >= 16 and page & (page - 1) == 0, "page size: a power of two, at least 16"
    groups = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((b, m, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    vis = visible.view(torch.uint8)
    block_m = min(64, max(16, triton.next_power_of_2(groups * m)))
    grid = (triton.cdiv(groups * m, block_m), hkv, b)
    _dmc_tree_attention_kernel[grid](
        q, k_new, v_new, vis, k_pages, v_pages, block_table, n_cached, out, m, n, groups, scale * math.log2(math.e),
        *q.stride(), *k_new.stride(), *v_new.stride(), *vis.stride(), *k_pages.stride(), *v_pages.stride(),
        *block_table.stride(), *n_cached.stride(), *out.stride(),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=32, PAGE=page,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and interpreting(), num_warps=4 if block_m * d <= 64 * 64 else 8)
    return out


# ---- dispatch ------------------------------------------------------------------------------
def dmc_update_cpu(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr: int, first: bool,
                   init_val: float = 5.0, window: int = 12):
    """The C++ kernel (kernels/cpu_dmc.cpp; float32 CPU tensors, ``cpu_ops.available()``)."""
    _check_update(q, k, v, ksum, win_k)
    assert cpu_ops.available(), f"the CPU kernels: {cpu_ops.why_not()}"
    return tuple(torch.ops.chatapp_cpu.dmc_update(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, int(ptr),
                                                  bool(first), float(init_val), int(window)))


def dmc_update(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr: int, first: bool,
               init_val: float = 5.0, window: int = 12):
    """One token's DMC cache update for one layer (see the module docstring); returns k_slot,
    v_slot [B, Hkv, D] (pre-RoPE) and the slot index each (b, KV head) writes, [B, Hkv] int32.
    Triton on CUDA, the C++ kernel on a CPU (float32), the PyTorch reference otherwise."""
    if use_triton(k):
        fn = dmc_update_triton
    elif cpu_ops.serves(k.device, k.dtype):
        fn = dmc_update_cpu
    else:
        fn = dmc_update_reference
    return fn(q, k, v, ksum, vsum, wsum, win_k, win_v, win_w, run, lens, ptr, first, init_val, window)


def dmc_decode_attention(q, k_pages, v_pages, block_table, lens, scale: float | None = None):
    """Attention of one query token per head, q [B, H, D], over each KV head's first lens[b, h]
    slots of its pages; [B, H, D] in q's dtype. On a CPU with the C++ library: its tree
    attention kernel, with one query and no new slots."""
    if use_triton(q):
        return dmc_decode_attention_triton(q, k_pages, v_pages, block_table, lens, scale)
    if cpu_ops.serves(q.device, q.dtype):
        _check_attention(q, k_pages, v_pages, block_table, lens)
        return _one_query(dmc_tree_attention_cpu, q, k_pages, v_pages, block_table, lens, scale)
    return dmc_decode_attention_reference(q, k_pages, v_pages, block_table, lens, scale)


def dmc_tree_attention_cpu(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached,
                           scale: float | None = None, cached_pages: int | None = None):
    """The C++ kernel (kernels/cpu_dmc.cpp; float32 CPU tensors, ``cpu_ops.available()``).
    The output is [B, H, M, D], laid out as [B, M, H, D] in memory."""
    _check_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached)
    assert cpu_ops.available(), f"the CPU kernels: {cpu_ops.why_not()}"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.chatapp_cpu.dmc_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, block_table,
                                                    n_cached, scale)


def use_cpu_tree_slots(device, dtype) -> bool:
    """Whether ``dmc_tree_slots_cpu`` serves tensors of this device and dtype."""
    return cpu_ops.serves(device, dtype)


def dmc_tree_slots_cpu(qkv, cos, sin, parents, depth, win_k, win_v, win_w, run, start: int, init_val: float,
                       heads: int):
    """One layer's DMC slots of a Medusa tree's N nodes, each as token-by-token decoding of its
    root-to-node path would make it, with the C++ kernel (kernels/cpu_dmc.cpp; float32 CPU
    tensors). qkv [N, H + 2 Hkv, D]: the layer's unrotated projections per node; cos, sin [N, D]
    at each node's position; parents [N] (-1: the root, node 0; parents first), depth [N]; the
    layer's window buffer win_k, win_v [W, Hkv, D], win_w [W, Hkv] and open-run lengths run
    [Hkv]; start: the root's position; heads: H.

    Per node i and KV head: merge = k[D-1] > init_val (never for the root at position 0), the
    weight w = sigmoid(mean over the head's queries of q[D-1] + init_val) + 2**-7; the node's
    merge run begins at its nearest ancestor-or-self that appends (else where the cached open run
    began); its slot is the w-weighted mean of the keys (dim D-1 zeroed) and values of the last
    <= W tokens of that run on its path (nodes, then the window buffer's cached tokens). Node i
    sees its own slot and ancestor j's iff the child of j on i's path appends.

    Returns qk [N, H + Hkv, D] (the rotated queries and slot keys, dim D-1 zeroed), v_slot
    [N, Hkv, D], merge [N, Hkv], visible [Hkv, N, N], feat [N, Hkv, 2D + 1] ([k w | v w | w]),
    sums [N, Hkv, 2D + 1] (feat over each node's slot window), run_start [N, Hkv] (int64)."""
    return torch.ops.chatapp_cpu.dmc_tree_slots(qkv, cos, sin, parents, depth, win_k, win_v, win_w, run, int(start),
                                                float(init_val), int(heads))


CPU_KERNEL_ROWS = 64  # query tokens up to which the C++ kernel is used on a CPU (SDPA's blocked GEMMs win past)


def _tree_attention_fn(q):
    if use_triton(q):
        return dmc_tree_attention_triton
    if q.shape[2] <= CPU_KERNEL_ROWS and cpu_ops.serves(q.device, q.dtype):
        return dmc_tree_attention_cpu
    return dmc_tree_attention_reference


def dmc_tree_attention(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached,
                       scale: float | None = None, cached_pages: int | None = None):
    """Attention of M query tokens q [B, H, M, D] over each KV head's first n_cached[b, h] cached
    slots and the new slots k_new, v_new [B, Hkv, N, D] that visible [B, Hkv, M, N] allows (see
    the module docstring); [B, H, M, D] in q's dtype. ``cached_pages``: how many of the block
    table's columns hold the cached slots, where the caller knows it. Triton on CUDA; on a CPU
    the C++ kernel for a few queries (a decode step, a tree), PyTorch's SDPA for a prompt."""
    fn = _tree_attention_fn(q)
    return fn(q, k_new, v_new, visible, k_pages, v_pages, block_table, n_cached, scale, cached_pages)
