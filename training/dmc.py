"""Retrofit a Hugging Face Llama checkpoint for Dynamic Memory Compression (DMC), as the DMC paper
and its reference code do, at a small scale, by distillation from the original model.

Decision neurons: the last dimension D-1 of each key head gives the merge decision (alpha logit
``k[D-1] - init_val``), the last dimension of the query heads the token's importance weight
(omega = ``sigmoid(mean over the KV head's query heads of q[D-1] + init_val)``); neither takes
part in attention any more (engine/decoding/dmc.py has the inference side).

- Stage 1 (``--stage1-steps``, with ``--train lora`` or ``attention``): the repurposed dims' share of
  q and k is decayed linearly to zero over 80% of the stage, while the attention weights learn to
  do without them (distillation); then the decision rows are set to zero: alpha logit -5
  (append), weight sigmoid(5).
- Stage 2 (``--steps``): DMC in its training form (the notes' section 1.6): Gumbel-sigmoid
  relaxed decisions (temperature ``--temp`` 0.1, noise on the logits), each position's key and
  value the weighted partial accumulation of its merge run over the last ``--window`` tokens
  (alpha-gated running sums), and the additive mask log(1 - alpha_{j+1}) on key j for later
  queries (a query always sees its own row). Loss: KL(original model || DMC model) on the next
  token, plus ``--dmc-weight`` x the mean over layers of relu(prior - mean decision), with
  prior = 1 - 1/CR and CR raised linearly from 1 to ``--cr`` over ``--anneal`` of the stage,
  then held.

Trainable (``--train``), beside the q/k decision rows ((heads + kv heads) x hidden floats per layer):
``lora`` (default): rank-``--rank`` updates of every layer's q/k/v/o projections (a delta of a few
MB); ``decision``: nothing else (the model cannot adapt to losing dim D-1 from attention);
``attention``: the whole q/k/v/o projections (a delta of the whole attention, bfloat16).

Data: the model's own greedy chat replies cached by training/medusa.py (``--replies``, by default
its cache file for this model if present) and/or text files (``--text``, cut into ``--seq-len``
token pieces); a share (``--holdout``) of each is held out.

Outputs (``--out``, default assets/dmc/): ``<model>.safetensors``, the delta engine/formats/dmc_delta.py
loads; ``<model>.json``: data, steps, times, and on the held-out data with the engine's
DMCForward: the KV compression of held-out chat replies (prompt + reply prefilled), and
perplexity of held-out sequences for the original model (dense cache) and the DMC model.

    python -m training.dmc --steps 4 --stage1-steps 0 --seq-len 64       # smoke run, a minute on CPU
    python -m training.dmc --device cuda --steps 1500 --cr 2.5 --batch 8     # the real retrofit
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
from safetensors.torch import save_file

from kernels.dmc import WEIGHT_EPS

from engine.config import load_config
from engine.decoding.dmc import DMCForward, INIT_VAL, WINDOW
from engine.errors import EngineError
from engine.formats.dmc_delta import ROWS, decision_row_index, delta_metadata
from engine.formats.tensor_source import TensorSource
from engine.hub.resolve import resolve
from engine.model.llama import LlamaModel
from engine.model.rope import cos_sin_table
from engine.model.weights import from_dir, load_retrofitted
from engine.paths import ASSETS, cache_dir
from engine.tokenizer import ChatTokenizer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- data ------------------------------------------------------------------------------------
def load_replies(path: Path | None) -> list[list[int]]:
    """prompt + reply token ids of each cached reply (training/medusa.py's jsonl)."""
    if path is None or not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            d = json.loads(line)
            out.append([int(t) for t in d["prompt_ids"]] + [int(t) for t in d["reply_ids"]])
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError(f"{path}: line {n + 1} is not a cached reply ({e})") from None
    return out


def text_pieces(files: list[Path], tok: ChatTokenizer, seq_len: int) -> list[list[int]]:
    out = []
    for f in files:
        try:
            ids = tok.encode(Path(f).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"{f}: cannot read it as UTF-8 text ({e})") from None
        out += [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len) if len(ids[i:i + seq_len]) > 1]
    return out


def split(seqs: list[list[int]], holdout: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(seqs)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(len(seqs) * holdout)) if len(seqs) > 1 else 0
    return [seqs[i] for i in idx[n:]], [seqs[i] for i in idx[:n]]


def batches(seqs: list[list[int]], batch: int, seq_len: int, pad: int, rng: random.Random):
    """Endless random batches: ids [B, T] (right-padded) and the mask of real tokens."""
    while True:
        group = [s[:seq_len] for s in rng.sample(seqs, min(batch, len(seqs)))]
        t = max(len(s) for s in group)
        ids = torch.full((len(group), t), pad, dtype=torch.long)
        mask = torch.zeros(len(group), t, dtype=torch.bool)
        for r, s in enumerate(group):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = True
        yield ids, mask


# ---- the model in training form ---------------------------------------------------------------
class Retrofit:
    """The checkpoint's weights as float32 tensors (trainable ones as leaf tensors) and a
    differentiable forward: dense (the original model), stage 1 (decision dims scaled) or DMC."""

    def __init__(self, model_dir: Path, device, train: str, init_val: float, window: int, temp: float,
                 rank: int = 16):
        self.cfg = cfg = load_config(model_dir)
        if cfg.attention_bias or cfg.mlp_bias:
            raise EngineError(f"{model_dir}: attention or MLP biases are not supported by the retrofit")
        src = TensorSource(model_dir)
        self.device, self.init_val, self.window, self.temp = torch.device(device), init_val, window, temp
        self.w = {n: src.get(n).to(self.device, torch.float32) for n in sorted(src.names())}
        self.embed = self.w["model.embed_tokens.weight"]
        self.head = self.w.get("lm_head.weight", self.embed) if not cfg.tie_word_embeddings else self.embed
        d = cfg.head_dim
        self.q_rows = decision_row_index(cfg.num_heads, d).to(self.device)
        self.k_rows = decision_row_index(cfg.num_kv_heads, d).to(self.device)
        # the original attention weights, for the teacher (copies only when they are trained)
        names = [self.attn(li, p) for li in range(cfg.num_layers) for p in ATTN]
        self.original = {n: self.w[n].clone() if train == "attention" else self.w[n] for n in names}
        self.train = train
        # decision rows, kept apart from the projections so that they can be trained alone
        self.rows = {}
        for li in range(cfg.num_layers):
            self.rows[li, "q"] = self.w[self.attn(li, "q_proj")][self.q_rows].clone()
            self.rows[li, "k"] = self.w[self.attn(li, "k_proj")][self.k_rows].clone()
        # low-rank updates W + B A of the attention projections (B zero: no change at the start)
        self.lora = {}
        if train == "lora":
            g = torch.Generator().manual_seed(0)
            for li in range(cfg.num_layers):
                for p in ATTN:
                    out_f, in_f = self.w[self.attn(li, p)].shape
                    a = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
                    self.lora[li, p] = (a.to(self.device), torch.zeros(out_f, rank, device=self.device))
        self.cos, self.sin = cos_sin_table(cfg, 4096, self.device, torch.float32)
        self.last = torch.arange(d, device=self.device) == d - 1

    @staticmethod
    def attn(li: int, proj: str) -> str:
        return f"model.layers.{li}.self_attn.{proj}.weight"

    def adapted(self) -> list[torch.Tensor]:
        """The trainable tensors besides the decision rows (requires_grad set)."""
        if self.train == "lora":
            params = [t for ab in self.lora.values() for t in ab]
        elif self.train == "attention":
            params = [self.w[n] for n in self.original]
        else:
            params = []
        for t in params:
            t.requires_grad_(True)
        return params

    def weight(self, li: int, proj: str, original: bool = False) -> torch.Tensor:
        """A projection weight as the student sees it (the teacher's with ``original``)."""
        name = self.attn(li, proj)
        if original:
            return self.original[name]
        if self.lora:
            a, b = self.lora[li, proj]
            return self.w[name] + b @ a
        return self.w[name]

    def zero_decision_rows(self):
        with torch.no_grad():
            for t in self.rows.values():
                t.zero_()

    def _proj(self, li: int, x: torch.Tensor, original: bool):
        cfg, d = self.cfg, self.cfg.head_dim
        wq, wk, wv = (self.weight(li, p, original) for p in ("q_proj", "k_proj", "v_proj"))
        if not original:  # the decision rows replace rows D-1 of each head
            wq = wq.index_put((self.q_rows,), self.rows[li, "q"])
            wk = wk.index_put((self.k_rows,), self.rows[li, "k"])
        b, t = x.shape[:2]
        q = (x @ wq.t()).view(b, t, cfg.num_heads, d)
        k = (x @ wk.t()).view(b, t, cfg.num_kv_heads, d)
        v = (x @ wv.t()).view(b, t, cfg.num_kv_heads, d)
        return q, k, v

    def _rope(self, x: torch.Tensor, t: int, zero_last: bool) -> torch.Tensor:
        cos, sin = self.cos[:t, None], self.sin[:t, None]
        if zero_last:
            x = x.masked_fill(self.last, 0)
        x = x * cos + x.roll(x.shape[-1] // 2, -1) * sin
        return x.masked_fill(self.last, 0) if zero_last else x

    def forward(self, ids: torch.Tensor, mode: str = "dmc", decay: float = 1.0, noise: bool = True):
        """Logits [B, T, V] and, in DMC mode, each layer's relaxed decisions [B, T, Hkv] (0 for the
        first token).
        mode "dense": the original model; "stage1": dims D-1 of q and k scaled by ``decay``."""
        cfg = self.cfg
        b, t = ids.shape
        h, nh, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        groups, eps = nh // nkv, cfg.rms_norm_eps
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        x = F.embedding(ids, self.embed)
        decisions = []
        for li in range(cfg.num_layers):
            p = f"model.layers.{li}."
            hx = F.rms_norm(x, (h,), self.w[p + "input_layernorm.weight"], eps)
            q, k, v = self._proj(li, hx, original=(mode == "dense"))
            if mode == "dmc":
                q, k, v, mask, alpha = self._dmc(q, k, v, noise)
                decisions.append(alpha)
                q, k = self._rope(q, t, True), self._rope(k, t, True)
            else:
                if mode == "stage1":
                    scale = torch.where(self.last, decay, 1.0)
                    q, k = q * scale, k * scale
                q, k = self._rope(q, t, False), self._rope(k, t, False)
                mask = causal
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            kh, vh = kh.repeat_interleave(groups, 1), vh.repeat_interleave(groups, 1)
            if mask.dim() == 4:
                mask = mask.repeat_interleave(groups, 1)
            a = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
            x = x + a.transpose(1, 2).reshape(b, t, nh * d) @ self.weight(li, "o_proj", mode == "dense").t()
            hm = F.rms_norm(x, (h,), self.w[p + "post_attention_layernorm.weight"], eps)
            gate = hm @ self.w[p + "mlp.gate_proj.weight"].t()
            up = hm @ self.w[p + "mlp.up_proj.weight"].t()
            x = x + (F.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].t()
        x = F.rms_norm(x, (h,), self.w["model.norm.weight"], eps)
        return x @ self.head.t(), decisions

    def _dmc(self, q, k, v, noise: bool):
        """Relaxed decisions, partial accumulations and the attention mask of one layer."""
        b, t, nkv, d = k.shape
        nh = q.shape[2]
        logit = k[..., d - 1] - self.init_val  # [B, T, Hkv]
        if noise:
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = logit + torch.log(u) - torch.log1p(-u)
        z = logit / self.temp
        alpha = torch.sigmoid(z)
        first = torch.zeros_like(alpha)
        first[:, 0] = 1.0
        alpha = alpha * (1 - first)  # the first token never merges
        w = torch.sigmoid(q[..., d - 1].view(b, t, nkv, nh // nkv).mean(-1) + self.init_val) + WEIGHT_EPS
        kw = k.masked_fill(self.last, 0) * w[..., None]
        vw = v * w[..., None]
        # x_acc[i] = sum over o < window of (prod_{m=i-o+1..i} alpha_m) * w_{i-o} x_{i-o}
        ksum, vsum, wsum = kw.clone(), vw.clone(), w.clone()
        carry = torch.ones_like(alpha)
        for o in range(1, min(self.window, t)):
            carry = carry[:, 1:] * alpha[:, 1:t - o + 1]  # over positions i >= o
            ksum = ksum + F.pad(carry[..., None] * kw[:, :-o], (0, 0, 0, 0, o, 0))
            vsum = vsum + F.pad(carry[..., None] * vw[:, :-o], (0, 0, 0, 0, o, 0))
            wsum = wsum + F.pad(carry * w[:, :-o], (0, 0, o, 0))
        k_acc, v_acc = ksum / wsum[..., None], vsum / wsum[..., None]
        # key j is hidden from queries i > j by log(1 - alpha_{j+1}); a query sees its own row
        keep = F.logsigmoid(-z[:, 1:])  # [B, T-1, Hkv]
        keep = F.pad(keep, (0, 0, 0, 1)).permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, 1, T] over keys j
        idx = torch.arange(t, device=k.device)
        below = (idx[:, None] > idx[None, :])
        mask = torch.where(below, keep, 0.0).masked_fill(idx[:, None] < idx[None, :], float("-inf"))
        return q, k_acc, v_acc, mask, alpha

    def low_rank_and_rows(self) -> dict[str, torch.Tensor]:
        """The live low-rank factors and decision rows under their delta names (``delta``'s,
        for --train lora and decision)."""
        out = {}
        for li in range(self.cfg.num_layers):
            for p in ATTN if self.train == "lora" else ():
                out[self.attn(li, p) + ".lora_a"], out[self.attn(li, p) + ".lora_b"] = self.lora[li, p]
            out[self.attn(li, "q_proj")[:-len(".weight")] + ROWS] = self.rows[li, "q"]
            out[self.attn(li, "k_proj")[:-len(".weight")] + ROWS] = self.rows[li, "k"]
        return out

    def delta(self, train: str) -> dict[str, torch.Tensor]:
        if train != "attention":
            return {n: t.detach().cpu().contiguous() for n, t in self.low_rank_and_rows().items()}
        out = {}
        for li in range(self.cfg.num_layers):
            for p in ATTN:
                w = self.w[self.attn(li, p)].detach().clone()
                if p == "q_proj":
                    w[self.q_rows] = self.rows[li, "q"].detach()
                if p == "k_proj":
                    w[self.k_rows] = self.rows[li, "k"].detach()
                out[self.attn(li, p)] = w.to(torch.bfloat16).cpu().contiguous()
        return out


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over real tokens."""
    kl = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                  reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum()


def train_step(rf: Retrofit, opt, batch, mode: str, decay: float = 1.0, prior: float = 0.0,
               dmc_weight: float = 0.0) -> dict:
    """One optimizer step: KL to the original model (+ the compression loss in DMC mode)."""
    ids, mask = (t.to(rf.device) for t in batch)
    with torch.no_grad():
        teacher, _ = rf.forward(ids, "dense")
    student, decisions = rf.forward(ids, mode, decay=decay)
    kl = distill_loss(student, teacher, mask)
    loss, rec = kl, {"kl": round(kl.item(), 5)}
    if mode == "dmc":
        real = mask[:, 1:, None].float()  # the first token's decision is fixed; padding does not count
        mean_dec = torch.stack([(a[:, 1:] * real).sum() / (real.sum() * a.shape[2]) for a in decisions])
        dmc_loss = F.relu(prior - mean_dec).mean()
        loss = kl + dmc_weight * dmc_loss
        rec.update(mean_decision=round(mean_dec.mean().item(), 4), dmc_loss=round(dmc_loss.item(), 5))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return rec


# ---- stopping and resuming ---------------------------------------------------------------------
RESUME_ARGS = ("train", "rank", "stage1_steps", "steps", "cr", "anneal", "batch", "seq_len", "window", "seed")


def resume_settings(args) -> dict:
    """The settings a saved state belongs to (a resumed run must have the same)."""
    return {k: getattr(args, k) for k in RESUME_ARGS}


def trained_tensors(rf: Retrofit) -> dict[str, list[torch.Tensor]]:
    """What training changes, in a fixed order: the decision rows, the low-rank factors, and the
    attention weights when they are trained whole."""
    return {"rows": [rf.rows[k] for k in sorted(rf.rows)],
            "lora": [t for k in sorted(rf.lora) for t in rf.lora[k]],
            "weights": [rf.w[n] for n in rf.original] if rf.train == "attention" else []}


def save_state(path: Path, rf: Retrofit, opt, stage: int, step: int, rng: random.Random, history: list,
               settings: dict) -> None:
    """The trainable tensors, the optimizer and the data order after ``step`` steps of ``stage``
    (written to a temporary file and renamed, so a stop mid-write keeps the previous state)."""
    state = {"stage": stage, "step": step, "args": settings, "rng": rng.getstate(),
             "torch_rng": torch.get_rng_state(), "optimizer": opt.state_dict(), "history": history,
             **{k: [t.detach().cpu() for t in ts] for k, ts in trained_tensors(rf).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path, args) -> dict:
    if not path.is_file():
        raise SystemExit(f"training.dmc: --resume: no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    want = resume_settings(args)
    if state.get("args") != want:
        raise SystemExit(f"training.dmc: --resume: {path} was saved with other settings "
                         f"({state.get('args')}; now {want})")
    return state


def load_delta(rf: Retrofit, path: Path) -> None:
    """The trained tensors of an earlier delta (``Retrofit.delta``'s names) into ``rf``."""
    from safetensors.torch import load_file

    if rf.train == "attention":
        raise SystemExit("training.dmc: --init continues --train lora or decision runs only")
    live = rf.low_rank_and_rows()
    saved = load_file(str(path))
    if set(saved) != set(live) or any(saved[n].shape != live[n].shape for n in live):
        raise SystemExit(f"training.dmc: --init {path}: not a delta of this model made with --train {rf.train} and "
                         "the same --rank")
    with torch.no_grad():
        for n, t in live.items():
            t.copy_(saved[n])


def restore(rf: Retrofit, opt, state: dict) -> int:
    """Load the saved tensors and optimizer state; the first step to run."""
    with torch.no_grad():
        for k, ts in trained_tensors(rf).items():
            for t, saved in zip(ts, state[k]):
                t.copy_(saved)
    opt.load_state_dict(state["optimizer"])
    return state["step"]


# ---- evaluation with the engine ---------------------------------------------------------------
def nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    target = torch.tensor(ids[1:], device=logits.device)
    return float(F.cross_entropy(logits[:-1].float(), target, reduction="sum")), len(ids) - 1


# Simple questions with the word a right answer contains (any of them, case-insensitive): the
# retrofitted model should answer as many as the original does.
SIMPLE_QUESTIONS = [
    ("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]), ("What is the largest ocean on Earth?", ["Pacific"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "Vinci"]), ("What is the tallest mountain in the world?", ["Everest"]),
    ("What language is spoken in Brazil?", ["Portuguese"]), ("What is the chemical formula of water?", ["H2O"]),
    ("At what temperature does water boil at sea level, in degrees Celsius?", ["100"]),
    ("Which planet is known as the Red Planet?", ["Mars"]), ("How many days are in a week?", ["seven", "7"]),
    ("What color is the sky on a clear day?", ["blue"]), ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
]


SIMPLE_ANSWER_TOKENS = 48


def question_prompts(tok: ChatTokenizer) -> list[list[int]]:
    return [tok.encode_chat([{"role": "user", "content": q}]) for q, _ in SIMPLE_QUESTIONS]


def greedy_reply(first_logits: torch.Tensor, advance, eos_ids, max_new_tokens: int) -> list[int]:
    """Greedy tokens from the logits after a prompt; ``advance(token)`` gives the next logits."""
    out, logits = [], first_logits
    for _ in range(max_new_tokens):
        t = int(logits.argmax())
        if t in eos_ids:
            break
        out.append(t)
        logits = advance(t)
    return out


def simple_questions(base: LlamaModel, dmc: DMCForward, tok: ChatTokenizer, prompts: list[list[int]],
                     max_new_tokens: int = SIMPLE_ANSWER_TOKENS) -> dict:
    """Greedy answers of the original model and of the DMC model to SIMPLE_QUESTIONS (``prompts``:
    their chat prompts, ``question_prompts``): how many contain a right word, and the answers."""
    rows = []
    for (question, words), ids in zip(SIMPLE_QUESTIONS, prompts):
        cache = base.new_cache(len(ids) + max_new_tokens)
        x = torch.tensor([ids], device=base.device)
        plain = greedy_reply(base.forward(x, cache, 0)[0, -1], lambda t: base.forward(
            torch.tensor([[t]], device=base.device), cache, cache.length)[0, -1], tok.eos_ids, max_new_tokens)
        dmc.reset()
        compressed = greedy_reply(dmc.prefill(x)[0], lambda t: dmc.step(torch.tensor([t]))[0], tok.eos_ids,
                                  max_new_tokens)
        answers = {k: tok.decode(v) for k, v in (("plain", plain), ("dmc", compressed))}
        right = {k: any(w.lower() in a.lower() for w in words) for k, a in answers.items()}
        rows.append({"question": question, **{f"{k}_right": v for k, v in right.items()},
                     "dmc_answer": answers["dmc"][:160]})
    return {"simple_questions": len(rows), "simple_right_plain": sum(r["plain_right"] for r in rows),
            "simple_right_dmc": sum(r["dmc_right"] for r in rows), "simple_answers": rows}


def evaluate(model_dir: Path, delta: Path, seqs: list[list[int]], replies: list[tuple[int, list[int]]],
             device) -> dict:
    """With the engine: perplexity of ``seqs`` for the original model (dense cache) and the DMC
    model (DMCForward, whole sequence prefilled), and the DMC cache's compression after
    prefilling each held-out chat (prompt + reply; ``replies`` [(prompt length, ids)]), and both
    models' answers to SIMPLE_QUESTIONS."""
    base = from_dir(model_dir, device, dtype=torch.float32)
    model, settings = load_retrofitted(model_dir, delta, device, dtype=torch.float32)
    tok = ChatTokenizer(model_dir, base.cfg)
    questions = question_prompts(tok)
    longest = max([len(s) for s in seqs] + [len(s) for _, s in replies] +
                  [len(q) + SIMPLE_ANSWER_TOKENS for q in questions])
    dmc = DMCForward(model, 1, longest, **settings)
    cache = base.new_cache(longest)
    base_nll = dmc_nll = 0.0
    n = 0
    with torch.inference_mode():
        for s in seqs:
            ids = torch.tensor([s], device=device)
            cache.length = 0
            a, _ = nll(base.forward_all(ids, cache, 0)[0], s)
            dmc.reset()
            b, m = nll(dmc.prefill(ids, all_logits=True)[0], s)
            base_nll, dmc_nll, n = base_nll + a, dmc_nll + b, n + m
        ratios, tokens, slots = [], 0, 0
        for _, s in replies:
            dmc.reset()
            dmc.prefill(torch.tensor([s], device=device))
            st = dmc.stats()
            ratios.append(st["kv_compression"])
            tokens += st["tokens"]
            slots += st["slots"]
    cfg = model.cfg
    per_token_slots = cfg.num_layers * cfg.num_kv_heads
    out = {"perplexity_original": round(math.exp(base_nll / max(n, 1)), 4),
           "perplexity_dmc": round(math.exp(dmc_nll / max(n, 1)), 4), "perplexity_tokens": n}
    if replies:
        out.update({"kv_compression": round(tokens * per_token_slots / max(slots, 1), 4),
                    "kv_compression_per_chat_min": round(min(ratios), 4),
                    "kv_compression_per_chat_max": round(max(ratios), 4), "chats": len(replies),
                    "chat_tokens": tokens})
    with torch.inference_mode():
        out.update(simple_questions(base, dmc, tok, questions))
    return out


def evaluate_only(model_dir: Path, delta: Path, seqs, chats, device) -> int:
    """``--evaluate``: the held-out figures of a written delta, logged and put in its json."""
    results = evaluate(model_dir, delta, seqs, chats, device)
    log(f"held out: {json.dumps({k: v for k, v in results.items() if k != 'simple_answers'})}")
    meta_path = delta.with_suffix(".json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["held_out"] = {**meta.get("held_out", {}), **results}
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        log(f"updated {meta_path}")
    return 0


# ---- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.dmc", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replies", type=Path, default=None,
                   help="cached greedy replies (jsonl; default: training/medusa.py's cache file for this model)")
    p.add_argument("--text", type=Path, nargs="*", default=[], help="UTF-8 text files to train on too")
    p.add_argument("--eval-text", type=Path, default=None,
                   help="held-out text for perplexity (default: the held-out replies and text pieces)")
    p.add_argument("--train", choices=["lora", "decision", "attention"], default="lora")
    p.add_argument("--rank", type=int, default=16, help="rank of the low-rank updates (--train lora)")
    p.add_argument("--stage1-steps", type=int, default=60, help="decay steps (not with --train decision)")
    p.add_argument("--steps", type=int, default=600, help="stage 2 steps")
    p.add_argument("--cr", type=float, default=2.5, help="target compression ratio")
    p.add_argument("--anneal", type=float, default=0.8, help="share of stage 2 over which CR rises from 1")
    p.add_argument("--dmc-weight", type=float, default=5.0)
    p.add_argument("--temp", type=float, default=0.1, help="Gumbel-sigmoid temperature")
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--init-val", type=float, default=INIT_VAL)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="of the q/k/v/o updates (default: 1e-3 lora, "
                   "1e-4 attention)")
    p.add_argument("--lr-decision", type=float, default=1e-2, help="of the decision rows")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--eval-chats", type=int, default=24, help="held-out chats for the compression figure")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--save-every", type=int, default=20, help="steps between saves of the training state")
    p.add_argument("--state", type=Path, default=None,
                   help="training state file (default: <cache>/training/<model>-dmc-state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the saved training state")
    p.add_argument("--init", type=Path, default=None,
                   help="start stage 2 from an earlier retrofit's delta (its decision rows and low-rank updates; "
                        "no stage 1), e.g. to move it to another --cr; with --anneal 0 the target holds from step 0")
    p.add_argument("--evaluate-state", action="store_true",
                   help="write the delta of the saved training state (a run still going or stopped) to --out "
                        "(default: <cache>/training/<model>-dmc-evaluated/) and evaluate it; no training")
    p.add_argument("--evaluate", type=Path, default=None, metavar="DELTA",
                   help="only evaluate a written delta on the held-out data (the same split as training); the "
                        "figures go into the json beside it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.cr < 1 or args.window < 1:
        raise SystemExit("training.dmc: --steps, --window must be >= 1 and --cr >= 1")
    torch.manual_seed(args.seed)
    t0 = time.time()
    name, model_dir = resolve(args.model, log)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    rf = Retrofit(model_dir, args.device, args.train, args.init_val, args.window, args.temp, args.rank)
    tok = ChatTokenizer(model_dir, rf.cfg)

    replies_path = args.replies or next(iter(sorted((cache_dir() / "training").glob(f"{name}-replies-*.jsonl"),
                                                     key=lambda f: -f.stat().st_size)), None)
    replies = load_replies(replies_path)
    pieces = text_pieces(args.text, tok, args.seq_len)
    train_r, held_r = split(replies, args.holdout, 1)
    train_t, held_t = split(pieces, args.holdout, 2)
    train_seqs = train_r + train_t
    if not train_seqs:
        raise SystemExit("training.dmc: no training data: no cached replies for this model (run training.medusa "
                         "first, or give --replies) and no --text files")
    eval_seqs = [s[:args.seq_len] for s in held_r + held_t]
    if args.eval_text is not None:
        eval_seqs = text_pieces([args.eval_text], tok, args.seq_len)
    log(f"{len(train_seqs)} training sequences ({len(train_r)} replies from {replies_path}, {len(train_t)} text "
        f"pieces); held out: {len(held_r)} replies, {len(held_t)} text pieces")

    if args.evaluate is not None:
        return evaluate_only(model_dir, args.evaluate, eval_seqs, [(0, s) for s in held_r[:args.eval_chats]],
                             args.device)
    pad = min(tok.eos_ids) if tok.eos_ids else 0
    rng = random.Random(args.seed)
    data = batches(train_seqs, args.batch, args.seq_len, pad, rng)
    lr = args.lr or (1e-4 if args.train == "attention" else 1e-3)
    adapted = rf.adapted()
    history = []

    state_path = args.state or cache_dir() / "training" / f"{name}-dmc-state.pt"
    state = load_state(state_path, args) if args.resume or args.evaluate_state else None
    if args.evaluate_state and state["stage"] != 2:
        raise SystemExit(f"training.dmc: --evaluate-state: {state_path} is in stage 1; no DMC decisions to evaluate yet")
    if state is not None:
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        log(f"resuming from {state_path}: stage {state['stage']}, step {state['step']}")

    # stage 1: the repurposed dims fade out of attention; the attention weights adapt
    t1 = time.time()
    s1 = args.stage1_steps if adapted and args.init is None else 0
    if s1 and (state is None or state["stage"] == 1):
        opt = torch.optim.AdamW(adapted, lr=lr, weight_decay=0.0)
        first = restore(rf, opt, state) if state is not None else 0
        for step in range(first, s1):
            decay = max(0.0, 1 - step / (0.8 * s1))
            rec = train_step(rf, opt, next(data), "stage1", decay=decay)
            if step % 10 == 0 or step == s1 - 1:
                log(f"stage 1 step {step}/{s1}: decay {decay:.2f}, KL {rec['kl']:.4f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < s1:
                save_state(state_path, rf, opt, 1, step + 1, rng, history, resume_settings(args))
        state = None
    if state is None and args.init is not None:
        load_delta(rf, args.init)
        log(f"stage 2 starts from {args.init}")
    elif state is None:
        rf.zero_decision_rows()  # alpha logit -init_val (append), weight sigmoid(init_val)
    t_stage1 = time.time() - t1

    # stage 2: DMC with the compression target annealed upwards
    for t in rf.rows.values():
        t.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": list(rf.rows.values()), "lr": args.lr_decision}]
                            + ([{"params": adapted, "lr": lr}] if adapted else []), weight_decay=0.0)
    first = restore(rf, opt, state) if state is not None else 0
    if state is not None:
        history = state["history"]
    t2 = time.time()
    for step in range(first, first if args.evaluate_state else args.steps):
        cr = 1 + (args.cr - 1) * min(1.0, (step + 1) / max(1, args.anneal * args.steps))
        prior = 1 - 1 / cr
        rec = {"step": step, "cr_target": round(cr, 3),
               **train_step(rf, opt, next(data), "dmc", prior=prior, dmc_weight=args.dmc_weight)}
        if step % 10 == 0 or step == args.steps - 1:
            history.append(rec)
            log(f"stage 2 step {step}/{args.steps}: target CR {cr:.2f} (merge share {prior:.3f}), KL {rec['kl']:.4f}, "
                f"mean decision {rec['mean_decision']:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_state(state_path, rf, opt, 2, step + 1, rng, history, resume_settings(args))
    t_stage2 = time.time() - t2

    done = first if args.evaluate_state else args.steps
    out = args.out or (cache_dir() / "training" / f"{name}-dmc-evaluated" if args.evaluate_state
                       else ASSETS / "dmc")
    out.mkdir(parents=True, exist_ok=True)
    delta_path = out / f"{name}.safetensors"
    save_file(rf.delta(args.train), str(delta_path), metadata=delta_metadata(rf.cfg, name, args.init_val, args.window))
    if not args.evaluate_state:
        state_path.unlink(missing_ok=True)  # the run is complete; nothing to resume
    log(f"wrote {delta_path}; evaluating on the held-out data with the engine")
    rf = None
    chats = [(0, s) for s in held_r[:args.eval_chats]]
    t3 = time.time()
    results = evaluate(model_dir, delta_path, eval_seqs, chats, args.device)
    log(f"held out: {results}")
    meta = {
        "base_model": name, "format": "chatapp-dmc-delta 1", "trained": args.train,
        "init_val": args.init_val, "window": args.window,
        "training": {
            "method": "DMC retrofit by distillation (KL to the original model's logits) with the annealed "
                      "compression loss", "data_replies": str(replies_path) if replies else None,
            "data_text": [str(f) for f in args.text], "train_sequences": len(train_seqs),
            "held_out_replies": len(held_r), "held_out_text_pieces": len(held_t),
            "stage1_steps": s1, "stage2_steps": args.steps, "stage2_steps_done": done, "batch": args.batch,
            "seq_len": args.seq_len,
            "lr": lr, "lr_decision": args.lr_decision, "rank": args.rank if args.train == "lora" else None,
            "cr_target": args.cr, "anneal": args.anneal, "dmc_weight": args.dmc_weight,
            "init": str(args.init) if args.init else None,
            "temperature": args.temp, "device": args.device, "stage1_s": round(t_stage1, 1),
            "stage2_s": round(t_stage2, 1), "eval_s": round(time.time() - t3, 1),
            "total_s": round(time.time() - t0, 1),
        },
        "held_out": {**results, "perplexity_text": str(args.eval_text) if args.eval_text else "held-out sequences"},
        "history": history,
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"wrote {out / (name + '.json')} ({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
