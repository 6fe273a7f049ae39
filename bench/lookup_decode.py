"""Plain vs lookup vs Medusa vs Medusa + lookup decoding on the embedded model, greedy.

Two sets: (a) the ordinary chat prompts of bench/data/chat_prompts.txt, one turn each, and (b)
the multi-turn tasks of bench/data/revisit_tasks.json, written for this benchmark (not used in
any training), in which the reply revisits text of the conversation: fixing pasted code,
rewriting a paragraph, summarising then refining, answering from a pasted text, continuing a
list. Each prompt or task is run by every decoding in turn (interleaved, so that all see the same
machine state); a task's later turns include the reply the decoding gave before. Records per set
and decoding: tokens per step, decode tokens/s, the speed-up over plain and the number of
replies identical to plain's; per chat prompt the lookup / plain ratio (the issue's never-below
figure) of the median decode time over ``--rounds`` interleaved runs (a reply of 128 tokens takes
about 2 s, short enough for a busy moment of the machine to swing one run by 30 %).

    CHATAPP_THREADS=2 .venv/bin/python bench/lookup_decode.py --save
    .venv/bin/python bench/lookup_decode.py --prompts 3 --tasks 2 --max-new-tokens 48   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import parse_args, record  # noqa: E402

DECODINGS = ("plain", "lookup", "medusa", "medusa+lookup")


def reply(session, messages, params):
    session.reset()  # no prefix reuse between decodings
    return list(session.generate(messages, params))[-1].stats


def decode_time(st) -> tuple[int, float]:
    """Tokens after the first step, and the time they took."""
    n = st.n_generated - (st.accepted_per_step[0] if st.accepted_per_step else 0)
    return n, (n / st.decode_tokens_per_s if st.decode_tokens_per_s else 0.0)


def summary(runs: dict[str, list]) -> dict:
    out = {}
    for d, stats in runs.items():
        n = sum(decode_time(s)[0] for s in stats)
        t = sum(decode_time(s)[1] for s in stats)
        out[d] = {"tok_s": round(n / t, 2) if t else 0.0,
                  "tokens_per_step": round(sum(s.n_generated for s in stats) / max(sum(s.steps for s in stats), 1), 3),
                  "identical_to_plain": sum(a.token_ids == b.token_ids for a, b in zip(stats, runs["plain"])),
                  "replies": len(stats)}
    for d in out:
        out[d]["speedup"] = round(out[d]["tok_s"] / out["plain"]["tok_s"], 3) if out["plain"]["tok_s"] else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each chat prompt by each decoding")
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)

    import torch

    from engine.events import LoadModel, SamplingParams
    from engine.session import Session

    sessions = {d: Session.load(LoadModel(device="cpu", decoding=d), lambda m: print(m, file=sys.stderr))
                for d in DECODINGS}
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    chat = {d: [] for d in DECODINGS}
    per_prompt = []
    for prompt in (ROOT / "bench" / "data" / "chat_prompts.txt").read_text().splitlines()[:args.prompts]:
        rounds = [{d: reply(s, [{"role": "user", "content": prompt}], params) for d, s in sessions.items()}
                  for _ in range(args.rounds)]
        for d in DECODINGS:
            chat[d] += [got[d] for got in rounds]
        rate = {d: statistics.median(got[d].decode_tokens_per_s for got in rounds) for d in DECODINGS}
        per_prompt.append(round(rate["lookup"] / rate["plain"], 3))
        print(prompt[:50], {d: round(r, 1) for d, r in rate.items()}, file=sys.stderr)
    revisit = {d: [] for d in DECODINGS}
    tasks = json.loads((ROOT / "bench" / "data" / "revisit_tasks.json").read_text())[:args.tasks]
    for task in tasks:
        messages = {d: [] for d in DECODINGS}
        for turn in task["turns"]:
            for d, s in sessions.items():
                messages[d].append({"role": "user", "content": turn})
                st = reply(s, messages[d], params)
                messages[d].append({"role": "assistant", "content": st.text})
                revisit[d].append(st)
            print(task["task"], {d: round(revisit[d][-1].decode_tokens_per_s, 1) for d in DECODINGS}, file=sys.stderr)
    result = {"model": sessions["plain"].name, "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
              "rounds": args.rounds,
              "medusa_tree": sessions["medusa"].decoder.setup,
              "chat_prompts": summary(chat), "lookup_vs_plain_per_chat_prompt": per_prompt,
              "lookup_vs_plain_min": min(per_prompt) if per_prompt else None,
              "revisit_tasks": summary(revisit), "revisit_replies": len(revisit["plain"])}
    print(json.dumps(result, indent=1), file=sys.stderr)
    record("lookup_decode", result, args, args.save)


if __name__ == "__main__":
    main()
