"""Static checks of the GPU path (bench/gpu_static.py, kernels/gpu_compile.py): every Triton
kernel compiles for sm_90a and sm_89 at every launch configuration the engine may pick, within
the architecture's shared memory and without register spills; the check itself catches a tile
that is too big and one that spills. Triton compiles here for real GPUs (no GPU needed), so
these run in subprocesses without TRITON_INTERPRET."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import fp8_gemm

ROOT = Path(__file__).resolve().parents[2]


def compiled_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def launched_kernels() -> set[str]:
    """Every @triton.jit function of kernels/ that some module launches (``name[grid](...)``)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                if f"{node.name}[" in source:
                    names.add(node.name)
    return names


@pytest.fixture(scope="module")
def check():
    r = subprocess.run([sys.executable, "bench/gpu_static.py"], capture_output=True, text=True, timeout=900,
                       cwd=ROOT, env=compiled_env())
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper_and_ada_within_its_limits(check):
    rc, result, err = check
    assert rc == 0 and result["problems"] == [], err[-3000:]
    assert [a["arch"] for a in result["archs"]] == ["sm_90a", "sm_89"]
    assert launched_kernels() >= {"_fp8_gemm_kernel", "_reduce_kernel", "_tree_attention_kernel",
                                  "_dmc_update_kernel", "_dmc_tree_attention_kernel", "_quantize_rows_kernel"}
    for arch in result["archs"]:
        assert {r["kernel"] for r in arch["launches"]} == launched_kernels(), arch["arch"]
        limit = 227 * 1024 if arch["arch"] == "sm_90a" else 99 * 1024
        for row in arch["launches"]:
            assert row["shared"] <= limit and row["spill_stores"] == row["spill_loads"] == 0, row
            assert 0 < row["registers"] <= 255
        gemm = [r for r in arch["launches"] if r["kernel"] == "_fp8_gemm_kernel"]
        prefill = [r for r in gemm if r["config"]["BLOCK_M"] >= 64]
        decode = [r for r in gemm if r["config"]["BLOCK_M"] == 16]
        assert prefill and decode
        if arch["arch"] == "sm_90a":  # Hopper's warp-group MMA for the prefill tiles
            assert all(r["wgmma"] for r in prefill)
        assert all(r["mma"] and not r["wgmma"] for r in decode)  # 16-row tiles: mma.sync
        for r in decode:  # their loads are multi-buffered: cp.async into num_stages - 1 buffers of A and W
            c = r["config"]
            buffers = r["shared"] / (c["BLOCK_K"] * (c["BLOCK_M"] + c["BLOCK_N"]))
            assert r["cp_async"] > 0 and buffers >= c["num_stages"] - 1, r
        assert all(r["mma"] for r in prefill) if arch["arch"] == "sm_89" else True


@pytest.mark.slow
def test_the_check_fails_a_tile_too_big_and_one_that_spills():
    script = """
import json, torch
from kernels.gpu_compile import CompileOnly
from kernels.fp8_gemm import fp8_gemm_triton
meta = dict(device="meta")
a = torch.empty(512, 4096, dtype=torch.float8_e4m3fn, **meta)
w = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn, **meta)
s = torch.empty((), **meta)
base = dict(SPLIT_K=1, GROUP_M=8)
out = {}
for arch in ("sm_90a", "sm_89"):
    with CompileOnly(arch) as build:
        # 4 stages of 256x256 + 256x256 fp8 tiles: 512 KB of shared memory
        fp8_gemm_triton(a, w, s, s, config=dict(base, BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, num_warps=8, num_stages=4))
        # a 128x256 fp32 accumulator in one warp: 1024 values per thread
        fp8_gemm_triton(a, w, s, s, config=dict(base, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=1, num_stages=2))
        # fits on Hopper (4 stages of 48 KB), not on Ada (3 stages: mma.sync keeps one fewer)
        fp8_gemm_triton(a, w, s, s, config=dict(base, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=4))
    out[arch] = [launch.problems() for launch in build.launches]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=compiled_env())
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for arch in ("sm_90a", "sm_89"):
        too_big, spills, medium = out[arch]
        assert any("shared memory" in p for p in too_big), too_big
        assert any("register spills" in p for p in spills), spills
    assert out["sm_90a"][2] == [] and any("shared memory" in p for p in out["sm_89"][2])


def test_candidates_fit_the_architecture_they_are_timed_on():
    """A configuration that may not fit one block's shared memory, or (before Hopper) whose
    mma.sync accumulator would spill registers, is never a candidate there."""
    for capability, limit in ((90, 227 * 1024), (89, 99 * 1024), (80, 163 * 1024)):
        for m in (1, 16, 64, 512):
            configs = fp8_gemm.candidate_configs(m, 4096, 4096, 132, capability)
            assert configs and all(fp8_gemm.shared_bytes(c) <= limit for c in configs)
            assert configs[0] == fp8_gemm.pick_config(m, 4096, 4096, 132)  # the heuristic pick runs everywhere
            if capability < 90:
                assert all(c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"] for c in configs)
    hopper = fp8_gemm.candidate_configs(512, 4096, 4096, 132, 90)
    ada = fp8_gemm.candidate_configs(512, 4096, 4096, 132, 89)
    assert len(ada) < len(hopper) and all(c in hopper for c in ada)
    spills_on_ada = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=4, num_stages=4)
    assert spills_on_ada in hopper and spills_on_ada not in ada
