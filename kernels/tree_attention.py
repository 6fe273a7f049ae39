"""Attention for tree verification (Medusa): T query tokens, the nodes of a candidate tree,
attend to the whole KV-cache prefix and to the tree nodes their row of a tree mask allows.

    q: [B, H, T, D]; k_cache, v_cache: [B, Hkv, L, D] with L >= start + T, the tree's own keys
    and values already written at slots start..start+T-1; tree_mask: [T, T] bool (node i may
    attend to node j iff tree_mask[i, j]; the diagonal must be true).
    out[b, h, i] = softmax(scale * q[b, h, i] . k[b, h // (H // Hkv), j]) @ v over the slots j
    in 0..start-1 (all of them) and start + j' for tree_mask[i, j'].

Grouped-query attention: query head h reads KV head h // (H // Hkv). Only slots below start + T
are read. scale defaults to 1 / sqrt(D).

The Triton kernel runs one program per (batch, KV head, block of query rows), where the query
rows of a KV head are those of all the query heads sharing it (group-major), so each K/V block is
loaded once for the whole group. Flash-attention style: an online softmax in fp32 over the prefix
in BLOCK_N-slot blocks with no mask, then over the remaining slots (the prefix's partial last
block and the tree's slots) with the tree mask loaded per block. Any strides; fp32 (dot products
in IEEE fp32), fp16 and bf16 (fp32 accumulation)."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ._triton import interpreting, tl, triton, use_triton


def _check(q, k_cache, v_cache, start, tree_mask):
    b, h, t, d = q.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "k_cache, v_cache: [B, Hkv, L, D]"
    bk, hkv, length, dk = k_cache.shape
    assert bk == b and dk == d and h % hkv == 0, f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}"
    assert 0 <= start and start + t <= length, f"slots {start}..{start + t - 1} are not all in the cache (L={length})"
    assert tree_mask.shape == (t, t) and tree_mask.dtype == torch.bool, "tree_mask: [T, T] bool"
    return b, h, t, d, hkv


# ---- reference -----------------------------------------------------------------------------
_last_mask = None  # (weakref to a tree mask, start, groups, the mask built from it)


def _grouped_mask(tree_mask: torch.Tensor, start: int, groups: int) -> torch.Tensor:
    """The boolean mask over slots 0..start+T-1 for the grouped query rows ([groups * T,
    start + T], rows group-major): every prefix slot, then the tree mask. The last one built is
    kept, since a forward pass asks for the same one in every layer; it is reused only for the
    same tensor object (tree masks are built once per tree and never written to; inference
    tensors have no version counter to check that)."""
    global _last_mask
    memo = _last_mask
    if memo is not None and memo[0]() is tree_mask and memo[1] == start and memo[2] == groups:
        return memo[3]
    t = tree_mask.shape[0]
    mask = torch.ones(groups, t, start + t, dtype=torch.bool, device=tree_mask.device)
    mask[:, :, start:] = tree_mask
    mask = mask.view(groups * t, start + t)
    _last_mask = (weakref.ref(tree_mask), start, groups, mask)
    return mask


def tree_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                             tree_mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention with an explicit mask. Grouped-query attention
    without copying K/V: the query heads that share a KV head become extra query rows of it."""
    b, h, t, d, hkv = _check(q, k_cache, v_cache, start, tree_mask)
    groups = h // hkv
    end = start + t
    qg = q.reshape(b, hkv, groups * t, d).contiguous()
    mask = _grouped_mask(tree_mask.to(q.device), start, groups)
    if k_cache.shape[2] != end:
        k_cache, v_cache = k_cache[:, :, :end], v_cache[:, :, :end]
    out = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask, scale=scale)
    return out.view(b, h, t, d)


# ---- Triton --------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b in fp32. UPCAST: the operands are converted to fp32 first (exactly), for bf16
        under Triton's interpreter, whose dot multiplies bf16 operands' raw bits as integers."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Fold one block of scores s [BLOCK_M, BLOCK_N] (log2 units, -inf where masked) and its
        values v [BLOCK_N, BLOCK_D] into the running max m_i, sum l_i and output acc. A row with
        no allowed slot yet keeps m_i = -inf; the exponents are taken against 0 for it, so no
        -inf - -inf appears."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["start"])  # the cache length: a new value every step
    def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, start, T, groups, qk_scale,
                               sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                               smi, smj, sob, soh, sot, sod,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)

        # query rows of this KV head: row r is node r % T of query head kvh * groups + r // T
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < groups * T
        g = rows // T
        node = (rows - g * T).to(tl.int64)
        head = kvh * groups + g.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_ptrs = q_ptr + b * sqb + head[:, None] * sqh + node[:, None] * sqt + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        k_base = k_ptr + b * skb + kvh * skh
        v_base = v_ptr + b * svb + kvh * svh
        offs_n = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # the prefix's whole blocks: every slot allowed, no bounds
        prefix_blocks_end = (start // BLOCK_N) * BLOCK_N
        for n0 in range(0, prefix_blocks_end, BLOCK_N):
            cols = (n0 + offs_n).to(tl.int64)
            k = tl.load(k_base + cols[None, :] * skl + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svl + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
            s = _dot(q, k, PRECISION, UPCAST) * qk_scale
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

        # the rest of the prefix, then the tree's slots, under the tree mask; nothing past start + T
        end = start + T
        for n0 in range(prefix_blocks_end, end, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < end
            in_tree = cols >= start
            k = tl.load(k_base + cols[None, :].to(tl.int64) * skl + offs_d[:, None] * skd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None].to(tl.int64) * svl + offs_d[None, :] * svd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k, PRECISION, UPCAST) * qk_scale
            tree = tl.load(mask_ptr + node[:, None] * smi + (cols - start)[None, :] * smj,
                           mask=row_ok[:, None] & (in_tree & col_ok)[None, :], other=0)
            allowed = (tree != 0) | (cols < start)[None, :]
            s = tl.where(allowed, s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

        l_i = tl.where(l_i > 0, l_i, 1.0)  # padding rows only: every real row allows its own slot
        out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
        o_ptrs = out_ptr + b * sob + head[:, None] * soh + node[:, None] * sot + offs_d[None, :] * sod
        tl.store(o_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])


def pick_config(rows: int, head_dim: int) -> dict:
    """Tile sizes for ``rows`` query rows per KV head (query heads per KV head x tree nodes)."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    # 128-wide heads take 32-slot blocks: with 64 a 16- or 32-row tile spills registers on sm_90a;
    # a 64-row tile takes 8 warps: with 4, 64-wide heads spill on sm_89 (bench/gpu_static.py)
    return dict(BLOCK_M=block_m, BLOCK_N=64 if head_dim <= 64 else 32,
                num_warps=4 if block_m * head_dim < 64 * 64 else 8, num_stages=2)


def tree_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                          tree_mask: torch.Tensor, scale: float | None = None,
                          config: dict | None = None) -> torch.Tensor:
    """The Triton kernel. The output is [B, H, T, D], laid out as [B, T, H, D] in memory (the
    order the output projection reads it in)."""
    b, h, t, d, hkv = _check(q, k_cache, v_cache, start, tree_mask)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {q.dtype}"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "q, k_cache and v_cache must share a dtype"
    groups = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    mask = tree_mask.to(q.device).view(torch.uint8)
    cfg = dict(config or pick_config(groups * t, d))
    grid = (triton.cdiv(groups * t, cfg["BLOCK_M"]), hkv, b)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, mask, out, start, t, groups, scale * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mask.stride(), *out.stride(),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and interpreting(), **cfg)
    return out


# ---- dispatch ------------------------------------------------------------------------------
def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                   tree_mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of the T tree nodes q [B, H, T, D] over cache slots 0..start+T-1 (see the
    module docstring); [B, H, T, D] in q's dtype."""
    if use_triton(q):
        return tree_attention_triton(q, k_cache, v_cache, start, tree_mask, scale)
    return tree_attention_reference(q, k_cache, v_cache, start, tree_mask, scale)
