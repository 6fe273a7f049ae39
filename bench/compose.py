"""Decodings that compose, on the embedded model (its shipped Medusa heads and DMC retrofit):
plain, medusa, dmc and medusa+dmc, each on the weights as stored (fp32 on a CPU) and with
``--quantize fp8``, on the same chat prompts in one run, interleaved (prompt by prompt, every
set-up in turn), greedy.

Per set-up: decode tokens/s (mean over prompts), tokens per step, KV bytes per token held at the
end of each reply, and whether its greedy output is identical to that of the one-token decoding
of its cache and weights (medusa vs plain, medusa+dmc vs dmc). For the DMC set-ups: the answers
to training/dmc.py's simple questions (how many contain a right word) and the perplexity of the
plain model's replies (prompt + reply prefilled through the DMC cache, the reply scored).

    .venv/bin/python bench/compose.py --save          # 24 prompts, 64 tokens each
    .venv/bin/python bench/compose.py --smoke         # 2 prompts, 4 tokens, no fp8
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import parse_args, record  # noqa: E402

from engine.events import LoadModel, SamplingParams  # noqa: E402
from engine.session import Session  # noqa: E402
from training.dmc import SIMPLE_ANSWER_TOKENS, SIMPLE_QUESTIONS  # noqa: E402

DECODINGS = ("plain", "medusa", "dmc", "medusa+dmc")
BASE_OF = {"medusa": "plain", "medusa+dmc": "dmc"}  # the one-token decoding a proposer must match


def reply_nll(session: Session, ids: list[int], prompt_len: int) -> tuple[float, int]:
    """Summed NLL of ids[prompt_len:] given what precedes them, through the DMC cache."""
    dmc = session.decoder.dmc if hasattr(session.decoder, "dmc") else session.decoder.base.dmc
    dmc.reset()
    session.decoder.cached_ids = []
    with torch.inference_mode():
        logits = dmc.prefill(torch.tensor([ids], device=session.model.device), all_logits=True)[0]
    dmc.reset()
    target = torch.tensor(ids[prompt_len:], device=logits.device)
    return float(F.cross_entropy(logits[prompt_len - 1:-1].float(), target, reduction="sum")), len(target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-fp8", action="store_true", help="only the weights as stored")
    ap.add_argument("--smoke", action="store_true", help="2 prompts, 4 tokens, no fp8: that it runs")
    ap.add_argument("--save", action="store_true", help="append the result to bench/results/compose.jsonl")
    args = parse_args(ap)
    if args.smoke:
        args.prompts, args.max_new_tokens, args.no_fp8 = 2, 4, True
    prompts = (ROOT / "bench" / "data" / "chat_prompts.txt").read_text().splitlines()[:args.prompts]
    setups = [(d, q) for q in ([None] if args.no_fp8 else [None, "fp8"]) for d in DECODINGS]
    sessions = {}
    for d, q in setups:
        sessions[d, q] = Session.load(LoadModel(device="cpu", decoding=d, quantize=q),
                                      lambda msg: print(f"[{d}{',' + q if q else ''}] {msg}", file=sys.stderr))
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    runs = {k: [] for k in setups}
    for p in prompts:  # interleaved: every set-up answers this prompt before the next one
        chat = [{"role": "user", "content": p}]
        for k, s in sessions.items():
            s.reset()
            runs[k].append(list(s.generate(chat, params))[-1].stats)
    out = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "setups": {}}
    for (d, q), stats in runs.items():
        tokens = sum(st.n_generated for st in stats)
        steps = sum(st.steps for st in stats)
        held = sum(st.n_prompt_tokens + st.n_generated for st in stats)
        row = {"decode_tokens_per_s": round(sum(st.decode_tokens_per_s for st in stats) / len(stats), 2),
               "tokens_per_step": round(tokens / max(steps, 1), 3),
               "kv_bytes_per_token": round(sum(st.kv_cache_bytes for st in stats) / held, 1),
               "kv_compression": round(sum(st.kv_cache_bytes_dense for st in stats) /
                                       max(1, sum(st.kv_cache_bytes for st in stats)), 3),
               "tokens": tokens}
        if d in BASE_OF:
            row["tree"] = sessions[d, q].decoder.setup  # the plan's choice, e.g. "auto (5 nodes)"
            base = runs[BASE_OF[d], q]
            row["identical_to_" + BASE_OF[d]] = sum(a.token_ids == b.token_ids for a, b in zip(stats, base))
            row["speedup_vs_" + BASE_OF[d]] = round(row["decode_tokens_per_s"] / (
                sum(st.decode_tokens_per_s for st in base) / len(base)), 3)
        out["setups"][d + (f",{q}" if q else "")] = row
    # DMC quality: the simple questions, and the perplexity of the plain model's replies
    plain_replies = [(s.n_prompt_tokens, sessions["plain", None].tokenizer.encode_chat(
        [{"role": "user", "content": p}]) + s.token_ids) for p, s in zip(prompts, runs["plain", None])]
    for q in ([None] if args.no_fp8 else [None, "fp8"]):
        s = sessions["dmc", q]
        right, questions = 0, SIMPLE_QUESTIONS[:len(prompts) if args.smoke else None]
        for question, words in questions:
            s.reset()
            text = list(s.generate([{"role": "user", "content": question}],
                                   SamplingParams(max_new_tokens=SIMPLE_ANSWER_TOKENS)))[-1].stats.text
            right += any(w.lower() in text.lower() for w in words)
        nll = n = 0
        for prompt_len, ids in plain_replies:
            if len(ids) > prompt_len:
                a, m = reply_nll(s, ids, prompt_len)
                nll, n = nll + a, n + m
        key = "dmc" + (f",{q}" if q else "")
        out["setups"][key].update({"simple_questions_right": right, "simple_questions": len(questions),
                                   "reply_perplexity": round(math.exp(nll / max(n, 1)), 4), "scored_tokens": n})
    record("compose", out, args, save=args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
