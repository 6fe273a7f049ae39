"""DMC vs a plain KV cache: KV memory and decode tokens/s at growing context and batch.

For each (context, batch): a random prompt of ``context`` tokens per batch row is prefilled, then
``--steps`` tokens are decoded, once with the plain cache (LlamaModel's dense cache) and once with
the DMC cache (engine/decoding/dmc.py). Records the KV bytes each holds after the prompt (and
per token), the compression, the decode tokens/s (batch x steps / time) of each and the speed-up.

Decisions: with ``--cr X`` (the default at the Llama-2-7B shape, whose weights are random), the
decision neurons are synthetic: every layer's key heads' dimension D-1 is overwritten so that
every X-th token appends and the others merge, so each head holds about 1/X of the slots; the
importance weights still come from the queries. Without ``--cr``, the embedded model decides with
its own decision neurons, from the retrofit delta chatapp ships (assets/dmc/).

    .venv/bin/python bench/dmc_decode.py --save                    # the embedded model (CPU or GPU)
    .venv/bin/python bench/dmc_decode.py --shape 7b --save         # Llama-2-7B shape, CUDA, CR 8
    .venv/bin/python bench/dmc_decode.py --smoke                   # anywhere: a tiny model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import parse_args, record  # noqa: E402
from decode_e2e import sync  # noqa: E402

from engine.formats.random_weights import RandomSource  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False)
TINY = dict(LLAMA2_7B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


class ForcedDecisions:
    """A layer's fused q/k/v projection whose key heads' dim D-1 says: append every ``cr``-th token
    (positions p with floor(p / cr) > floor((p - 1) / cr)), merge the others. ``at[0]``: the
    position of the first token of the next call (the benchmark sets it)."""

    def __init__(self, lin, cfg, cr: float, at: list, init_val: float):
        self.lin, self.splits, self.bias, self.at = lin, lin.splits, lin.bias, at
        d = cfg.head_dim
        self.cols = torch.tensor([cfg.q_size + j * d + d - 1 for j in range(cfg.num_kv_heads)])
        self.cr, self.init_val = cr, init_val

    def __call__(self, x, residual=None):
        out = self.lin(x, residual)
        t = out.shape[-2]
        p = torch.arange(self.at[0], self.at[0] + t, device=out.device, dtype=torch.float64)
        append = torch.floor(p / self.cr) > torch.floor((p - 1) / self.cr)
        value = torch.where(append, self.init_val - 4.0, self.init_val + 4.0).to(out.dtype)
        out[..., :, self.cols.to(out.device)] = value[:, None]
        return out


def load(args, device):
    from engine.config import config_from_dict
    from engine.model.weights import from_dir, from_source

    if args.shape == "embedded":
        from engine.events import LoadModel
        from engine.hub.layout import dmc_delta
        from engine.hub.resolve import resolve
        from engine.load import load as load_model

        if args.cr is None:  # the model's own decisions: the shipped retrofit, as the engine loads it
            # (its decoder is not used: the runs below make their own caches)
            loaded = load_model(LoadModel(device=str(device), decoding="dmc", context=16))
            dmc = loaded.decoder.dmc
            return loaded.model, loaded.name, str(dmc_delta(loaded.name, loaded.path)), {"init_val": dmc.init_val,
                                                                                       "window": dmc.window}
        name, path = resolve(None, lambda m: print(m, file=sys.stderr))
        return from_dir(path, device), name, "base weights, synthetic decisions", {}
    cfg = config_from_dict({"model_type": "llama", **(TINY if args.shape == "tiny" else LLAMA2_7B)})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = from_source(cfg, RandomSource(device), device, dtype)
    return model, "Llama-2-7B shape" if args.shape == "7b" else "tiny", "random weights, synthetic decisions", {}


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def measure(model, settings: dict, context: int, batch: int, steps: int, at: list, device) -> dict:
    from engine.decoding.dmc import DMCForward

    cfg = model.cfg
    g = torch.Generator().manual_seed(context * 131 + batch)
    prompt = torch.randint(0, cfg.vocab_size, (batch, context), generator=g).to(device)
    tok = torch.zeros((batch, 1), dtype=torch.long, device=device)
    out = {"context": context, "batch": batch}
    with torch.inference_mode():
        # plain: the dense cache, sized for the prompt and the decoded tokens
        cache = model.new_cache(context + steps + 1, batch)
        model.forward(prompt, cache, 0)
        plain_bytes = cache.nbytes_used()
        model.forward(tok, cache, context)  # warm-up step

        def plain():
            for i in range(steps):
                model.forward(tok, cache, context + 1 + i)

        dt = timed(plain, device)
        out.update(plain_kv_bytes=plain_bytes, plain_tok_s=round(batch * steps / dt, 2))
        cache = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # DMC
        dmc = DMCForward(model, batch, context + steps + 1, **settings)
        at[0] = 0
        dmc.prefill(prompt)
        st = dmc.stats()
        at[0] = dmc.length
        dmc.step(tok)  # warm-up step

        def decode():
            for _ in range(steps):
                at[0] = dmc.length
                dmc.step(tok)

        dt = timed(decode, device)
        out.update(dmc_kv_bytes=st["kv_cache_bytes"], dmc_kv_bytes_allocated=st["kv_cache_bytes_allocated"],
                   kv_compression=round(st["kv_compression"], 3),
                   plain_kv_bytes_per_token=round(plain_bytes / (batch * context)),
                   dmc_kv_bytes_per_token=round(st["kv_cache_bytes"] / (batch * context)),
                   dmc_tok_s=round(batch * steps / dt, 2))
        out["speedup"] = round(out["dmc_tok_s"] / out["plain_tok_s"], 3)
        dmc.free()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["embedded", "7b", "tiny"], default="embedded")
    ap.add_argument("--cr", type=float, default=None,
                    help="synthetic decisions at this compression (default: 8 at the 7B shape; the embedded "
                         "model's own decisions)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="decoded tokens per measurement")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny shapes; runs anywhere")
    ap.add_argument("--save", action="store_true")
    args = parse_args(ap)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.shape = "tiny"
        args.contexts, args.batches, args.steps = args.contexts or [24, 48], args.batches or [1, 2], args.steps or 3
    if args.shape == "7b" and not cuda:
        sys.exit("dmc_decode: the 7B shape needs a CUDA GPU (use --smoke to check the script on a CPU)")
    if args.shape != "embedded" and args.cr is None:
        args.cr = 8.0
    if args.contexts is None:
        args.contexts = [512, 2048, 4096] if cuda else [256, 1024, 2048]
    if args.batches is None:
        args.batches = [1, 8, 16] if cuda else [1, 4]
    args.steps = args.steps or (64 if cuda else 16)
    model, name, source, settings = load(args, device)
    at = [0]
    if args.cr is not None:
        from dataclasses import replace

        from engine.decoding.dmc import INIT_VAL

        init_val = settings.get("init_val", INIT_VAL)
        model.layers = [replace(ly, qkv=ForcedDecisions(ly.qkv, model.cfg, args.cr, at, init_val))
                        for ly in model.layers]
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            try:
                row = measure(model, settings, context, batch, args.steps, at, device)
            except torch.cuda.OutOfMemoryError:
                row = {"context": context, "batch": batch, "error": "out of memory"}
                torch.cuda.empty_cache()
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    record("dmc_decode", {"model": name, "weights": source, "decisions": f"synthetic, CR {args.cr:g}"
                          if args.cr is not None else "the model's own", "dtype": str(model.dtype).removeprefix("torch."),
                          "steps": args.steps, "result": rows}, save=args.save)


if __name__ == "__main__":
    main()
