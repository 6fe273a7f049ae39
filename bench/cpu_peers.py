"""Our engine against llama.cpp, the engine ollama and LM Studio run, on the embedded model and
this CPU, in one run: decode tokens/s, interleaved in rounds so that the machine's drift hits
every case alike.

llama.cpp is not a dependency of chatapp. This benchmark builds it, in an optional setup step,
from the llama-cpp-python source distribution on PyPI (its vendored llama.cpp, CPU backend,
``llama-bench`` and ``llama-quantize``; cmake and a C++ compiler needed, ~10 minutes on 2 cores),
into chatapp's cache folder; without it the llama.cpp cases are skipped with a message.

    .venv/bin/python bench/cpu_peers.py --setup                 # once: download and build llama.cpp
    .venv/bin/python bench/cpu_peers.py --save                  # the comparison (~10 min)
    .venv/bin/python bench/cpu_peers.py --threads 1 --rounds 1  # quicker

Cases: llama.cpp (``llama-bench -p 0 -n N -t T``) on the GGUF file chatapp ships (Q4_1) and on
its Q8_0 and F32 conversions (``llama-quantize --allow-requantize``: the same weights chatapp
reads, dequantized from that file); chatapp (``chatapp run --max-new-tokens N --ignore-eos
--json``, in a fresh process per run, with T threads) with float32, bf16 and FP8 weights,
decoding plain and with Medusa.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator keeps food cold.",
           "Give me five tips for a job interview.", "Describe the water cycle for a ten-year-old."]
CHATAPP = {"chatapp fp32": [], "chatapp bf16": ["--quantize", "bf16"], "chatapp fp8": ["--quantize", "fp8"]}


def peer_dir() -> Path:
    sys.path.insert(0, str(ROOT))
    from engine.paths import cache_dir

    return cache_dir() / "peers" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def shipped_gguf() -> Path:
    sys.path.insert(0, str(ROOT))
    from engine.hub.embedded import gguf_path

    return gguf_path()


def setup(sdist: str | None) -> None:
    """Download the source distribution (or take ``sdist``), build llama-bench and llama-quantize,
    and write the Q8_0 and F32 conversions of the shipped GGUF."""
    where = peer_dir()
    where.mkdir(parents=True, exist_ok=True)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"cpu_peers --setup: {tool} is not installed (apt-get install cmake g++)")
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
            sdist = str(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = where / "build"
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize",
                        "-j", str(os.cpu_count() or 2)], check=True)
    for kind in ("Q8_0", "F32"):
        subprocess.run([str(where / "build" / "bin" / "llama-quantize"), "--allow-requantize", str(shipped_gguf()),
                        str(where / f"{kind}.gguf"), kind], check=True, capture_output=True)
    print(f"llama.cpp built in {where}")


def llama_models() -> dict[str, Path] | None:
    where = peer_dir()
    models = {"llama.cpp Q4_1 (shipped)": shipped_gguf(), "llama.cpp Q8_0": where / "Q8_0.gguf",
              "llama.cpp F32": where / "F32.gguf"}
    if not (where / "build" / "bin" / "llama-bench").exists() or not all(p.exists() for p in models.values()):
        return None
    return models


def run_llama(model: Path, tokens: int, threads: int) -> float:
    out = subprocess.run([str(peer_dir() / "build" / "bin" / "llama-bench"), "-m", str(model), "-p", "0", "-n",
                          str(tokens), "-t", str(threads), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=600)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def run_chatapp(extra: list[str], decoding: str, prompt: str, tokens: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CHATAPP_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "chatapp", "run", *extra, "--decoding", decoding, "--prompt", prompt,
                          "--max-new-tokens", str(tokens), "--ignore-eos", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if out.returncode:
        raise SystemExit(f"chatapp run failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", action="store_true", help="download and build llama.cpp, then exit")
    ap.add_argument("--sdist", help="with --setup: a llama-cpp-python source archive already downloaded")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    if args.setup:
        setup(args.sdist)
        return
    models = llama_models()
    if models is None:
        print(f"cpu_peers: llama.cpp is not built in {peer_dir()}: the llama.cpp cases are skipped "
              "(build it with: .venv/bin/python bench/cpu_peers.py --setup)", file=sys.stderr)
    load_before = os.getloadavg()
    cases = [(name, None, "plain") for name in (models or {})]
    cases += [(name, extra, dec) for name, extra in CHATAPP.items() for dec in ("plain", "medusa")]
    for name, extra, dec in cases:  # warm-up: builds, calibration, the Medusa plan's step costs
        if extra is not None:
            run_chatapp(extra, dec, PROMPTS[0], 8, args.threads[0])
    rates: dict[tuple[str, int], list[float]] = {}
    per_step: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for i, (name, extra, dec) in enumerate(cases[r % len(cases):] + cases[:r % len(cases)]):
                label = name if extra is None else f"{name} {dec}"
                if extra is None:
                    tps = run_llama(models[name], args.tokens, threads)
                else:
                    stats = run_chatapp(extra, dec, PROMPTS[(r + i) % len(PROMPTS)], args.tokens, threads)
                    tps = stats["decode_tokens_per_s"]
                    per_step.setdefault((label, threads), []).append(stats["n_generated"] / max(stats["steps"], 1))
                rates.setdefault((label, threads), []).append(tps)
                print(f"round {r + 1} threads {threads} {label}: {tps:.1f} tok/s", file=sys.stderr)
    table = {}
    for (label, threads), v in rates.items():
        row = {"tokens_per_s": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]}
        if (label, threads) in per_step:
            row["tokens_per_step"] = round(statistics.mean(per_step[(label, threads)]), 2)
        table.setdefault(f"{threads} threads", {})[label] = row
    for threads, rows in table.items():
        for peer in ("llama.cpp Q8_0", "llama.cpp Q4_1 (shipped)"):
            if peer in rows:
                for label, row in rows.items():
                    row[f"vs {peer}"] = round(row["tokens_per_s"] / rows[peer]["tokens_per_s"], 2)
    for threads, rows in table.items():
        print(f"\n{threads}:", file=sys.stderr)
        for label, row in rows.items():
            print(f"  {label:34s} {row['tokens_per_s']:7.1f} tok/s  "
                  + "  ".join(f"{k} {v}" for k, v in row.items() if k.startswith("vs ")), file=sys.stderr)
    record("cpu_peers", {"tokens": args.tokens, "rounds": args.rounds, "load_before": [round(x, 2) for x in load_before],
                         "llama_cpp": f"llama-cpp-python {LLAMA_CPP_PYTHON} (vendored llama.cpp, CPU backend)"
                         if models else "not built", "results": table}, args, args.save)


if __name__ == "__main__":
    main()
