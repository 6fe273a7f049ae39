"""Every benchmark's smoke run works on a CPU, so that the full runs stay ready for a GPU."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def smoke(script: str) -> dict:
    r = subprocess.run([sys.executable, f"bench/{script}", "--smoke"], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["command"] == f"python bench/{script} --smoke" and summary["commit"] and summary["device"]
    return summary


def test_cpu_decode(embedded_session):
    s = smoke("cpu_decode.py")
    assert s["ours_decode_tok_s_median"] > 0 and s["transformers_decode_tok_s_median"] > 0


def test_fp8_gemm():
    s = smoke("fp8_gemm.py")
    assert {r["M"] for r in s["result"]} == {1, 17} and all(r["ours_us"] > 0 for r in s["result"])


def test_decode_e2e():
    s = smoke("decode_e2e.py")
    weights = [r["weights"] for r in s["result"]]
    assert weights == ["float32", "fp8"]
    assert all(r["tok_s"] > 0 and r["roofline_tok_s"] > 0 for r in s["result"])
    # FP8 weights halve (or better, vs fp32 quarter) the bytes per token
    assert s["result"][1]["bytes_per_token"] < s["result"][0]["bytes_per_token"] / 2
