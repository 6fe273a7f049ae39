"""Decode speed on a busy CPU: chatapp with the machine to itself and with other CPU-bound
processes competing for its cores, plain and Medusa, with the default thread count (which
follows the load, engine/cpu_threads.py) and with it fixed (CHATAPP_THREADS). Each run is a
fresh ``chatapp run`` process; the competing processes are busy loops started before it.

    .venv/bin/python bench/cpu_busy.py --save
    .venv/bin/python bench/cpu_busy.py --quantize fp8 --competing 0 1 --save
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator keeps food cold."]
HOG = "while True: pass"


def run(threads: str, decoding: str, quantize: str | None, prompt: str, tokens: int) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads != "default":
        env["CHATAPP_THREADS"] = threads
    else:
        env.pop("CHATAPP_THREADS", None)
    cmd = [sys.executable, "-m", "chatapp", "run", "--decoding", decoding, "--prompt", prompt,
           "--max-new-tokens", str(tokens), "--ignore-eos", "--json"] + (["--quantize", quantize] if quantize else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if out.returncode:
        raise SystemExit(f"chatapp run failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)["decode_tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", choices=["fp8", "bf16"])
    ap.add_argument("--decodings", nargs="+", default=["plain", "medusa"])
    ap.add_argument("--threads", nargs="+", default=["default", "1", "2"], help="default, or a fixed count")
    ap.add_argument("--competing", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    for dec in args.decodings:  # warm-up: kernel build, calibration, the Medusa plan's step costs
        run("default", dec, args.quantize, PROMPTS[0], 8)
    results: dict[str, dict] = {}
    for competing in args.competing:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(competing)]
        try:
            for dec in args.decodings:
                for threads in args.threads:
                    rates = [run(threads, dec, args.quantize, PROMPTS[i % len(PROMPTS)], args.tokens)
                             for i in range(args.repeats)]
                    key = f"{dec}, threads {threads}"
                    results.setdefault(key, {})[f"competing {competing}"] = round(statistics.median(rates), 1)
                    print(f"competing {competing} {key}: {rates}", file=sys.stderr)
        finally:
            for h in hogs:
                h.kill()
    for row in results.values():
        quiet = row.get("competing 0")
        if quiet:
            for k in [k for k in row if k != "competing 0"]:
                row[f"{k} / quiet"] = round(row[k] / quiet, 2)
    for key, row in results.items():
        print(f"{key:24s} {row}", file=sys.stderr)
    record("cpu_busy", {"quantize": args.quantize, "tokens": args.tokens, "cores": os.cpu_count(),
                        "results": results}, args, args.save)


if __name__ == "__main__":
    main()
