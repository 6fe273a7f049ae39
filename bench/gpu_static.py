"""Static checks of the GPU path, without a GPU: every Triton kernel in kernels/, at every launch
configuration its dispatcher or the FP8 GEMM's autotuner may pick for the shapes the engine runs
(Llama-3.1-8B, Llama-2-7B, the embedded SmolLM2-135M; decode, Medusa trees up to 64 nodes,
prefill chunks), compiled for sm_90a (H100/H200) and sm_89 (L40S, RTX 4090). Per compiled
kernel: registers, spills and shared memory (ptxas), and its main PTX instructions.

It fails (exit 1, the reasons printed) where a launch spills registers or asks for more shared
memory than one block may use on the architecture, or where the FP8 prefill GEMM does not use
wgmma on sm_90a.

    .venv/bin/python bench/gpu_static.py --save     # both architectures, bench/results/gpu_static.jsonl

The architectures compile in parallel processes; Triton's compile cache (~/.triton/cache)
makes a second run fast. Needs Triton compiled, not interpreted: TRITON_INTERPRET is unset in
the workers."""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# the shapes of the models the engine is built around (their config.json)
MODELS = {
    "Llama-3.1-8B": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336),
    "Llama-2-7B": dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008),
    "SmolLM2-135M": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536),
}
DMC_MODELS = ("Llama-2-7B", "SmolLM2-135M")  # the DMC seed and the embedded model's retrofit
DECODE_ROWS = tuple(range(1, 17))  # one-token steps of up to 16 sequences, small trees
TREE_NODES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # Medusa trees (engine/decoding/medusa/plan.py)
PREFILL_ROWS = (17, 64, 65, 128, 256, 512)  # prompt chunks (engine/decoding/plain.py: 512 at most)
DMC_PREFILL_ROWS = (16, 100, 256)  # DMC prefill attention chunks (engine/decoding/dmc.py: 256)
# streaming multiprocessors of the GPUs of each architecture: the GEMM's split-K depends on them
SMS = {"sm_90a": (132, 114), "sm_89": (142, 128, 58)}  # H100 SXM/H200, H100 PCIe; L40S, RTX 4090, L4
DTYPE = "bfloat16"  # the activations' and caches' dtype on a GPU
PAGE = 16  # DMC cache page size (engine/decoding/dmc.py)


def linears(m: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of each fused projection of a model."""
    h, d = m["hidden"], m["head_dim"]
    return {"qkv": ((m["heads"] + 2 * m["kv_heads"]) * d, h), "o": (h, m["heads"] * d),
            "gate_up": (2 * m["intermediate"], h), "down": (h, m["intermediate"])}


def launch_all(arch: str) -> None:
    """Every launch of the engine's shapes, through the kernels' own wrappers on meta tensors."""
    import torch

    from kernels import dmc, fp8_gemm, fp8_quant, tree_attention
    from kernels.gpu_compile import capability

    meta = dict(device="meta")
    dt = getattr(torch, DTYPE)
    fp8 = torch.float8_e4m3fn
    for name, m in MODELS.items():
        shapes = linears(m)
        # FP8 linears: weights quantized per channel on load, activations per token or per tensor
        for n, k in shapes.values():
            fp8_quant.quantize_rows_triton(torch.empty(n, k, dtype=dt, **meta))
            w, sw_channel, scalar = (torch.empty(n, k, dtype=fp8, **meta), torch.empty(n, 1, **meta),
                                     torch.empty((), **meta))
            for rows in DECODE_ROWS + TREE_NODES + PREFILL_ROWS:
                x = torch.empty(rows, k, dtype=dt, **meta)
                fp8_quant.quantize_rows_triton(x)
                fp8_quant.quantize_static_triton(x, scalar)
                a = torch.empty(rows, k, dtype=fp8, **meta)
                for sms in SMS[arch]:
                    for cfg in fp8_gemm.candidate_configs(rows, n, k, sms, capability(arch)):
                        # channel x token (compressed-tensors) and per-tensor (modelopt) scales
                        fp8_gemm.fp8_gemm_triton(a, w, torch.empty(rows, 1, **meta), sw_channel, config=cfg)
                        fp8_gemm.fp8_gemm_triton(a, w, scalar, scalar, config=cfg)
        # attention of a Medusa tree over the dense cache
        d, h, hkv = m["head_dim"], m["heads"], m["kv_heads"]
        for t in TREE_NODES:
            q = torch.empty(1, h, t, d, dtype=dt, **meta)
            kv = torch.empty(1, hkv, 4096, d, dtype=dt, **meta)
            tree_attention.tree_attention_triton(q, kv, kv, 1000, torch.empty(t, t, dtype=torch.bool, **meta))
        if name not in DMC_MODELS:
            continue
        # DMC: the per-token update, decode attention, a tree or a prompt chunk over the pages
        f32 = dict(dtype=torch.float32, **meta)
        state = [torch.empty(1, hkv, d, **f32), torch.empty(1, hkv, d, **f32), torch.empty(1, hkv, **f32),
                 torch.empty(12, 1, hkv, d, **f32), torch.empty(12, 1, hkv, d, **f32), torch.empty(12, 1, hkv, **f32),
                 torch.empty(1, hkv, dtype=torch.int32, **meta), torch.empty(1, hkv, dtype=torch.int32, **meta)]
        q1, k1 = torch.empty(1, h, d, dtype=dt, **meta), torch.empty(1, hkv, d, dtype=dt, **meta)
        dmc.dmc_update_triton(q1, k1, k1, *state, 3, False)
        pages = torch.empty(1024, PAGE, d, dtype=dt, **meta)
        table = torch.empty(1, hkv, 256, dtype=torch.int32, **meta)
        lens = torch.empty(1, hkv, dtype=torch.int32, **meta)
        dmc.dmc_decode_attention_triton(q1, pages, pages, table, lens)
        for t in TREE_NODES + DMC_PREFILL_ROWS:
            q = torch.empty(1, h, t, d, dtype=dt, **meta)
            new = torch.empty(1, hkv, t, d, dtype=dt, **meta)
            dmc.dmc_tree_attention_triton(q, new, new, torch.empty(1, hkv, t, t, dtype=torch.bool, **meta), pages, pages,
                                          table, lens)


def check_arch(arch: str) -> dict:
    """Compile every launch for ``arch``: the launches' figures and the problems found."""
    os.environ.pop("TRITON_INTERPRET", None)
    from kernels.gpu_compile import CompileOnly

    t0 = time.perf_counter()
    with CompileOnly(arch) as build:
        launch_all(arch)
    rows, problems = [], []
    for launch in build.launches:
        res = launch.resources()
        row = {"kernel": launch.kernel, "config": launch.config, "dtypes": launch.dtypes, **res}
        rows.append(row)
        problems += [f"{arch} {launch.kernel} {launch.config}: {why}" for why in launch.problems()]
        if launch.kernel == "_fp8_gemm_kernel" and launch.constants["BLOCK_M"] >= 64 and arch == "sm_90a" \
                and not res["wgmma"]:
            problems.append(f"{arch} {launch.kernel} {launch.config}: an FP8 prefill tile without wgmma")
    return {"arch": arch, "kernels": len(rows), "seconds": round(time.perf_counter() - t0, 1), "launches": rows,
            "problems": problems}


def summary(result: dict) -> list[str]:
    """Per architecture and kernel: how many compiled variants, the most registers and shared memory."""
    lines = []
    for arch in result["archs"]:
        by_kernel: dict[str, list[dict]] = {}
        for row in arch["launches"]:
            by_kernel.setdefault(row["kernel"], []).append(row)
        for kernel, rows in by_kernel.items():
            lines.append(f"{arch['arch']:7} {kernel:28} {len(rows):3} variants, registers <= "
                         f"{max(r['registers'] for r in rows):3}, shared <= {max(r['shared'] for r in rows) // 1024:3} KB, "
                         f"spills {sum(r['spill_stores'] + r['spill_loads'] for r in rows)} B, wgmma in "
                         f"{sum(1 for r in rows if r['wgmma'])}, mma.sync in {sum(1 for r in rows if r['mma'])}")
    return lines


def main() -> int:
    from kernels.gpu_compile import ARCHS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=list(ARCHS), help="(repeatable; default: all)")
    ap.add_argument("--save", action="store_true", help="append the result to bench/results/gpu_static.jsonl")
    from common import parse_args, record

    args = parse_args(ap)
    archs = args.arch or list(ARCHS)
    with ProcessPoolExecutor(len(archs), mp_context=get_context("spawn")) as pool:
        results = list(pool.map(check_arch, archs))
    out = {"archs": results, "problems": [p for r in results for p in r["problems"]]}
    for line in summary(out):
        print(line, file=sys.stderr)
    for p in out["problems"]:
        print("problem:", p, file=sys.stderr)
    record("gpu_static", out, args, save=args.save)
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
