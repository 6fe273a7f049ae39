"""FP8 GEMM benchmark at the Llama-3.1-8B linear shapes: our Triton kernel against
torch._scaled_mm (cuBLASLt / CUTLASS) and bf16 torch.matmul, for both scale schemes.

    .venv/bin/python bench/fp8_gemm.py --save     # on a CUDA GPU (results: bench/results/fp8_gemm.jsonl)
    .venv/bin/python bench/fp8_gemm.py --smoke    # anywhere: tiny shapes, checks that everything runs

One JSON line per case: shape, M, microseconds of each, TFLOP/s and GB/s of ours, and the
ratios ours/_scaled_mm and bf16/ours (how much faster than bf16 we are)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, record  # noqa: E402

# Llama-3.1-8B: hidden 4096, 32 heads / 8 KV heads of 128, MLP 14336, vocab 128256 (N, K)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
MS = [1, 2, 4, 8, 16, 64, 512, 2048]


def bench_us(fn) -> float:
    """Median time of fn in microseconds: CUDA-graph replays on a GPU (no launch overhead), one
    plain call elsewhere (the smoke run only checks that the code runs)."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=100) * 1000
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs without a GPU (Triton interpreter)")
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help=f"rows (tokens) of the problems (default {MS})")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            sys.exit("fp8_gemm: needs a CUDA GPU (use --smoke to check the script on a CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels.fp8_gemm import fp8_gemm_triton
    from kernels.fp8_quant import quantize_rows

    dev = "cuda" if cuda else "cpu"
    shapes = {"tiny": (64, 128)} if args.smoke else {name: SHAPES[name] for name in args.shapes}
    ms = [1, 17] if args.smoke else args.ms
    rows = []
    for name, (n, k) in shapes.items():
        w_bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        w, sw = quantize_rows(w_bf16)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            a, sa = quantize_rows(x)
            for scheme in ("tensor", "token_channel"):
                sa_, sw_ = (sa.max(), sw.max()) if scheme == "tensor" else (sa, sw)
                ours = bench_us(lambda: fp8_gemm_triton(a, w, sa_, sw_))
                row = {"shape": name, "N": n, "K": k, "M": m, "scales": scheme, "ours_us": round(ours, 2),
                       "ours_tflops": round(2 * m * n * k / ours / 1e6, 2),
                       "ours_gbs": round((n * k + m * k + 2 * m * n) / ours / 1e3, 1)}
                if cuda:
                    if scheme == "tensor":
                        sm = lambda: torch._scaled_mm(a, w.t(), sa_.reshape(()), sw_.reshape(()),  # noqa: E731
                                                      out_dtype=torch.bfloat16)
                    else:
                        sm = lambda: torch._scaled_mm(a, w.t(), sa_, sw_.reshape(1, -1),  # noqa: E731
                                                      out_dtype=torch.bfloat16)
                    try:
                        row["scaled_mm_us"] = round(bench_us(sm), 2)
                        row["ours_vs_scaled_mm"] = round(row["scaled_mm_us"] / ours, 3)
                    except RuntimeError as e:  # e.g. shapes cuBLASLt rejects
                        row["scaled_mm_error"] = str(e).splitlines()[0][:120]
                    bf16 = bench_us(lambda: x @ w_bf16.t())
                    row["bf16_us"] = round(bf16, 2)
                    row["speedup_vs_bf16"] = round(bf16 / ours, 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
    record("fp8_gemm", rows, args, save=args.save)


if __name__ == "__main__":
    main()
