"""Dynamic Memory Compression (DMC) inference for LlamaModel: a paged KV cache whose length
varies per (batch row, layer, KV head), and the forward pass that fills it.

``DMCDecoder`` is the decoding the session holds (engine/decoding/base.py); it drives
``DMCForward``, whose API serves the engine, the benchmarks and training:

    model = weights.from_dir(...)                    # engine/model/weights.py (or from_megatron(path))
    dmc = DMCForward(model, batch=1, max_len=4096)   # page_size=16, init_val=5.0, window=12
                                                     # (dmc_settings(info["args"]) for a Megatron checkpoint)
    logits = dmc.prefill(ids)     # ids [B, T] int64 after the tokens held -> logits of the last token
                                  # [B, vocab] (float32); all T tokens at once per layer (parallel=False:
                                  # token by token, the reference)
    logits = dmc.step(ids)        # one token per batch row, ids [B] or [B, 1] -> [B, vocab]
    dmc.length                    # tokens held (the next token's position)
    dmc.stats()                   # {"kv_cache_bytes": slots in use, "kv_cache_bytes_allocated": pages,
                                  #  "kv_cache_bytes_dense": a plain cache for the same tokens,
                                  #  "kv_compression": dense / in use, "tokens": ..., "slots": ...}
    dmc.reset()                   # start a new conversation (pages go back; the pool is kept)
    dmc.free()                    # drop the pool

The algorithm is that of the released DMC checkpoints (NVIDIA Megatron-LM, DMC branch): the
last dimension D-1 of each key head decides (merge into the head's last slot iff k[D-1] > 5,
never for the first token), the last dimension of the query heads gives the token's weight
(sigmoid(mean over the KV head's query heads of q[D-1] + 5) + 2**-7); both are zeroed before
attention. The decision compares the projection, in the model's dtype, converted to float32 with
5: for bfloat16 this is the reference's bfloat16 test (k - 5 - 0.00785 >= 0), as no bfloat16
value lies in (5, 5.03125). A slot holds the weighted mean of the last <= 12 tokens of its
merge run, the key rotated (RoPE) at the position of the run's latest token, with dim D-1
zeroed again after the rotation; values are not rotated. The per-token update and decode
attention are the kernels in kernels/dmc.py (Triton on CUDA, PyTorch references elsewhere).

Memory: one pool of pages of ``page_size`` slots (K and V) for all layers, handed out to a
(layer, batch row, KV head) when its slots fill its pages, checked once per token for all
layers. The running sums and the window of the last 12 weighted keys/values are float32.

Limits: the batch rows share positions (prompts of one length); each token reads the slot
counts back to the host once (page allocation), so a step is not CUDA-graph capturable. The
parallel prefill and a Medusa tree attend through kernels/dmc.py's tree attention (the cached
slots plus the new ones under a visibility mask), a prefill in chunks of 256 query tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dmc import (WEIGHT_EPS, dmc_decode_attention, dmc_tree_attention, dmc_tree_slots_cpu, dmc_update,
                         use_cpu_tree_slots)

from engine.config import ModelConfig
from engine.decoding.base import Decoder
from engine.errors import EngineError

INIT_VAL = 5.0  # --dmc-init-val of the released checkpoints
WINDOW = 12  # --dmc-window-size of the released checkpoints (the reference kernel hard-codes 12)
TREE_INDEXES_KEPT = 32  # trees whose gather indices a DMCForward keeps (see _tree_index)
PREFILL_CHUNK = 256  # query tokens per attention call in the parallel prefill


def dmc_settings(args: dict) -> dict:
    """DMCForward's init_val and window from a checkpoint's stored args (read_megatron_checkpoint's
    info["args"]), where the training run recorded them; the released defaults otherwise. The
    reference decoder uses a window of 12 whatever the args say, unless the window is 0 (an
    unbounded running mean, which DMCForward does not implement)."""
    window = args.get("dmc_window_size", WINDOW)
    if window is not None and int(window) == 0:
        raise EngineError("DMC with dmc_window_size 0 (unbounded running means) is not supported")
    return {"init_val": float(args.get("dmc_init_val") or INIT_VAL), "window": WINDOW}


class DMCCache:
    """Slots of all layers in one page pool, plus each layer's DMC state.

    k_pages, v_pages [num_pages, P, D]; block_table [layers, B, Hkv, max_pages] int32 (-1 where
    no page); lens [layers, B, Hkv] int32 (slots in use); ksum, vsum [layers, B, Hkv, D],
    wsum [layers, B, Hkv], win_k, win_v [layers, W, B, Hkv, D], win_w [layers, W, B, Hkv] float32;
    run [layers, B, Hkv] int32 (tokens in the current slot's merge run)."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int, device, dtype, page_size: int = 16,
                 window: int = WINDOW):
        if page_size < 16 or page_size & (page_size - 1):
            raise EngineError(f"DMC page size {page_size}: must be a power of two, at least 16")
        self.cfg, self.max_len, self.batch = cfg, max_len, batch
        self.device, self.dtype = torch.device(device), dtype
        self.page_size, self.window = page_size, window
        nl, nkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        rows = (nl, batch, nkv)
        f32 = dict(device=self.device, dtype=torch.float32)
        i32 = dict(device=self.device, dtype=torch.int32)
        self.block_table = torch.full((*rows, -(-max_len // page_size)), -1, **i32)
        self.lens = torch.zeros(rows, **i32)
        self.run = torch.zeros(rows, **i32)
        self.ksum = torch.zeros(*rows, d, **f32)
        self.vsum = torch.zeros(*rows, d, **f32)
        self.wsum = torch.zeros(rows, **f32)
        self.win_k = torch.zeros(nl, window, batch, nkv, d, **f32)
        self.win_v = torch.zeros(nl, window, batch, nkv, d, **f32)
        self.win_w = torch.ones(nl, window, batch, nkv, **f32)
        self._pages_per_row = torch.zeros(rows, dtype=torch.int32)  # host copy of the table's fill
        self.k_pages = self.v_pages = None
        self.pages_used = 0
        self.length = 0  # tokens held

    # ---- pages ---------------------------------------------------------------------------
    def _grow_pool(self, need: int):
        have = 0 if self.k_pages is None else self.k_pages.shape[0]
        if need <= have:
            return
        size = max(need, 2 * have, self._pages_per_row.numel())
        shape = (size, self.page_size, self.cfg.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if have:
            k[:have], v[:have] = self.k_pages, self.v_pages
        self.k_pages, self.v_pages = k, v

    def reserve(self):
        """Before a token: a new page for every (layer, row, head) whose pages are full (the
        token adds at most one slot to each). One device-to-host copy of the lengths."""
        self._add_pages((self.lens.cpu() == self._pages_per_row * self.page_size).to(torch.int32))

    def ensure_pages(self, layers: slice, need: torch.Tensor):
        """At least need[l, b, h] pages (a host int tensor [L', B, Hkv]) for each head of the
        layers ``layers``."""
        extra = torch.zeros_like(self._pages_per_row)
        extra[layers] = (need.to(torch.int32) - self._pages_per_row[layers]).clamp(min=0)
        self._add_pages(extra)

    def _add_pages(self, extra: torch.Tensor):
        """extra[l, b, h] more pages (host int32, shaped like the rows) from the pool."""
        flat_extra = extra.flatten()
        n = int(flat_extra.sum())
        if n == 0:
            return
        have = self._pages_per_row.flatten()
        if int((have + flat_extra).max()) > self.block_table.shape[-1]:
            raise EngineError(f"context full: {self.length + 1} tokens exceed the context size of {self.max_len}")
        self._grow_pool(self.pages_used + n)
        rows = torch.arange(flat_extra.numel()).repeat_interleave(flat_extra)
        run_start = flat_extra.cumsum(0) - flat_extra
        cols = have[rows] + (torch.arange(n) - run_start[rows])
        pages = torch.arange(self.pages_used, self.pages_used + n, dtype=torch.int32)
        table = self.block_table.view(-1, self.block_table.shape[-1])
        table[rows.to(self.device), cols.to(self.device)] = pages.to(self.device)
        self._pages_per_row += extra
        self.pages_used += n

    def pages_held(self, layer: int) -> int:
        """The most pages a head of one layer holds (from the host copy: no read-back)."""
        return int(self._pages_per_row[layer].max())

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V page pools (allocated, at their smallest, before the first token)."""
        if self.k_pages is None:
            self._grow_pool(1)
        return self.k_pages, self.v_pages

    def layer_state(self, layer: int) -> tuple:
        """The arguments of kernels.dmc.dmc_update for one layer (views, updated in place)."""
        return (self.ksum[layer], self.vsum[layer], self.wsum[layer], self.win_k[layer], self.win_v[layer],
                self.win_w[layer], self.run[layer], self.lens[layer])

    def write(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, Hkv, D] at slot [B, Hkv] of each head of one layer (pages reserved)."""
        d = self.cfg.head_dim
        slot = slot.long()
        page = self.block_table[layer].gather(2, (slot // self.page_size)[..., None])[..., 0].long()
        flat = (page * self.page_size + slot % self.page_size).reshape(-1)
        self.k_pages.view(-1, d).index_copy_(0, flat, k.reshape(-1, d).to(self.dtype))
        self.v_pages.view(-1, d).index_copy_(0, flat, v.reshape(-1, d).to(self.dtype))

    def layer_cache(self, layer: int) -> tuple:
        """The cache arguments of kernels.dmc.dmc_decode_attention for one layer."""
        return self.k_pages, self.v_pages, self.block_table[layer], self.lens[layer]

    # ---- bookkeeping -----------------------------------------------------------------------
    def reset(self):
        """Empty: every page back to the pool (kept allocated), the state cleared."""
        self.block_table.fill_(-1)
        self._pages_per_row.zero_()
        for t in (self.lens, self.run, self.ksum, self.vsum, self.wsum, self.win_k, self.win_v):
            t.zero_()
        self.win_w.fill_(1.0)
        self.pages_used = 0
        self.length = 0

    def free(self):
        self.reset()
        self.k_pages = self.v_pages = None

    def _slot_bytes(self) -> int:
        return 2 * self.cfg.head_dim * torch.empty((), dtype=self.dtype).element_size()  # K and V

    def slots(self) -> int:
        return int(self.lens.sum())

    def nbytes_used(self) -> int:
        """K and V bytes of the slots in use, all layers and heads."""
        return self.slots() * self._slot_bytes()

    def nbytes_allocated(self) -> int:
        """K and V bytes of the pages handed out."""
        return self.pages_used * self.page_size * self._slot_bytes()

    def nbytes_dense(self) -> int:
        """What a plain KV cache holds for the same tokens."""
        cfg = self.cfg
        return self.length * cfg.num_layers * self.batch * cfg.num_kv_heads * self._slot_bytes()

    def nbytes_state(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ksum, self.vsum, self.wsum, self.win_k,
                                                           self.win_v, self.win_w, self.run, self.lens))


class DMCForward:
    """A LlamaModel run with a DMC cache instead of the dense one (see the module docstring)."""

    def __init__(self, model, batch: int = 1, max_len: int | None = None, page_size: int = 16,
                 init_val: float = INIT_VAL, window: int = WINDOW):
        cfg = model.cfg
        if int(window) < 1:
            raise EngineError(f"DMC window {window}: must be at least 1")
        self.model = model
        self.init_val, self.window = float(init_val), int(window)
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.cache = DMCCache(cfg, self.max_len, batch, model.device, model.dtype, page_size, window)
        self._last_dim = torch.arange(cfg.head_dim, device=model.device) == cfg.head_dim - 1
        self._kv_keep = torch.cat([~self._last_dim, torch.ones_like(self._last_dim)]).float()  # [k | v]: k's D-1 out
        self.prefill_chunk = PREFILL_CHUNK
        self._tree_indexes: dict[int, tuple] = {}  # id(parents) -> (parents, index tensors): see _tree_index
        self._tree = None  # the last tree pass's nodes, for commit

    @property
    def length(self) -> int:
        return self.cache.length

    def reset(self):
        self.cache.reset()

    def free(self):
        self.cache.free()

    def stats(self) -> dict:
        c = self.cache
        used, dense = c.nbytes_used(), c.nbytes_dense()
        return {"kv_cache_bytes": used, "kv_cache_bytes_allocated": c.nbytes_allocated(),
                "kv_cache_bytes_dense": dense, "kv_compression": dense / used if used else 1.0,
                "kv_cache_state_bytes": c.nbytes_state(), "tokens": c.length, "slots": c.slots()}

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (rotate-half, signed-sin table) of heads whose dim D-1 is zeroed before and after."""
        x = x.masked_fill(self._last_dim, 0)
        x = torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
        return x.masked_fill(self._last_dim, 0)

    def _check(self, ids: torch.Tensor, t: int):
        if ids.shape[0] != self.cache.batch:
            raise EngineError(f"DMC: {ids.shape[0]} sequences given to a cache made for {self.cache.batch}")
        if self.length + t > self.max_len:
            raise EngineError(f"context full: {self.length + t} tokens exceed the context size of {self.max_len}")

    # ---- one token -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per batch row (ids [B] or [B, 1]) at position self.length; logits [B, vocab]."""
        model, cfg, cache = self.model, self.model.cfg, self.cache
        ids = ids.reshape(-1, 1).to(model.device)
        self._check(ids, 1)
        bsz = ids.shape[0]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pos = cache.length
        cos, sin = model.rope(pos + 1)
        cos, sin = cos[pos], sin[pos]
        ptr, first = pos % self.window, pos == 0
        cache.reserve()
        x = F.embedding(ids, model.embed)
        for li, layer in enumerate(model.layers):
            qkv = model.qkv(layer, x).view(bsz, nh + 2 * nkv, d)
            q, k, v = qkv[:, :nh], qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
            k_slot, v_slot, slot = dmc_update(q, k, v, *cache.layer_state(li), ptr, first, self.init_val,
                                              self.window)
            qk = self._rotate(torch.cat([q, k_slot], dim=1), cos, sin)
            cache.write(li, slot, qk[:, nh:], v_slot)
            attn = dmc_decode_attention(qk[:, :nh], *cache.layer_cache(li))
            x = layer.o(attn.reshape(bsz, 1, cfg.q_size), residual=x)
            x = model.mlp(layer, x)
        cache.length = pos + 1
        return model.logits(model.final_norm(x[:, 0]))

    # ---- a prompt --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, parallel: bool = True, all_logits: bool = False,
                with_hidden: bool = False):
        """Run a prompt ids [B, T] after the tokens already held; logits of its last token
        [B, vocab] (all of them, [B, T, vocab], with ``all_logits``; and the final-normed hidden
        states with ``with_hidden``: (logits, hidden), parallel only). ``parallel``: all T tokens
        at once per layer, with the same merges, slots and state as running them one by one
        (which ``parallel=False`` does)."""
        ids = ids.to(self.model.device)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise EngineError("DMC prefill: expected token ids [batch, tokens] with at least one token")
        self._check(ids, ids.shape[1])
        if parallel:
            hidden = self._prefill_parallel(ids, all_logits)
            logits = self.model.logits(hidden)
            return (logits, hidden) if with_hidden else logits
        out = [self.step(ids[:, i]) for i in range(ids.shape[1])]
        return torch.stack(out, dim=1) if all_logits else out[-1]

    def _prefill_parallel(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Final-normed hidden states of the last token (all, with ``all_logits``): every layer's
        ``layer_prefill`` in turn."""
        model, cache = self.model, self.cache
        x = F.embedding(ids, model.embed)
        for li, layer in enumerate(model.layers):
            x = self.layer_prefill(li, layer, x)
        cache.length += ids.shape[1]
        if not all_logits:
            x = x[:, -1]
        return model.final_norm(x)

    def layer_prefill(self, li: int, layer, x: torch.Tensor) -> torch.Tensor:
        """Hidden states ``x`` [B, T, H] of T new tokens (after the cache's ``length``) through
        ``layer`` in the place of layer ``li``, whose slots and state it stores; the caller
        advances ``length`` once every layer has run (FP8 calibration runs it one layer at a
        time, engine/model/gptq.py). Per layer, for all T new tokens at once: the decisions and
        weights; each token's slot content, the weighted mean of the last <= W tokens of its merge
        run (a banded sum over the window buffer's tokens and the new ones); attention of token i
        over the cached slots still there (all but the last, which a merge of the first new token
        replaces), the new slots final by then (tokens j < i whose next token appends) and its
        own; then the slots and the state of the last token, as T token-by-token steps would
        leave them."""
        model, cfg, cache = self.model, self.model.cfg, self.cache
        bsz, t = x.shape[:2]
        start = cache.length
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        groups, win = nh // nkv, self.window
        cos, sin = model.rope(start + t)
        cos, sin = cos[start:start + t, None], sin[start:start + t, None]  # [T, 1, D]
        pos = torch.arange(start, start + t, device=x.device)[None, :, None]  # [1, T, 1]
        qkv = model.qkv(layer, x).view(bsz, t, nh + 2 * nkv, d)
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
        merge = k[..., d - 1].float() > self.init_val  # [B, T, Hkv]
        if start == 0:
            merge[:, 0] = False
        w = torch.sigmoid(q[..., d - 1].float().view(bsz, t, nkv, groups).mean(-1) + self.init_val) + WEIGHT_EPS
        kw = k.float().masked_fill(self._last_dim, 0) * w[..., None]
        vw = v.float() * w[..., None]
        # first token (absolute position) of each token's merge run, and of its window
        old_start = (start - cache.run[li].long())[:, None]  # [B, 1, Hkv]; unused when start == 0
        run_start = torch.where(merge, -1, pos).cummax(dim=1).values
        run_start = torch.where(run_start < 0, old_start, run_start)
        lo = torch.maximum(run_start, pos - (win - 1))
        ksum, vsum, wsum = self._window_sums(li, kw, vw, w, lo)
        k_slot = (ksum / wsum[..., None]).to(k.dtype)
        v_slot = (vsum / wsum[..., None]).to(v.dtype)
        qk = self._rotate(torch.cat([q, k_slot], dim=2), cos, sin)
        qr, kr = qk[:, :, :nh], qk[:, :, nh:]
        # slot of token j is still there for token i > j iff token j+1 appends
        final = torch.ones_like(merge)
        final[:, :-1] = ~merge[:, 1:]
        attn = self._prefill_attention(li, qr, kr, v_slot, self._chain_visible(final), merge[:, 0])
        self._store(slice(li, li + 1), *(a[None] for a in (merge, kr, v_slot, kw, vw, w, ksum, vsum, wsum,
                                                            run_start)))
        x = layer.o(attn, residual=x)
        return model.mlp(layer, x)

    def _window_sums(self, li: int, kw: torch.Tensor, vw: torch.Tensor, w: torch.Tensor, lo: torch.Tensor):
        """For each new token (position start + i), the sums of kw, vw [B, T, Hkv, D] and w
        [B, T, Hkv] over positions lo[i]..start + i, the positions before start read from the
        window buffer (it holds the last W tokens): W shifted copies, masked."""
        cache, win = self.cache, self.window
        start, t = cache.length, kw.shape[1]
        back = min(start, win - 1)  # earlier tokens a window can reach
        if back:
            hist = [(start - back + j) % win for j in range(back)]
            kw = torch.cat([cache.win_k[li, hist].transpose(0, 1), kw], dim=1)
            vw = torch.cat([cache.win_v[li, hist].transpose(0, 1), vw], dim=1)
            w = torch.cat([cache.win_w[li, hist].transpose(0, 1), w], dim=1)
        pos = torch.arange(start, start + t, device=kw.device)[None, :, None]
        ksum = torch.zeros(kw.shape[0], t, *kw.shape[2:], dtype=kw.dtype, device=kw.device)
        vsum, wsum = torch.zeros_like(ksum), torch.zeros_like(w[:, :t])
        for o in range(min(win, back + t)):
            first = max(0, o - back)  # new tokens whose position - o is held
            src = slice(back + first - o, back + t - o)
            take = (pos[:, first:] - o) >= lo[:, first:]
            ksum[:, first:] += kw[:, src] * take[..., None]
            vsum[:, first:] += vw[:, src] * take[..., None]
            wsum[:, first:] += w[:, src] * take
        return ksum, vsum, wsum

    @staticmethod
    def _chain_visible(final: torch.Tensor):
        """For T tokens in a row: token i sees the slot of token j < i iff final[j] (token j + 1
        appends), and its own. final [B, T, Hkv] -> the mask of query rows c0..c1 - 1 over the
        first c1 tokens, [B, Hkv, c1 - c0, c1], made per chunk (a whole [T, T] mask of a long
        prompt would not be small)."""
        final_t = final.permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, 1, T]
        idx = torch.arange(final.shape[1], device=final.device)

        def rows(c0: int, c1: int) -> torch.Tensor:
            r, c = idx[c0:c1, None], idx[None, :c1]
            return ((r > c) & final_t[..., :c1]) | (r == c)

        return rows

    def _prefill_attention(self, li, q, k, v, visible_new, first_merges):
        """Token i attends to the cached slots still there and to the new slots ``visible_new``
        lets it see (never a later token's: j <= i): ``visible_new(c0, c1)`` is the mask of query
        rows c0..c1 - 1 over the first c1 new tokens [B, Hkv, c1 - c0, c1]. q [B, T, H, D], k, v
        [B, T, Hkv, D], first_merges [B, Hkv]: the first new token merges into the last cached
        slot -> [B, T, H * D]. kernels/dmc.py's tree attention, in chunks of query tokens."""
        cache = self.cache
        bsz, t, nh, d = q.shape
        qh, kh, vh = q.permute(0, 2, 1, 3), k.transpose(1, 2), v.transpose(1, 2)
        # every cached slot but the last; the last too unless the first new token merges into it
        n_cached = cache.lens[li] - first_merges.to(torch.int32)
        k_pages, v_pages = cache.pool()
        pages = cache.pages_held(li) if cache.length else 0
        args = (k_pages, v_pages, cache.block_table[li], n_cached)
        if t <= self.prefill_chunk:
            out = dmc_tree_attention(qh, kh, vh, visible_new(0, t), *args, cached_pages=pages)
        else:
            out = torch.empty(bsz, nh, t, d, dtype=q.dtype, device=q.device)
            for c0 in range(0, t, self.prefill_chunk):
                c1 = min(t, c0 + self.prefill_chunk)
                out[:, :, c0:c1] = dmc_tree_attention(qh[:, :, c0:c1], kh[:, :, :c1], vh[:, :, :c1],
                                                      visible_new(c0, c1), *args, cached_pages=pages)
        return out.transpose(1, 2).reshape(bsz, t, nh * d)

    def _store(self, layers: slice, merge, kr, v_slot, kw, vw, w, ksum, vsum, wsum, run_start):
        """The new tokens into the cache of the layers ``layers`` (a slice of them: a prefill
        stores one layer at a time, a tree's accepted path all at once), as token-by-token steps
        would leave it: the final tokens' keys and values into their slots (a token is final
        when the next one appends, or it is the last), then the state after the last token:
        slot counts, run lengths, sums, and the window buffer's entries of the new tokens.
        merge, w, run_start [L', B, T, Hkv]; kr, v_slot, kw, vw, ksum, vsum [L', B, T, Hkv, D],
        wsum [L', B, T, Hkv]."""
        cache, win, page = self.cache, self.window, self.cache.page_size
        t, d = kr.shape[2], kr.shape[-1]
        start = cache.length
        slot_of = cache.lens[layers].long()[:, :, None] - 1 + (~merge).long().cumsum(2)  # [L', B, T, Hkv]
        lens_new = slot_of[:, :, -1] + 1
        cache.ensure_pages(layers, -(-lens_new.cpu() // page))
        final = torch.ones_like(merge)
        final[:, :, :-1] = ~merge[:, :, 1:]
        idx = final.nonzero(as_tuple=True)  # (layer, row, token, head) of each final token
        s = slot_of[idx]
        pages = cache.block_table[layers][idx[0], idx[1], idx[3], s // page].long()
        flat = pages * page + s % page
        cache.k_pages.view(-1, d).index_copy_(0, flat, kr[idx].to(cache.dtype))
        cache.v_pages.view(-1, d).index_copy_(0, flat, v_slot[idx].to(cache.dtype))
        cache.lens[layers] = lens_new.to(torch.int32)
        cache.run[layers] = (start + t - run_start[:, :, -1]).to(torch.int32)
        cache.ksum[layers], cache.vsum[layers], cache.wsum[layers] = ksum[:, :, -1], vsum[:, :, -1], wsum[:, :, -1]
        new = list(range(max(0, t - win), t))  # the new tokens the window buffer keeps
        at = [(start + j) % win for j in new]
        cache.win_k[layers, at] = kw[:, :, new].transpose(1, 2)
        cache.win_v[layers, at] = vw[:, :, new].transpose(1, 2)
        cache.win_w[layers, at] = w[:, :, new].transpose(1, 2)

    # ---- a Medusa tree -----------------------------------------------------------------------
    def _tree_index(self, parents: torch.Tensor, depth: torch.Tensor) -> dict:
        """What the tree pass gathers with, computed once per tree: ``up`` [A, N], the ancestor o
        levels above each node (o = 0: itself; clamped, ``not_up`` [A, N, 1] where there is none),
        its depth ``up_depth``; ``child`` [N, N], the node below ancestor j on node i's path,
        ``strict`` [N, N, 1] where j is a strict ancestor of i, ``eye`` [N, N, 1] where j is i;
        ``windows[back]``, for each ``back`` in 0..W-1 cached
        tokens a window reaches: per window offset o < W, where the token o above node i is in
        [the window buffer's last ``back`` tokens, the nodes] and whether it is there at all;
        ``rel`` [W, N], that token's position after the root (depth - o)."""
        known = self._tree_indexes.get(id(parents))
        if known is not None and known[0] is parents:
            return known[1]
        n, win, dev = parents.numel(), self.window, parents.device
        levels = int(depth.max()) + 1
        up = [torch.arange(n, device=dev)]
        for _ in range(max(win, levels) - 1):
            a = up[-1]
            up.append(torch.where(a >= 0, parents[a.clamp(min=0)], -1))
        ups = torch.stack(up)  # [max(W, levels), N]
        anc = ups[:levels]
        child = torch.zeros(n, n, dtype=torch.long, device=dev)
        strict = torch.zeros(n, n, dtype=torch.bool, device=dev)
        rows = torch.arange(n, device=dev)
        for o in range(1, levels):
            ok = anc[o] >= 0
            child[rows[ok], anc[o][ok]] = anc[o - 1][ok]
            strict[rows[ok], anc[o][ok]] = True
        above_root = torch.arange(win, device=dev)[:, None] - depth[None, :]  # o - depth: > 0 above the root
        windows = []
        for back in range(win):
            src = torch.where(ups[:win] >= 0, back + ups[:win], back - above_root)
            there = (src >= 0) & ((ups[:win] >= 0) | (above_root <= back))
            windows.append((src.clamp(min=0), there))
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        index = {"up": anc.clamp(min=0), "not_up": (anc < 0)[:, :, None], "up_depth": depth[anc.clamp(min=0)],
                 "child": child, "strict": strict[:, :, None], "eye": eye[:, :, None], "windows": windows,
                 "rel": -above_root}
        # decoding verifies one tree; choosing it times a dozen in turn, each with its index kept
        # (built in every call, it would be counted in the smaller trees' step times)
        if len(self._tree_indexes) >= TREE_INDEXES_KEPT:
            self._tree_indexes.pop(next(iter(self._tree_indexes)))
        self._tree_indexes[id(parents)] = (parents, index)
        return index

    @torch.inference_mode()
    def tree_hidden(self, ids: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """The N nodes ``ids`` [1, N] of a candidate tree (node 0 the root, at position
        self.length; ``parents`` [N] with -1 for the root, ``depth`` [N]; a parent's id is below
        its children's) run over the cache without changing it: each node sees what token-by-token
        DMC decoding of its root-to-node path would show it, its ancestors' keys and values
        appended or merged as their decisions say. Returns final-normed hidden states [N, H]; the
        nodes' slots and state wait in ``self._tree`` for ``commit`` of the accepted path.

        Per layer, the nodes' slots are those of kernels/dmc.py's ``dmc_tree_slots`` (one call on
        a CPU with the C++ kernels; PyTorch operations otherwise, ``_tree_slots``), and they
        attend through its tree attention."""
        model, cfg, cache = self.model, self.model.cfg, self.cache
        if ids.shape[0] != 1:
            raise EngineError("DMC: a Medusa tree is verified for one sequence at a time")
        tix = self._tree_index(parents, depth)
        self._check(ids, tix["up"].shape[0])
        n, start, nh = ids.shape[1], cache.length, cfg.num_heads
        cos, sin = model.rope(start + n)
        cos, sin = cos[start + depth], sin[start + depth]  # [N, D]
        fast = use_cpu_tree_slots(ids.device, model.dtype)
        if not fast:
            prep = self._tree_slots_prep(tix, depth)
        saved = []
        x = F.embedding(ids, model.embed)
        for li, layer in enumerate(model.layers):
            qkv = model.qkv(layer, x).view(n, nh + 2 * cfg.num_kv_heads, cfg.head_dim)
            if fast:
                qk, v_slot, merge, visible, feat, sums, run_start = dmc_tree_slots_cpu(
                    qkv, cos, sin, parents, depth, cache.win_k[li, :, 0], cache.win_v[li, :, 0],
                    cache.win_w[li, :, 0], cache.run[li, 0], start, self.init_val, nh)
            else:
                qk, v_slot, merge, visible, feat, sums, run_start = self._tree_slots(li, qkv, cos, sin, tix, prep)
            visible = visible[None]  # [1, Hkv, N, N]
            attn = self._prefill_attention(li, qk[None, :, :nh], qk[None, :, nh:], v_slot[None],
                                           lambda c0, c1: visible[:, :, c0:c1, :c1], merge[None, 0])
            saved.append((merge, qk[:, nh:], v_slot, feat, sums, run_start))
            x = layer.o(attn, residual=x)
            x = model.mlp(layer, x)
        self._tree = saved
        return model.final_norm(x[0])

    def _tree_slots_prep(self, tix: dict, depth: torch.Tensor) -> dict:
        """What ``_tree_slots`` reads in every layer of one tree pass."""
        cache, start, win = self.cache, self.cache.length, self.window
        back = min(start, win - 1)  # cached tokens a window can reach
        src, held = tix["windows"][back]
        prep = {"back": back, "src": src,
                # the position of the token at window offset o above node i; -1 (below every run) where none
                "at": torch.where(held, start + tix["rel"], -1)[:, :, None],  # [W, N, 1]
                "up_pos": (start + tix["up_depth"])[:, :, None],  # [A, N, 1]
                "oldest": (start + depth - (win - 1))[:, None],  # [N, 1]: the first position a window reaches
                "run_before": start - cache.run[:, 0].long()}  # [L, Hkv]: where the cached open run began
        if back:  # the window buffer's last ``back`` tokens as feature rows, all layers: [L, back, Hkv, 2D+1]
            hist = [(start - back + j) % win for j in range(back)]
            prep["history"] = torch.cat([cache.win_k[:, hist, 0], cache.win_v[:, hist, 0],
                                         cache.win_w[:, hist, 0, :, None]], dim=-1)
        return prep

    def _tree_slots(self, li: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tix: dict, prep: dict):
        """One layer's slots of the tree's nodes with PyTorch operations: what kernels/dmc.py's
        ``dmc_tree_slots_cpu`` returns (see there). A node's weighted key, value and weight are
        one feature row per KV head [k * w (dim D-1 zeroed) | v * w | w], so that its slot's
        window sums are one gather and one sum over the window offsets."""
        cfg = self.model.cfg
        n, nh, nkv, d = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        last = qkv[:, :, d - 1].float()  # the weight (q) and decision (k) neurons
        merge = last[:, nh:nh + nkv] > self.init_val  # [N, Hkv]
        if self.cache.length == 0:
            merge[0] = False
        w = torch.sigmoid(last[:, :nh].view(n, nkv, nh // nkv).mean(-1) + self.init_val) + WEIGHT_EPS
        kv = qkv[:, nh:].view(n, 2, nkv, d).transpose(1, 2).reshape(n, nkv, 2 * d)
        feat = torch.cat([kv.float() * (w[..., None] * self._kv_keep), w[..., None]], dim=-1)  # [N, Hkv, 2D+1]
        # a node's run starts at its nearest ancestor-or-self that appends (else in the cache)
        run_start = torch.where(merge[tix["up"]] | tix["not_up"], prep["run_before"][li], prep["up_pos"]).amax(0)
        ext = torch.cat([prep["history"][li], feat]) if prep["back"] else feat
        take = (prep["at"] >= torch.maximum(run_start, prep["oldest"])).to(feat.dtype)  # [W, N, Hkv]
        sums = (ext[prep["src"]] * take[..., None]).sum(0)  # [N, Hkv, 2D+1]
        kv_slot = (sums[..., :2 * d] / sums[..., 2 * d:]).to(qkv.dtype)
        qk = self._rotate(torch.cat([qkv[:, :nh], kv_slot[..., :d]], dim=1), cos[:, None], sin[:, None])
        # node i sees ancestor j's slot iff the child of j on i's path appends; and its own
        visible = (tix["eye"] | (tix["strict"] & ~merge[tix["child"]])).permute(2, 0, 1)  # [Hkv, N, N]
        return qk, kv_slot[..., d:], merge, visible, feat, sums, run_start

    @torch.inference_mode()
    def commit(self, path: torch.Tensor) -> None:
        """Keep the nodes ``path`` [A] (node ids from the root down) of the last ``tree_hidden``:
        their slots and state enter the cache, all layers at once, as A token-by-token steps
        would leave them."""
        if len(path) == 0:
            self._tree = None
            return
        d = self.model.cfg.head_dim
        merge, kr, v_slot, feat, sums, run_start = (torch.stack(f).index_select(1, path)[:, None]
                                                    for f in zip(*self._tree))  # [L, 1, A, ...]
        self._store(slice(None), merge, kr, v_slot, feat[..., :d], feat[..., d:2 * d], feat[..., 2 * d],
                    sums[..., :d], sums[..., d:2 * d], sums[..., 2 * d], run_start)
        self.cache.length += len(path)
        self._tree = None


def calibration_pass(settings: dict):
    """For FP8 calibration with DMC (engine/model/gptq.py's ``layer_pass``): text carried
    through one layer at a time as DMC decodes it, its attention over the compressed slots (the
    layer inputs the quantized weights will see). ``settings``: DMCForward's init_val, window."""
    def make(model, batch: int, length: int):
        dmc = DMCForward(model, batch, length, **settings)

        def run(li: int, layer, x: torch.Tensor) -> torch.Tensor:
            dmc.reset()  # each call is the whole text through one layer, from an empty cache
            return dmc.layer_prefill(li, layer, x)
        return run
    return make


class DMCDecoder(Decoder):
    """DMC decoding: one token per step through a DMC cache. Merges cannot be undone, so the
    cache is reused only when everything it holds is a prefix of the new prompt (the next turn
    of the same chat); otherwise it is emptied and the whole prompt prefilled."""

    name = "dmc"

    def __init__(self, model, context: int, *, init_val: float = INIT_VAL, window: int = WINDOW):
        super().__init__(model, context)
        self.dmc = DMCForward(model, 1, context, init_val=init_val, window=window)

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache brought to hold ``prompt``; the logits [vocab] and the final-normed hidden
        state [H] after its last token."""
        held = len(self.cached_ids)
        if not (0 < held < len(prompt) and self.cached_ids == prompt[:held]):
            self.reset()
            held = 0
        logits, hidden = self.dmc.prefill(self._ids(prompt[held:]), with_hidden=True)
        self.cached_ids = list(prompt)
        return logits[0], hidden[0]

    def generate(self, prompt, params, sampler, eos):
        logits, _ = self.prefill(prompt)
        dmc = self.dmc
        return (yield from self._one_token_steps(
            logits, params, sampler, eos, lambda: dmc.length >= self.context,
            lambda tok: dmc.step(torch.tensor([tok], device=self.model.device))[0]))

    def kv_bytes(self) -> tuple[int, int]:
        c = self.dmc.cache
        return c.nbytes_used(), c.nbytes_dense()

    def reset(self) -> None:
        super().reset()
        self.dmc.reset()

    def free(self) -> None:
        super().free()
        self.dmc.free()
