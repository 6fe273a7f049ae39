"""CPU decode benchmark: our engine against transformers' `generate` on the embedded model.

Same process, same prompts, greedy, the same number of new tokens (EOS ignored), runs
interleaved so that machine drift hits both. Prints one JSON line per case and a summary
line; with --save, appends the summary to bench/results/cpu_decode.jsonl.

    .venv/bin/python bench/cpu_decode.py --save            # full run (~2 min on 2 cores)
    .venv/bin/python bench/cpu_decode.py --smoke           # tiny run, what CI runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, record  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Explain in a few sentences how a bicycle stays upright.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip.",
]


def _hf_decode_rate(model, ids: torch.Tensor, n: int) -> float:
    """Marginal decode tokens/s of transformers' greedy generate: (n - 1) tokens over the
    time difference between generating n tokens and generating 1 (prefill + first token)."""

    def timed(k: int) -> float:
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                             do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + k
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="2 prompts, 8 tokens, 1 repeat")
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    prompts = PROMPTS[:2] if args.smoke else PROMPTS
    n = 8 if args.smoke else args.new_tokens
    repeats = 1 if args.smoke else args.repeats

    from transformers import LlamaForCausalLM

    from engine.events import LoadModel, SamplingParams
    from engine.session import Session

    session = Session.load(LoadModel(device="cpu"))
    ref = LlamaForCausalLM.from_pretrained(str(session.path), dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    warm = [{"role": "user", "content": "Hello"}]  # first calls pay one-off costs (allocations, thread pools)
    list(session.generate(warm, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    with torch.inference_mode():
        _hf_decode_rate(ref, torch.tensor([session.encode_chat(warm)]), 4)
    ours_rates, hf_rates = [], []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        ids = torch.tensor([session.encode_chat(messages)])
        for _ in range(repeats):
            session.reset()  # no prefix reuse between repeats
            stats = list(session.generate(messages, params))[-1].stats
            with torch.inference_mode():
                hf = _hf_decode_rate(ref, ids, n)
            ours_rates.append(stats.decode_tokens_per_s)
            hf_rates.append(hf)
            print(json.dumps({"prompt": prompt[:40], "new_tokens": n, "ours_tok_s": round(stats.decode_tokens_per_s, 2),
                              "transformers_tok_s": round(hf, 2)}), flush=True)
    ours, hf = statistics.median(ours_rates), statistics.median(hf_rates)
    record("cpu_decode", {
        "model": session.name, "dtype": "float32", "new_tokens": n, "prompts": len(prompts), "repeats": repeats,
        "ours_decode_tok_s_median": round(ours, 2), "transformers_decode_tok_s_median": round(hf, 2),
        "ratio": round(ours / hf, 2)}, save=args.save)


if __name__ == "__main__":
    main()
