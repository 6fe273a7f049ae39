"""Greedy token ids of the embedded model on the chat prompts of bench/data/chat_prompts.txt,
for each decoding: a fingerprint of the engine's behaviour to compare before and after a change.

    .venv/bin/python bench/greedy_outputs.py --out before.json
    .venv/bin/python bench/greedy_outputs.py --out after.json --against before.json   # exit 1 on a difference
    .venv/bin/python bench/greedy_outputs.py --decodings plain,medusa --quantize fp8 --out fp8.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "bench" / "data" / "chat_prompts.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decodings", default="plain,medusa,dmc")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize", choices=["fp8"], help="weights quantized on load")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--against", type=Path, help="an earlier output: report prompts whose tokens differ")
    ap.add_argument("--save", action="store_true", help="with --against: record the comparison in bench/results/")
    args = ap.parse_args()

    from engine.events import LoadModel, SamplingParams
    from engine.session import Session

    prompts = PROMPTS.read_text().splitlines()[:args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    out: dict[str, list[list[int]]] = {}
    for decoding in args.decodings.split(","):
        session = Session.load(LoadModel(device=args.device, context=2048, decoding=decoding, quantize=args.quantize))
        out[decoding] = []
        for prompt in prompts:
            *_, done = session.generate([{"role": "user", "content": prompt}], params)
            out[decoding].append(done.stats.token_ids)
        print(f"{decoding}: {sum(map(len, out[decoding]))} tokens", file=sys.stderr)
        session.close()
    args.out.write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "prompts": prompts, "ids": out}) + "\n")
    if args.against is None:
        return 0
    before = json.loads(args.against.read_text())["ids"]
    bad, summary = 0, {}
    for decoding, rows in out.items():
        same = sum(a == b for a, b in zip(rows, before.get(decoding, [])))
        print(f"{decoding}: {same}/{len(rows)} identical to {args.against}")
        summary[decoding] = {"identical": same, "prompts": len(rows), "tokens": sum(map(len, rows))}
        bad += len(rows) - same
    if args.save:
        sys.path.insert(0, str(ROOT / "bench"))
        from common import record

        record("greedy_outputs", {"against": str(args.against), "max_new_tokens": args.max_new_tokens,
                                  "quantize": args.quantize, "decodings": summary}, save=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
