"""Plain vs Medusa decoding.

Embedded model (any device): the ordinary chat prompts of bench/data/chat_prompts.txt, greedy,
each prompt decoded plainly and then with Medusa (the shipped heads, the tree chosen for this
device), one after the other so that both see the same machine state. Records decode tokens/s
of each, mean tokens per Medusa step, the speed-up, and whether the texts are identical.

Llama-3.1-8B shape (CUDA): random weights, so acceptance cannot be measured there; the measured
verify-step time per tree size is combined with an acceptance profile (the embedded heads' one,
or the model card's 2.07 tokens per step on its 63-node tree) to give the expected speed-up over
our own plain decoding, step times measured in the same run.

    .venv/bin/python bench/medusa_decode.py --save              # embedded model
    .venv/bin/python bench/medusa_decode.py --shape 8b --save   # on a CUDA GPU
    .venv/bin/python bench/medusa_decode.py --smoke             # a quick check of both paths
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import parse_args, record  # noqa: E402

PROMPTS = ROOT / "bench" / "data" / "chat_prompts.txt"


def embedded(args) -> dict:
    from engine.decoding.plain import PlainDecoder
    from engine.events import LoadModel, SamplingParams
    from engine.session import Session

    medusa = Session.load(LoadModel(None, args.device, 2048, decoding="medusa", medusa_choices=args.medusa_choices),
                          lambda m: print(m, file=sys.stderr))
    plain = Session(medusa.name, medusa.path, medusa.model, medusa.tokenizer, PlainDecoder(medusa.model, 2048))
    prompts = PROMPTS.read_text().splitlines()[:args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    rows = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        runs = {}
        for name, s in (("plain", plain), ("medusa", medusa)):
            s.reset()  # no prefix reuse between the two
            runs[name] = list(s.generate(messages, params))[-1].stats
        p, m = runs["plain"], runs["medusa"]

        def decode(st):  # tokens after the first step, and the time they took
            n = st.n_generated - (st.accepted_per_step[0] if st.accepted_per_step else 0)
            return n, (n / st.decode_tokens_per_s if st.decode_tokens_per_s else 0.0)

        rows.append({"prompt": prompt, "tokens": m.n_generated, "steps": m.steps,
                     "plain_tok_s": round(p.decode_tokens_per_s, 2), "medusa_tok_s": round(m.decode_tokens_per_s, 2),
                     "identical": p.token_ids == m.token_ids, "_plain": decode(p), "_medusa": decode(m)})
        print({k: v for k, v in rows[-1].items() if not k.startswith("_")}, file=sys.stderr)
    tokens = sum(r["tokens"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    rate = {k: sum(r[k][0] for r in rows) / max(sum(r[k][1] for r in rows), 1e-9) for k in ("_plain", "_medusa")}
    for r in rows:
        del r["_plain"], r["_medusa"]
    plan = medusa.decoder.plan
    nodes = plan.tree.num_nodes if plan.tree is not None else 1
    return {"model": medusa.name, "tree": plan.choices, "tree_nodes": nodes, "prompts": len(rows),
            "max_new_tokens": args.max_new_tokens, "tokens": tokens, "mean_tokens_per_step": round(tokens / steps, 3),
            "expected_tokens_per_step": plan.expected_tokens_per_step,
            "plain_tok_s": round(rate["_plain"], 2), "medusa_tok_s": round(rate["_medusa"], 2),
            "speedup": round(rate["_medusa"] / rate["_plain"], 3) if rate["_plain"] else 0.0,
            "identical": sum(r["identical"] for r in rows), "rows": rows}


def shape_8b(args) -> dict:
    """Verify-step time per tree size at the Llama-3.1-8B shape (random weights) and the speed-up
    it gives with the embedded heads' acceptance profile and with the card's figure."""
    from decode_e2e import LLAMA31_8B, TINY

    from engine.config import config_from_dict
    from engine.decoding.medusa.heads import MedusaHeads, Profile
    from engine.decoding.medusa.plan import TREE_SIZES, medusa_step
    from engine.decoding.speculative.step_costs import measure_step_ms
    from engine.formats.random_weights import RandomSource
    from engine.hub.layout import SHIPPED_MEDUSA
    from engine.model.gptq import RoundToNearest
    from engine.model.linear import Linear
    from engine.model.weights import from_source

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = config_from_dict({"model_type": "llama", **(TINY if args.smoke else LLAMA31_8B)})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = from_source(cfg, RandomSource(device), device, dtype,
                        quantize=RoundToNearest() if args.quantize == "fp8" else None)
    h = cfg.hidden_size
    heads = MedusaHeads([[Linear(torch.randn(h, h, device=device, dtype=dtype) * 0.02,
                                 torch.zeros(h, device=device, dtype=dtype))] for _ in range(3)], None)
    profile = Profile.read(SHIPPED_MEDUSA / "SmolLM2-135M-Instruct.json")
    sizes = [n for n in TREE_SIZES if 2 <= n <= (8 if args.smoke else 64)]
    costs = measure_step_ms(model, sizes, medusa_step(model, heads, profile), heads.num_heads + 1, context=args.context)
    rows = []
    for n in sizes:
        e = profile.expected_tokens(profile.tree_paths(n, 3))
        rows.append({"nodes": n, "step_ms": round(costs[n], 3), "expected_tokens_per_step": round(e, 3),
                     "speedup": round(e * costs[0] / costs[n], 3)})
    best = max(rows, key=lambda r: r["speedup"])
    return {"shape": "tiny" if args.smoke else "llama-3.1-8b", "weights": args.quantize or str(dtype)[6:],
            "context": args.context, "plain_step_ms": round(costs[0], 3), "rows": rows, "best": best,
            "card_tree_speedup_at_2.07": round(2.07 * costs[0] / costs[max(sizes)], 3),
            "note": "plain and verify steps without CUDA graphs; step times measured, acceptance from the profile"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["embedded", "8b"], default="embedded")
    ap.add_argument("--smoke", action="store_true", help="a few short prompts; tiny shape for --shape 8b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--medusa-choices", default=None)
    ap.add_argument("--quantize", choices=["fp8"], default=None, help="--shape 8b: FP8 weights")
    ap.add_argument("--context", type=int, default=1024, help="--shape 8b: tokens already in the cache")
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    if args.shape == "8b":
        if not torch.cuda.is_available() and not args.smoke:
            sys.exit("medusa_decode --shape 8b: needs a CUDA GPU (use --smoke to check the script on a CPU)")
        if args.smoke:
            args.context = 64
        record("medusa_decode_8b", shape_8b(args), save=args.save)
        return
    if args.smoke:
        args.prompts, args.max_new_tokens = 2, 24
    record("medusa_decode", embedded(args), save=args.save)


if __name__ == "__main__":
    main()
