"""Every benchmark's smoke run works on a CPU, so that the full runs stay ready for a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a benchmark script in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def smoke(script: str, *extra: str) -> dict:
    r = subprocess.run([sys.executable, f"bench/{script}", *extra, "--smoke"], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["command"] == " ".join(["python", f"bench/{script}", *extra, "--smoke"])
    assert summary["commit"] and summary["device"]
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


def test_medusa_decode(embedded_session):
    s = smoke("medusa_decode.py")
    assert s["prompts"] == 2 and s["identical"] == 2 and s["mean_tokens_per_step"] >= 1
    assert s["plain_tok_s"] > 0 and s["medusa_tok_s"] > 0 and s["tree"].startswith("auto")


def test_medusa_decode_8b_shape():
    s = smoke("medusa_decode.py", "--shape", "8b")
    assert s["shape"] == "tiny" and s["plain_step_ms"] > 0
    assert [r["nodes"] for r in s["rows"]][:3] == [2, 3, 4] and all(r["step_ms"] > 0 for r in s["rows"])


def test_dmc_decode():
    s = smoke("dmc_decode.py")
    assert s["decisions"] == "synthetic, CR 8" and len(s["result"]) == 4
    for r in s["result"]:
        assert r["kv_compression"] == 8.0  # every 8th token appends
        assert r["dmc_kv_bytes_per_token"] * 8 == r["plain_kv_bytes_per_token"]
        assert r["plain_tok_s"] > 0 and r["dmc_tok_s"] > 0


def test_compose(embedded_session):
    s = smoke("compose.py")
    setups = s["setups"]
    assert set(setups) == {"plain", "medusa", "dmc", "medusa+dmc"}
    assert setups["medusa+dmc"]["identical_to_dmc"] == 2 and setups["medusa"]["identical_to_plain"] == 2
    assert setups["dmc"]["kv_bytes_per_token"] < setups["plain"]["kv_bytes_per_token"]
    assert setups["dmc"]["reply_perplexity"] > 1


@pytest.mark.parametrize("script", ["cpu_peers.py", "cpu_busy.py", "fp8_quality.py"])
def test_cpu_comparisons_parse_their_arguments(script):
    """The CPU comparisons take minutes (bench/results holds their figures): here their imports
    and arguments, as gpu_run.sh's dry run checks the GPU benchmarks'."""
    import os

    r = subprocess.run([sys.executable, f"bench/{script}", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0 and "usage" in r.stdout
    r = subprocess.run([sys.executable, f"bench/{script}"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "CHATAPP_BENCH_DRY_RUN": "1"})
    assert r.returncode == 0 and "arguments parse" in r.stdout, r.stderr[-1000:]


def test_the_held_out_text_is_real_and_fixed():
    sys.path.insert(0, str(ROOT / "bench"))
    from fp8_quality import held_out_text

    text = held_out_text()
    assert len(text) > 100_000 and text == held_out_text() and "Return" in text
