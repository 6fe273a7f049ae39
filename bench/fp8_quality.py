"""FP8 on load (``--quantize fp8``): what it costs in perplexity and in calibration time.

The embedded model (or ``--model``) on held-out text: its high-precision weights, FP8 rounded to
nearest, and FP8 with GPTQ calibration at each budget (``SAMPLESxLENGTH`` sampled tokens),
calibrated afresh here (not read from the cache) and timed, each with the lm_head calibrated
with the rest (``--head``: int8 or FP8), rounded to nearest in int8, and in bf16. The held-out text is the documentation of Python's
standard library as installed (the docstrings of a fixed list of modules): real English text,
and not what calibration sees (the model's own samples).

    .venv/bin/python bench/fp8_quality.py --save                       # ~15 min on 2 cores
    .venv/bin/python bench/fp8_quality.py --budgets 16x128 --tokens 2000  # quicker
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, record  # noqa: E402

MODULES = ("argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "threading", "textwrap",
           "logging", "json", "csv", "datetime", "unittest", "heapq", "bisect", "contextlib", "dataclasses",
           "decimal", "fractions", "statistics", "string", "shutil", "tempfile", "zipfile", "tarfile", "socket",
           "selectors", "asyncio", "email", "http.client", "urllib.request", "xml.dom.minidom", "sqlite3", "typing")


def held_out_text() -> str:
    """The docstrings of MODULES and of their public classes and functions, in a fixed order."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="default: the embedded model")
    ap.add_argument("--budgets", nargs="+", default=["64x256", "32x128", "16x128", "16x64"],
                    help="calibration budgets, SAMPLESxLENGTH")
    ap.add_argument("--tokens", type=int, default=12000, help="held-out tokens scored")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--head", choices=("int8", "fp8"), default="int8",
                    help="the lm_head format calibrated with the block linears")
    ap.add_argument("--seed", type=int, nargs="+", default=None,
                    help="calibration sampling seeds, each calibrated in turn (default: the shipped one)")
    ap.add_argument("--damp", type=float, default=None, help="GPTQ damping (default: the shipped one)")
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)

    from engine.config import load_config
    from engine.formats.tensor_source import TensorSource
    from engine.hub.resolve import resolve
    from engine.model import gptq, weights
    from engine.perplexity import perplexity
    from engine.tokenizer import ChatTokenizer

    name, path = resolve(args.model)
    cfg = load_config(path)
    weights.prepare_cpu_kernel("cpu", None)
    ids = ChatTokenizer(path, cfg).encode(held_out_text())[:args.tokens]

    def ppl(model) -> float:
        return perplexity(model, ids, args.window, args.window // 2)["perplexity"]

    cases = {}
    base = weights.from_source(cfg, TensorSource(path), "cpu")
    cases["high precision"] = {"perplexity": ppl(base)}
    del base
    rtn = weights.from_source(cfg, TensorSource(path), "cpu", None, None, gptq.RoundToNearest("bf16"))
    cases["fp8 round to nearest, bf16 lm_head"] = {"perplexity": ppl(rtn)}
    del rtn
    if args.damp is not None:
        gptq.DAMP = args.damp
    seeds = args.seed or [gptq.SEED]
    with tempfile.TemporaryDirectory() as tmp:
        for budget, seed in ((b, s) for b in args.budgets for s in seeds):
            gptq.SEED = seed
            samples, length = (int(v) for v in budget.lower().split("x"))
            src = TensorSource(path)
            method = gptq.Fp8OnLoad(cfg, src, samples=samples, length=length, head_format=args.head)
            method.cached, method.path = None, Path(tmp) / f"{budget}-{seed}.safetensors"  # calibrate afresh
            model = weights.from_source(cfg, src, "cpu", None, None, method)
            t0 = time.perf_counter()
            method.after_loading(model)
            seconds = time.perf_counter() - t0
            cases[f"fp8 gptq {budget} seed {seed}, {args.head} lm_head (calibrated)"] = {"perplexity": ppl(model), "calibration_s": round(seconds, 1),
                                                       "calibration_tokens": samples * length}
            # the same block linears with the lm_head rounded to nearest in int8, and in bf16
            head = model.embed if cfg.tie_word_embeddings else \
                src.get_shaped("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
            for fmt in ("int8", "bf16"):
                model.lm_head = gptq.RoundToNearest(fmt).head(head)
                cases[f"fp8 gptq {budget} seed {seed}, {fmt} lm_head"] = {"perplexity": ppl(model)}
            del model
    ref = cases["high precision"]["perplexity"]
    for c in cases.values():
        c["perplexity"] = round(c["perplexity"], 4)
        c["vs_high_precision"] = round(c["perplexity"] / ref - 1, 4)
        print(c, file=sys.stderr)
    record("fp8_quality", {"model": name, "held_out_tokens": len(ids), "window": args.window, "damp": gptq.DAMP,
                           "threads": torch.get_num_threads(), "cases": cases}, args, args.save)


if __name__ == "__main__":
    main()
