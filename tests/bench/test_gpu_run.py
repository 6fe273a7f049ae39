"""The prepared GPU run (bench/gpu_run.sh) is ready on a machine without a GPU: its dry run finds
every script and parses every step's arguments, and its smoke run goes through every step and
writes the summary table into one results folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs the script, and benchmarks, in subprocesses

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("tests", "fp8_gemm", "decode_e2e", "medusa_8b", "dmc_7b")


def run(*args, env=None, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # as on a fresh shell: the benchmarks set it themselves off a GPU
    return subprocess.run(["bash", "bench/gpu_run.sh", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_dry_run_checks_every_step():
    r = run("--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for step in STEPS:
        assert f"[{step}] at most" in r.stdout
    assert r.stdout.count("arguments parse") == len(STEPS) - 1 and "tests collect" in r.stdout
    assert "dry run: every step is ready" in r.stdout


def test_a_benchmark_argument_that_does_not_parse_fails_the_dry_run():
    r = subprocess.run([sys.executable, "bench/fp8_gemm.py", "--ms", "sixteen"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "CHATAPP_BENCH_DRY_RUN": "1"}, timeout=120)
    assert r.returncode == 2 and "--ms" in r.stderr


def test_smoke_run_writes_every_result_and_the_summary(tmp_path):
    out = tmp_path / "run"
    results = ROOT / "bench" / "results"
    before = {p.name: p.stat().st_size for p in results.glob("*.jsonl")}
    r = run("--smoke", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()] == \
        [[step, "0"] for step in STEPS]
    for bench in ("fp8_gemm", "decode_e2e", "medusa_decode_8b", "dmc_decode"):
        assert (out / f"{bench}.jsonl").exists(), bench  # the benchmarks' --save went to the results folder
    assert {p.name: p.stat().st_size for p in results.glob("*.jsonl")} == before  # and nothing to bench/results
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU run:")
    for figure in ("decode fp8", "FP8 GEMM decode", "Medusa (tiny", "DMC (tiny, synthetic, CR 8)", "peak VRAM"):
        assert figure in summary, figure
    assert "not run" not in summary and "| tests | ok" in summary
