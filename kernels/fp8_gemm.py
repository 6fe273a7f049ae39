"""FP8 x FP8 GEMM with fp32 accumulation and a scaled epilogue:

    out[m, n] = (sum_k a[m, k] * w[n, k]) * scale_a[m or 0] * scale_w[n or 0] (+ bias[n]),

computed in fp32 and rounded once to the output type

a: [M, K] fp8 activations; w: [N, K] fp8 weights as stored in checkpoints (read K-major through
strides, never transposed in memory); scale_a: scalar (per-tensor, modelopt) or [M, 1] (per-token,
compressed-tensors); scale_w: scalar or [N, 1] (per-channel); output bf16 (or fp16/fp32).

Two launch shapes of one kernel: decode (M <= 16) uses a 16-row tile and split-K, so that a
weight-read-bound GEMV spreads over all SMs; prefill uses large tiles. With split-K the partial
sums go to an fp32 buffer and a second kernel reduces them and applies the epilogue
(deterministic, unlike atomics). The split factor is a run-time argument of both kernels (the
GEMM compiles once for split and once for unsplit launches, not once per factor). On a GPU each
problem shape's launch configuration is timed among a few candidates the first time it runs
(``tuned_config``); the heuristic pick is the fallback."""

from __future__ import annotations

import os

import torch

from ._triton import SHARED_LIMIT, tl, triton, use_triton


# ---- reference -----------------------------------------------------------------------------
def fp8_gemm_reference(a: torch.Tensor, w: torch.Tensor, scale_a: torch.Tensor, scale_w: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    acc = a.float() @ w.float().t()
    acc = acc * scale_a.float().reshape(-1, 1) * scale_w.float().reshape(1, -1)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


# ---- Triton --------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, out_ptr, stride_om,
                  SA_ROWS: tl.constexpr, SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr):
        mask_m = offs_m < M
        mask_n = offs_n < N
        if SA_ROWS:
            sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            sa = tl.load(sa_ptr)
        if SW_COLS:
            sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            sw = tl.load(sw_ptr)
        out = acc * sa * sw
        if HAS_BIAS:  # fp32 bias, added before the one rounding to the output type
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        out = out.to(out_ptr.dtype.element_ty)
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(ptrs, out, mask=mask_m[:, None] & mask_n[None, :])

    # M is not specialized on (its value 1 or its divisibility by 16 would each compile another
    # variant of the kernel: a tree or prompt of a new size would stall a step on the compiler)
    @triton.jit(do_not_specialize=["M"])
    def _fp8_gemm_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, out_ptr, part_ptr,
                         M, N, K, stride_am, stride_wn, stride_om, k_per_split,
                         SA_ROWS: tl.constexpr, SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        # grouped ordering of the output tiles: consecutive programs share rows of A / tiles of W
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % rows_in_group)
        pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k_start + offs_k)[None, :]
        # W is [N, K] row-major; the tile is read as [BLOCK_K, BLOCK_N] (K-major operand)
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            k_mask = (k + offs_k) < k_end
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(a, w, acc, out_dtype=tl.float32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if not PARTIAL:
            _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, out_ptr, stride_om,
                      SA_ROWS, SW_COLS, HAS_BIAS)
        else:
            ptrs = (part_ptr + split.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :])
            tl.store(ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit(do_not_specialize=["M"])
    def _reduce_kernel(part_ptr, sa_ptr, sw_ptr, bias_ptr, out_ptr, M, N, stride_om, splits,
                       SA_ROWS: tl.constexpr, SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(splits):
            acc += tl.load(ptrs + s * M * N, mask=mask, other=0.0)
        _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, out_ptr, stride_om,
                  SA_ROWS, SW_COLS, HAS_BIAS)


def pick_config(m: int, n: int, k: int, num_sms: int = 132) -> dict:
    """Tile sizes and split-K for a problem. Decode (M <= 16): one 16-row tile, narrow N tiles
    and enough K splits that every SM streams a share of the weights. Prefill: large tiles."""
    if m <= 16:
        block_n, block_k = 64, 256
        tiles = triton.cdiv(n, block_n)
        split = 1
        while tiles * split < 2 * num_sms and k // (split * 2) >= block_k:
            split *= 2
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, GROUP_M=1, num_warps=4,
                    num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_gemm_triton(a: torch.Tensor, w: torch.Tensor, scale_a: torch.Tensor, scale_w: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                    config: dict | None = None) -> torch.Tensor:
    m, k = a.shape
    n, k2 = w.shape
    assert k == k2 and a.stride(1) == 1 and w.stride(1) == 1
    if config is None:
        config = tuned_config(a, w, scale_a, scale_w, bias, out_dtype)
    cfg = dict(config)
    split = cfg.pop("SPLIT_K")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    sa = scale_a.float().reshape(-1)
    sw = scale_w.float().reshape(-1)
    flags = dict(SA_ROWS=sa.numel() > 1, SW_COLS=sw.numel() > 1, HAS_BIAS=bias is not None)
    bias_arg = bias.float() if bias is not None else sw
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    part = torch.empty((split, m, n), dtype=torch.float32, device=a.device) if split > 1 else out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _fp8_gemm_kernel[grid](a, w, sa, sw, bias_arg, out, part, m, n, k, a.stride(0), w.stride(0), out.stride(0),
                           k_per_split, PARTIAL=split > 1, **flags, **cfg)
    if split > 1:
        rgrid = (triton.cdiv(m, 16), triton.cdiv(n, 128))
        _reduce_kernel[rgrid](part, sa, sw, bias_arg, out, m, n, out.stride(0), split, BLOCK_M=16, BLOCK_N=128,
                              **flags)
    return out


def shared_bytes(cfg: dict) -> int:
    """An upper bound of a configuration's shared memory: num_stages buffers of an fp8 A tile and
    W tile (Triton keeps num_stages of them with wgmma, one fewer with mma.sync)."""
    return cfg["num_stages"] * (cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"])


def candidate_configs(m: int, n: int, k: int, num_sms: int = 132, capability: int = 90) -> list[dict]:
    """The launch configurations timed for a problem (the heuristic pick first): for decode,
    N tiles, K blocks and split-K factors around the pick; for prefill, tile shapes with 3-4
    pipeline stages. Those that cannot run well on the architecture (compute capability, e.g. 90
    for Hopper, 89 for Ada) are left out: see ``fits``."""
    pick = pick_config(m, n, k, num_sms)
    out = [pick]
    if m <= 16:
        for block_n in (32, 64, 128):
            for block_k in (128, 256):
                for split in {max(1, pick["SPLIT_K"] // 2), pick["SPLIT_K"], pick["SPLIT_K"] * 2}:
                    if k // split >= block_k:
                        out.append(dict(pick, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split))
    else:
        for bm, bn, bk, warps, stages in ((64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4),
                                          (128, 256, 64, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                          (64, 256, 128, 8, 3)):
            if bm <= max(64, triton.next_power_of_2(m)):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, GROUP_M=8, num_warps=warps,
                                num_stages=stages))
    unique = []
    for c in out:
        if c not in unique and fits(c, capability):
            unique.append(c)
    return unique


# fp32 accumulator values per thread an mma.sync tile may hold: with more, the operands no longer
# fit in 255 registers and ptxas spills (bench/gpu_static.py on sm_89: 128 per thread spilled
# 600-690 bytes in every such tile, 64 none)
MMA_SYNC_ACCUMULATORS = 64


def fits(cfg: dict, capability: int) -> bool:
    """Whether a configuration runs on the architecture without exceeding one block's shared
    memory or spilling registers. Before Hopper (capability < 90) the tile's MMA is mma.sync, whose
    accumulator lives in each thread's registers; Hopper's wgmma compiles the same tiles cleanly."""
    limit = SHARED_LIMIT.get(capability, min(SHARED_LIMIT.values()))
    if shared_bytes(cfg) > limit:
        return False
    per_thread = cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
    return capability >= 90 or per_thread <= MMA_SYNC_ACCUMULATORS


AUTOTUNE = os.environ.get("CHATAPP_FP8_AUTOTUNE", "1") != "0"
_tuned: dict[tuple, dict] = {}


def tuned_config(a, w, scale_a, scale_w, bias, out_dtype, timer=None) -> dict:
    """The fastest of ``candidate_configs`` for this problem on this GPU, timed once per process
    and shape (M rounded up to a power of two); the heuristic pick in Triton's interpreter, with
    ``CHATAPP_FP8_AUTOTUNE=0``, or while a CUDA graph is being captured (a capture cannot time;
    the engine's captures run their warm-up calls first, so those shapes are tuned already).
    ``timer(fn) -> ms``: how to time a launch (default triton.testing.do_bench). Tuned here rather
    than with ``@triton.autotune``: that would time inside a CUDA-graph capture and under the
    interpreter, and a split-K choice also picks the partial-sum buffer and the reduce launch."""
    m, k = a.shape
    n = w.shape[0]
    key = (a.device, triton.next_power_of_2(m), n, k, out_dtype, bias is not None, scale_a.numel() > 1,
           scale_w.numel() > 1)
    if key in _tuned:
        return _tuned[key]
    sms = _num_sms(a.device)
    cap = _capability(a.device)
    tunable = timer is not None or (AUTOTUNE and a.device.type == "cuda" and not torch.cuda.is_current_stream_capturing())
    if not tunable:
        return pick_config(m, n, k, sms)
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=5, rep=20)
    best, best_ms = None, float("inf")
    for cfg in candidate_configs(m, n, k, sms, cap):
        try:
            ms = timer(lambda cfg=cfg: fp8_gemm_triton(a, w, scale_a, scale_w, bias, out_dtype, config=cfg))
        except Exception:  # a configuration this GPU cannot run (e.g. out of shared memory)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _tuned[key] = best = best or pick_config(m, n, k, sms)
    return best


def _capability(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90  # the interpreter runs the candidates of an H100


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count: the interpreter runs the launch shape chosen for one


# ---- dispatch ------------------------------------------------------------------------------
def fp8_gemm(a, w, scale_a, scale_w, bias=None, out_dtype=torch.bfloat16):
    if use_triton(a):
        return fp8_gemm_triton(a, w, scale_a, scale_w, bias, out_dtype)
    return fp8_gemm_reference(a, w, scale_a, scale_w, bias, out_dtype)
