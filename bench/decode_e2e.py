"""End-to-end batch-1 decode at the exact Llama-3.1-8B shapes with random weights: bf16 and FP8
(our kernels, --quantize fp8 scheme) tokens/s, each step replayed as one CUDA graph, against the
roofline: bytes read per token / copy bandwidth measured in the same run.

    .venv/bin/python bench/decode_e2e.py --save    # on a CUDA GPU (results: bench/results/decode_e2e.jsonl)
    .venv/bin/python bench/decode_e2e.py --smoke   # anywhere: a tiny model, no graphs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, record  # noqa: E402

from engine.formats.random_weights import RandomSource  # noqa: E402

LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(LLAMA31_8B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def copy_bandwidth(device) -> float:
    """Bytes moved per second by a large device copy (read + write)."""
    n = 1 << 28 if device.type == "cuda" else 1 << 22
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bytes_per_token(model, context: int) -> int:
    """Weights read per decoded token (all but the embedding table, of which one row is read)
    plus the KV cache read by attention at this context."""
    cfg = model.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * model.dtype.itemsize
    return model.weight_bytes() - model.embed.numel() * model.embed.element_size() + kv


def run(cfg_dict, quantize, device, context, steps, graphs) -> dict:
    from engine.model.weights import from_source
    from engine.config import config_from_dict
    from engine.model.cuda_graph import capture
    from engine.model.gptq import RoundToNearest

    cfg = config_from_dict({"model_type": "llama", **cfg_dict})
    torch.manual_seed(0)
    model = from_source(cfg, RandomSource(device), device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                        quantize=RoundToNearest() if quantize == "fp8" else None)
    cache = model.new_cache(context)
    prompt = 16
    with torch.inference_mode():
        model.forward(torch.randint(0, cfg.vocab_size, (1, prompt), device=device), cache, 0)
        tok = torch.zeros((1, 1), dtype=torch.long, device=device)
        pos = torch.tensor(prompt, device=device)
        step = lambda: model.decode_step(tok, pos, cache).argmax(-1, keepdim=True)  # noqa: E731
        if graphs:
            graph, out = capture(step, warmup=3)

            def replay():
                graph.replay()
                tok.copy_(out)
                pos.add_(1)
        else:
            def replay():
                tok.copy_(step())
                pos.add_(1)
        for _ in range(3):
            replay()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            replay()
        sync(device)
        dt = (time.perf_counter() - t) / steps
    nbytes = bytes_per_token(model, int(pos))
    return {"weights": quantize or str(model.dtype).removeprefix("torch."), "tok_s": round(1 / dt, 1), "ms_per_token": round(dt * 1000, 3),
            "bytes_per_token": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model, no CUDA graphs; runs on a CPU")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024, help="KV cache length (attention runs over all of it)")
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("decode_e2e: needs a CUDA GPU (use --smoke to check the script on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    cfg, steps, context = (TINY, 4, 64) if args.smoke else (LLAMA31_8B, args.steps, args.context)
    bw = copy_bandwidth(device)
    rows = []
    for quantize in (None, "fp8"):
        row = run(cfg, quantize, device, context, steps, graphs=cuda)
        row["roofline_tok_s"] = round(bw / row["bytes_per_token"], 1)
        row["fraction_of_roofline"] = round(row["tok_s"] / row["roofline_tok_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    record("decode_e2e", {"shape": "tiny" if args.smoke else "Llama-3.1-8B", "context": context, "steps": steps,
                          "copy_bandwidth_gbs": round(bw / 1e9, 1), "cuda_graphs": cuda, "result": rows},
           save=args.save)


if __name__ == "__main__":
    main()
