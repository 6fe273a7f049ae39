"""Train Medusa heads for a base model by self-distillation, as the Medusa paper does when the
original training data is not at hand: the base model answers a broad set of chat prompts
(greedy), and head k learns to predict, from the final-normed hidden state at position t, the
token the base model itself produced at t + k + 2. Greedy Medusa accepts a proposal exactly
when it equals the base model's own greedy choice, so these are the right targets.

The heads are small: an input from the root token (the one the base model chose to come next,
known before the heads run: ``x = h + R e(root)`` with the base model's embedding e) and, for
head k, from the tokens at depths 1..k of the tree path it extends (``+ P_kj e(path_j)``,
Hydra-style; teacher-forced in training, since decoding only goes on along accepted paths), one
ResBlock each (``x + SiLU(W x + b)``; R, P and W zero-initialised so that a new head starts out as
the base model's own next-token predictor) and the base model's lm_head,
restricted to the tokens that make up the replies (``token_ids``: the most frequent ones, up
to a coverage target), which makes the heads' logits several times cheaper than a full
vocabulary product. Proposals outside that set are simply never made.

Outputs, beside each other (``--out``, default assets/medusa/<model>):
- ``<model>.safetensors``: ``{h}.0.linear.weight``, ``{h}.0.linear.bias`` (FasterDecoding's
  layout for heads that share the base lm_head), ``{h}.root.weight``, ``{h}.path.{j}.weight``
  and ``token_ids``;
- ``<model>.json``: what the heads were trained on, and their acceptance profile on held-out
  replies: the frequency with which each path of ranks (r0, r1, ...) is entirely right. The
  engine builds its candidate tree from this profile and the device's measured verify cost.

    python -m training.medusa                # the embedded model, CPU: about 20 minutes
    python -m training.medusa --device cuda --prompts 780 --epochs 6

The held-out profile of training is measured on replies to training prompts of held-out
subjects (192 tokens each), over the dense cache the heads were trained on. ``--profile-over
CACHE`` measures the shipped heads' profile over a cache ("plain": the dense one; "dmc": the DMC cache of the shipped
retrofit, where the heads read the DMC model's hidden states and must match its greedy tokens), on
that model's own greedy replies to chat prompts on subjects in no training prompt (questions and
requests as much as topics: training/prompts.py's ``profile_prompts``), and adds it to
``<model>.json`` under ``profiles``. The engine plans the trees over each cache from the profile
over it (the training profile where there is none):

    python -m training.medusa --profile-over plain    # the embedded model, CPU: about 4 minutes
    python -m training.medusa --profile-over dmc      # about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.decoding.dmc import DMCForward
from engine.decoding.medusa.heads import output_rows
from engine.events import LoadModel
from engine.hub.resolve import resolve
from engine.model.llama import LlamaModel
from engine.model.weights import from_dir
from engine.paths import ASSETS, cache_dir
from engine.session import Session
from engine.tokenizer import ChatTokenizer
from training.prompts import profile_prompts, subjects, training_prompts

MAX_RANK = 10  # ranks per head kept in the acceptance profile
PROFILE_PATHS = 96  # paths kept in the profile (more than any tree the engine builds)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- 1. self-distillation data ---------------------------------------------------------------
def read_replies(path: Path) -> list[dict]:
    """The replies cached in ``path`` so far (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def generate_replies(model: LlamaModel, tok: ChatTokenizer, prompts: list[str], max_new_tokens: int, batch: int,
                     path: Path) -> list[dict]:
    """The base model's greedy replies, decoded by our engine a batch at a time: prompts of the
    same length in tokens go together (no padding, so every row is computed exactly as it would
    be alone), and a row leaves the batch at its EOS. Each batch is appended to ``path`` as it
    is done, and a rerun goes on from there."""
    out = read_replies(path)
    done = {d["prompt"] for d in out}
    t0, made = time.time(), 0
    for group in length_groups(tok, [p for p in prompts if p not in done], batch):
        replies = greedy_batch(model, [ids for _, ids in group], max_new_tokens, tok.eos_ids)
        with path.open("a") as f:
            for (prompt, ids), reply in zip(group, replies):
                out.append({"prompt": prompt, "prompt_ids": ids, "reply_ids": reply})
                f.write(json.dumps(out[-1]) + "\n")
        made += sum(len(r) for r in replies)
        log(f"replies {len(out)}/{len(prompts)} ({made / (time.time() - t0):.0f} tokens/s)")
    return out


def length_groups(tok: ChatTokenizer, prompts: list[str], batch: int) -> list[list[tuple[str, list[int]]]]:
    """(prompt, chat token ids) of prompts of the same length in tokens, up to ``batch`` together
    (decoded as one batch with no padding, each row is computed as it would be alone)."""
    by_len: dict[int, list[tuple[str, list[int]]]] = {}
    for p in prompts:
        ids = tok.encode_chat([{"role": "user", "content": p}])
        by_len.setdefault(len(ids), []).append((p, ids))
    return [g[i:i + batch] for _, g in sorted(by_len.items()) for i in range(0, len(g), batch)]


def greedy_batch(model: LlamaModel, prompts: list[list[int]], max_new_tokens: int, eos_ids) -> list[list[int]]:
    """Greedy replies to prompts of one length, decoded together; each reply keeps its EOS (the
    heads may propose it)."""
    width = len(prompts[0])
    cache = model.new_cache(width + max_new_tokens, batch=len(prompts))
    replies: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # rows of the batch -> reply index
    with torch.inference_mode():
        logits = model.forward(torch.tensor(prompts, device=model.device), cache, 0)[:, -1]
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1).tolist()
            keep = []
            for row, (r, t) in enumerate(zip(live, nxt)):
                replies[r].append(t)
                if t not in eos_ids:
                    keep.append(row)
            if not keep or cache.length >= cache.max_len:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                rows = torch.tensor(keep, device=model.device)
                cache.k, cache.v = cache.k.index_select(1, rows), cache.v.index_select(1, rows)
                live, nxt = [live[i] for i in keep], [nxt[i] for i in keep]
            ids = torch.tensor(nxt, device=model.device)[:, None]
            logits = model.forward(ids, cache, cache.length)[:, -1]
    return replies


def load_or_generate(model_name: str, model: LlamaModel, tok: ChatTokenizer, args) -> list[dict]:
    """Every cached reply to a training prompt, after answering those of the first ``--prompts``
    prompts that have none yet (none with ``--cached-only``)."""
    path = cache_dir() / "training" / f"{model_name}-replies-{args.max_new_tokens}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.cached_only:
        data = read_replies(path)
    else:
        data = generate_replies(model, tok, training_prompts(args.prompts), args.max_new_tokens, args.gen_batch, path)
    wanted = set(training_prompts())
    return [d for d in data if d["prompt"] in wanted]


# ---- 2. hidden states and targets -------------------------------------------------------------
def hidden_states(model: LlamaModel, data: list[dict], num_heads: int, dmc: dict | None = None):
    """Per reply position t (from the last prompt token on): the final-normed hidden state and
    the tokens at t + 2 ... t + 1 + num_heads (-1 past the end). Also the share of positions
    where our engine's greedy choice is the reply's next token (replies from an older cache may have
    been made by another decoder). ``dmc``: DMCForward's settings, to run each prompt + reply
    through a DMC cache (prefilled in parallel: the slots and merges of decoding it token by
    token) rather than the dense one."""
    hs, targets, convo = [], [], []
    agree = total = 0
    longest = max(len(d["prompt_ids"]) + len(d["reply_ids"]) for d in data)
    fwd = DMCForward(model, 1, longest, **dmc) if dmc is not None else None
    cache = model.new_cache(longest) if dmc is None else None
    with torch.inference_mode():
        for n, d in enumerate(data):
            seq = d["prompt_ids"] + d["reply_ids"]
            first = len(d["prompt_ids"]) - 1
            ids = torch.tensor([seq], device=model.device)
            if fwd is not None:
                fwd.reset()
                logits, hidden = fwd.prefill(ids, all_logits=True, with_hidden=True)
                nxt = logits[0, first:-1].argmax(-1).cpu()
            else:
                hidden = model.hidden(ids, cache, 0)
                nxt = model.logits(hidden[0, first:-1]).argmax(-1).cpu()
            agree += int((nxt == torch.tensor(seq[first + 1:])).sum())
            total += len(seq) - 1 - first
            hs.append(hidden[0, first:-1].float().cpu())
            tgt = torch.full((len(seq) - 1 - first, num_heads), -1, dtype=torch.long)
            for t in range(first, len(seq) - 1):
                for k in range(num_heads):
                    if t + k + 2 < len(seq):
                        tgt[t - first, k] = seq[t + k + 2]
            targets.append(tgt)
            convo.append(torch.full((len(seq) - 1 - first,), n))
            if n % 50 == 0:
                log(f"hidden states {n}/{len(data)}")
    if fwd is not None:
        fwd.free()
    return torch.cat(hs), torch.cat(targets), torch.cat(convo), agree / max(total, 1)


def cached_hidden_states(model: LlamaModel, data: list[dict], num_heads: int, path: Path):
    """``hidden_states`` of ``data``, kept in ``path`` (``...-hidden-<replies>-...``). The replies
    cache only grows at its end, so the largest earlier file whose positions match a prefix of
    ``data`` is reused and only the replies after it are run."""
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["x"], saved["y"], saved["convo"], float(saved["agree"])
    prefix = path.name.split("-hidden-")[0] + "-hidden-"
    rest = path.name.split("-hidden-")[1].split("-", 1)[1]
    best, n = None, 0
    for f in path.parent.glob(f"{prefix}*-{rest}"):
        count = f.name[len(prefix):].split("-")[0]
        if count.isdigit() and n < int(count) < len(data):
            best, n = f, int(count)
    parts = []
    if best is not None:
        saved = torch.load(best, weights_only=True)
        if len(saved["x"]) == sum(len(d["reply_ids"]) for d in data[:n]):
            parts.append((saved["x"], saved["y"], saved["convo"], float(saved["agree"])))
            log(f"reusing the hidden states of the first {n} replies ({best.name})")
        else:
            n = 0
    if n < len(data):
        hx, hy, hc, ha = hidden_states(model, data[n:], num_heads)
        parts.append((hx, hy, hc + n, ha))
    x, y, convo = (torch.cat([p[i] for p in parts]) for i in range(3))
    agree = sum(p[3] * len(p[0]) for p in parts) / max(len(x), 1)
    torch.save({"x": x, "y": y, "convo": convo, "agree": torch.tensor(agree)}, path)
    return x, y, convo, agree


def root_tokens(data: list[dict]) -> torch.Tensor:
    """Per position of ``hidden_states``: the root, the reply's token at t + 1."""
    roots = []
    for d in data:
        seq = d["prompt_ids"] + d["reply_ids"]
        roots += seq[len(d["prompt_ids"]):]
    return torch.tensor(roots)


def head_vocabulary(targets: torch.Tensor, vocab: int, coverage: float, multiple: int = 256) -> torch.Tensor:
    """The most frequent target tokens covering ``coverage`` of all targets (rounded up to a
    multiple of ``multiple``), sorted by token id."""
    t = targets[targets >= 0]
    counts = torch.bincount(t, minlength=vocab)
    order = counts.argsort(descending=True)
    cum = counts[order].cumsum(0).double() / t.numel()
    n = int((cum < coverage).sum()) + 1
    n = min(vocab, math.ceil(n / multiple) * multiple)
    return order[:n].sort().values


# ---- 3. the heads -----------------------------------------------------------------------------
class Heads(torch.nn.Module):
    """Head k: ``z = h + R_k e(root) + sum_j P_kj e(path_j)`` (the path's tokens at depths
    1..k, which are the targets of heads 0..k-1: training is teacher-forced, as decoding is
    along an accepted path), then ``z + SiLU(W_k z + b_k)`` and the shared output rows."""

    def __init__(self, num_heads: int, hidden: int, out_weight: torch.Tensor, embed: torch.Tensor, path: bool):
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(num_heads))
        self.roots = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(num_heads))
        self.paths = torch.nn.ModuleList(
            torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(k if path else 0))
            for k in range(num_heads))
        for lin in [*self.linears, *self.roots, *(p for ps in self.paths for p in ps)]:
            torch.nn.init.zeros_(lin.weight)
            if lin.bias is not None:
                torch.nn.init.zeros_(lin.bias)
        self.register_buffer("out_weight", out_weight)  # [V', H], frozen
        self.register_buffer("embed", embed)  # [V, H], the base model's, frozen

    def forward(self, x: torch.Tensor, root: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """x [B, H], root [B], path [B, K] (the tokens at t + 2 ..., -1 past the end) -> [K, B, V']."""
        e = self.embed[root]
        out = []
        for k, (lin, proj) in enumerate(zip(self.linears, self.roots)):
            z = x + proj(e)
            for j, p in enumerate(self.paths[k]):
                z = z + p(self.embed[path[:, j].clamp(min=0)])
            out.append(F.linear(z + F.silu(lin(z)), self.out_weight))
        return torch.stack(out)


def train(heads: Heads, x: torch.Tensor, root: torch.Tensor, path: torch.Tensor, y: torch.Tensor, epochs: int,
          batch: int, lr: float, decay: float, weight_decay: float):
    """Cross-entropy of head k against its targets, weighted ``decay ** k`` (the paper's 0.8);
    AdamW with a cosine schedule after a short warm-up."""
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch)
    warm = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    weights = torch.tensor([decay ** k for k in range(y.shape[1])])
    gen = torch.Generator().manual_seed(0)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            logits = heads(x[idx], root[idx], path[idx])  # [K, B, V']
            tgt = y[idx].t()  # [K, B]
            loss = sum(w * F.cross_entropy(logits[k], tgt[k], ignore_index=-1)
                       for k, w in enumerate(weights) if (tgt[k] >= 0).any())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            step += 1
            if step % 100 == 0:
                log(f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss.item():.3f}")
        log(f"epoch {epoch + 1}: mean loss {total / len(x):.4f}")


def ranks(heads: Heads, x: torch.Tensor, root: torch.Tensor, path: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per position and head: the rank of the target among the head's proposals (MAX_RANK when
    it is not in the top MAX_RANK, or there is no target)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 2048):
            top = heads(x[i:i + 2048], root[i:i + 2048], path[i:i + 2048]).topk(MAX_RANK, dim=-1).indices  # [K, B, R]
            tgt = y[i:i + 2048].t()[..., None]  # [K, B, 1]
            hit = (top == tgt) & (tgt >= 0)
            r = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(hit[..., 0], MAX_RANK, dtype=torch.long))
            out.append(r.t())
    return torch.cat(out)  # [P, K]


def acceptance_profile(r: torch.Tensor) -> list[tuple[list[int], float]]:
    """Frequency with which each rank path (r0, ..., rd) is entirely right, for the most
    frequent paths. With a tree of these paths, the mean tokens per step is 1 + the sum of its
    paths' frequencies (the matching nodes form one chain, and the root is always kept)."""
    n, k = r.shape
    counts: dict[tuple[int, ...], int] = {}
    for row in r.tolist():
        for d in range(k):
            if row[d] >= MAX_RANK:
                break
            path = tuple(row[:d + 1])
            counts[path] = counts.get(path, 0) + 1
    best = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))[:PROFILE_PATHS]
    return [(list(p), c / n) for p, c in best]


# ---- 5. the profile over another cache ---------------------------------------------------------
def read_heads(path: Path, model: LlamaModel) -> tuple[Heads, torch.Tensor]:
    """Heads this script wrote (``<model>.safetensors``) as a ``Heads`` module, and their token_ids."""
    t = load_file(str(path))
    token_ids = t["token_ids"]
    num_heads = 1 + max(int(k.split(".")[0]) for k in t if k.split(".")[0].isdigit())
    heads = Heads(num_heads, model.cfg.hidden_size, output_rows(model.lm_head, token_ids).float().cpu(),
                  model.embed.float().cpu(), any(".path." in k for k in t))
    with torch.no_grad():
        for k in range(num_heads):
            heads.linears[k].weight.copy_(t[f"{k}.0.linear.weight"])
            heads.linears[k].bias.copy_(t[f"{k}.0.linear.bias"])
            heads.roots[k].weight.copy_(t[f"{k}.root.weight"])
            for j, proj in enumerate(heads.paths[k], start=1):
                proj.weight.copy_(t[f"{k}.path.{j}.weight"])
    return heads, token_ids


def dmc_greedy_batch(model: LlamaModel, settings: dict, prompts: list[list[int]], max_new_tokens: int,
                     eos_ids) -> list[list[int]]:
    """``greedy_batch`` over a DMC cache (``settings``: DMCForward's init_val and window): each
    row is decoded as it would be alone (a row that has ended goes on, unread, to the end)."""
    fwd = DMCForward(model, len(prompts), len(prompts[0]) + max_new_tokens + 1, **settings)
    replies: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    with torch.inference_mode():
        logits = fwd.prefill(torch.tensor(prompts, device=model.device))
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not ended[r]:
                    replies[r].append(t)
                    ended[r] = t in eos_ids
            if all(ended):
                break
            logits = fwd.step(nxt)
    fwd.free()
    return replies


def profile_over(cache: str, model_id: str | None, device: str, prompts: int, max_new_tokens: int, batch: int,
                 out: Path | None) -> dict:
    """The acceptance profile of the heads in ``out`` (default assets/medusa) over ``cache``
    ("dmc": the model's DMC cache, the shipped retrofit or a Megatron DMC checkpoint; "plain": the
    dense one), on its own greedy replies to ``profile_prompts(prompts)``; added to
    ``<model>.json`` under ``profiles``, and returned."""
    session = Session.load(LoadModel(model=model_id, device=device, decoding=cache), log)
    model, tok, name = session.model, session.tokenizer, session.name
    folder = out or ASSETS / "medusa"
    heads, token_ids = read_heads(folder / f"{name}.safetensors", model)
    settings = ({"init_val": session.decoder.dmc.init_val, "window": session.decoder.dmc.window}
                if cache == "dmc" else None)
    asked = profile_prompts(prompts)
    data, t0 = [], time.time()
    for group in length_groups(tok, asked, batch):
        ids = [x for _, x in group]
        replies = (dmc_greedy_batch(model, settings, ids, max_new_tokens, tok.eos_ids) if settings else
                   greedy_batch(model, ids, max_new_tokens, tok.eos_ids))
        data += [{"prompt": p, "prompt_ids": x, "reply_ids": r} for (p, x), r in zip(group, replies)]
        log(f"replies {len(data)}/{len(asked)} over the {cache} cache")
    t_gen = time.time() - t0
    num_heads = len(heads.linears)
    x, y, _, agree = hidden_states(model, data, num_heads, settings)
    remap = torch.full((model.cfg.vocab_size + 1,), -1, dtype=torch.long)
    remap[token_ids] = torch.arange(len(token_ids))
    r = ranks(heads, x, root_tokens(data), y, remap[y])
    entry = {
        "replies": f"greedy over the {cache} cache", "prompts": len(data), "positions": len(x),
        "max_new_tokens": max_new_tokens, "subjects": "in no training prompt (training/prompts.py profile_prompts)",
        "engine_agreement": round(agree, 4), "generation_s": round(t_gen),
        "top1": [round((r[:, k] == 0).float().mean().item(), 4) for k in range(num_heads)],
        "profile": [{"path": path, "freq": round(f, 5)} for path, f in acceptance_profile(r)],
    }
    meta_path = folder / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("profiles", {})[cache] = entry
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"{meta_path}: profile over the {cache} cache, {len(x)} positions, top-1 per head {entry['top1']}")
    session.close()
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.medusa", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=600,
                   help="answer the first N training prompts (training uses every cached reply to a training prompt)")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=16, help="replies decoded together")
    p.add_argument("--cached-only", action="store_true",
                   help="train on the replies cached so far, generate none")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--coverage", type=float, default=0.985, help="share of reply tokens the head vocabulary covers")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--decay", type=float, default=0.8, help="loss weight of head k is decay**k")
    p.add_argument("--path-inputs", action=argparse.BooleanOptionalAction, default=True,
                   help="heads also take the tokens of the path they extend (Hydra-style)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of subjects (topics, everyday requests) whose replies are kept out for the profile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile-over", choices=("dmc", "plain"), default=None,
                   help="train nothing: measure the shipped heads' acceptance profile over this cache")
    p.add_argument("--profile-prompts", type=int, default=240, help="prompts answered for --profile-over")
    p.add_argument("--profile-tokens", type=int, default=128, help="tokens per reply for --profile-over")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile_over:
        profile_over(args.profile_over, args.model, args.device, args.profile_prompts, args.profile_tokens,
                     args.gen_batch, args.out)
        return 0
    torch.manual_seed(0)
    t0 = time.time()
    name, model_dir = resolve(args.model, log)
    model = from_dir(model_dir, args.device, dtype=torch.float32)
    tok = ChatTokenizer(model_dir, model.cfg)
    data = load_or_generate(name, model, tok, args)
    t_gen = time.time() - t0
    log(f"{len(data)} replies, {sum(len(d['reply_ids']) for d in data)} tokens ({t_gen:.0f} s)")

    hs_path = cache_dir() / "training" / f"{name}-hidden-{len(data)}-{args.max_new_tokens}-{args.heads}.pt"
    x, y, convo, agree = cached_hidden_states(model, data, args.heads, hs_path)
    log(f"{len(x)} positions; our engine's greedy choice equals the reply's next token at {agree:.2%}")
    # held out by subject: the profile measures the heads on subjects they were not trained on
    subject = subjects()
    names = sorted({subject[d["prompt"]] for d in data})
    kept = set(random.Random(1).sample(names, max(1, int(len(names) * args.holdout))))
    held = {i for i, d in enumerate(data) if subject[d["prompt"]] in kept}
    test = torch.tensor([int(c) in held for c in convo])
    token_ids = head_vocabulary(y[~test], model.cfg.vocab_size, args.coverage)
    remap = torch.full((model.cfg.vocab_size + 1,), -1, dtype=torch.long)
    remap[token_ids] = torch.arange(len(token_ids))
    y_local = remap[y]  # -1 (ignored) for targets outside the head vocabulary and past the end
    roots = root_tokens(data)
    if len(roots) != len(x):
        raise SystemExit(f"{hs_path}: {len(x)} positions, the replies have {len(roots)}: delete it and rerun")
    heads = Heads(args.heads, model.cfg.hidden_size, output_rows(model.lm_head, token_ids).float().cpu(),
                  model.embed.float().cpu(), args.path_inputs)
    log(f"head vocabulary: {len(token_ids)} tokens")

    t1 = time.time()
    train(heads, x[~test], roots[~test], y[~test], y_local[~test], args.epochs, args.batch, args.lr, args.decay,
          args.weight_decay)
    t_train = time.time() - t1
    r = ranks(heads, x[test], roots[test], y[test], y_local[test])
    top1 = [(r[:, k] == 0).float().mean().item() for k in range(args.heads)]
    top5 = [(r[:, k] < 5).float().mean().item() for k in range(args.heads)]
    profile = acceptance_profile(r)
    log(f"held-out top-1 per head {[round(a, 3) for a in top1]}, top-5 {[round(a, 3) for a in top5]}")

    out = args.out or ASSETS / "medusa"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"token_ids": token_ids.contiguous()}
    for k, lin in enumerate(heads.linears):
        tensors[f"{k}.0.linear.weight"] = lin.weight.detach().contiguous()
        tensors[f"{k}.0.linear.bias"] = lin.bias.detach().contiguous()
        tensors[f"{k}.root.weight"] = heads.roots[k].weight.detach().contiguous()
        for j, proj in enumerate(heads.paths[k], start=1):
            tensors[f"{k}.path.{j}.weight"] = proj.weight.detach().contiguous()
    save_file(tensors, str(out / f"{name}.safetensors"))
    meta = {
        "base_model": name, "num_heads": args.heads, "num_layers": 1, "head_vocabulary": len(token_ids),
        "path_inputs": args.path_inputs,
        "training": {
            "method": "self-distillation on the base model's greedy replies", "prompts": len(data),
            "replies_held_out": len(held), "held_out_by": "subject",
            "reply_tokens": sum(len(d["reply_ids"]) for d in data),
            "positions_train": int((~test).sum()), "positions_held_out": int(test.sum()),
            "max_new_tokens": args.max_new_tokens, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
            "weight_decay": args.weight_decay,
            "loss_decay": args.decay, "coverage": args.coverage, "device": args.device,
            "engine_agreement": round(agree, 4), "generation_s": round(t_gen), "training_s": round(t_train),
        },
        "held_out": {"top1": [round(a, 4) for a in top1], "top5": [round(a, 4) for a in top5]},
        "profile": [{"path": path, "freq": round(f, 5)} for path, f in profile],
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"wrote {out / (name + '.safetensors')} and its profile ({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
