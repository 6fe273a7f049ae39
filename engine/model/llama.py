"""Our Llama forward pass (Llama 2, Llama 3.x, SmolLM2): RMSNorm, RoPE, grouped-query
attention over a preallocated KV cache, SwiGLU, tied or untied embeddings.

Weights are kept as [in_features, out_features] and q/k/v and gate/up are fused: at batch 1
the matmuls are weight-read bound, and this layout reads each weight once, in order.

The model is plain tensors and ``Linear`` kinds, not ``torch.nn`` modules: nothing is trained
here (training/ builds its own modules around these weights), and a decode step on a CPU is
dominated by per-op overhead that module dispatch would add to. The layer body is written once:
``attention_input`` (norm, fused qkv, RoPE) and ``mlp`` serve the dense forward, the static
CUDA-graph step, the tree verify pass and the DMC decoder (engine/decoding/dmc.py).

Entry points: ``forward`` (logits of the last token), ``forward_all`` (logits of every token),
``hidden`` / ``last_hidden`` (final-normed hidden states), ``tree_hidden`` (a Medusa tree's nodes), the static
``decode_step`` / ``tree_step`` for CUDA graphs, ``layer_pass`` (one layer, for calibration) and
``logits`` (of chosen hidden rows). Weights are assembled by engine/model/weights.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_gemm, cpu_layer
from kernels.tree_attention import tree_attention

from engine.config import ModelConfig
from engine.errors import EngineError
from engine.model.kv_cache import KVCache
from engine.model.linear import Fp8Linear, Linear
from engine.model.rope import cos_sin_table


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear | Fp8Linear
    o: Linear | Fp8Linear
    mlp_norm: torch.Tensor
    gate_up: Linear | Fp8Linear
    down: Linear | Fp8Linear


LINEARS = ("qkv", "o", "gate_up", "down")  # a Layer's linear layers
# tokens up to which a CPU layer runs as one call (kernels/cpu_layer.py): decode steps and Medusa
# trees; a longer prompt's prefill is left to the GEMM library's large-M kernels
FUSED_ROWS = cpu_gemm.SMALL_M


class LlamaModel:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 lm_head: Linear, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.device = device
        self.dtype = dtype
        self._cos = self._sin = None
        self._stack = None  # (the projections it was built from, the CPU kernel's LayerStack)

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, max_len, batch, self.device, self.dtype)

    # ---- the layer body, shared by every pass ------------------------------------------------
    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / signed sin [L, D] for positions 0..length-1 at least; grown by doubling."""
        have = 0 if self._cos is None else self._cos.shape[0]
        if have < length:
            self._cos, self._sin = cos_sin_table(self.cfg, max(length, 2 * have, 256), self.device, self.dtype)
        return self._cos, self._sin

    def qkv(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The fused q|k|v projection of the normed input [..., q_size + 2 * kv_size], unrotated."""
        return layer.qkv(F.rms_norm(x, (self.cfg.hidden_size,), layer.attn_norm, self.cfg.rms_norm_eps))

    def attention_input(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normed input -> q [B, H, T, D], k and v [B, Hkv, T, D], q and k rotated (cos/sin [T, 1, D]).
        q and k heads are rotated together: x*cos + rotate_half(x)*sin, with rotate_half done as
        a roll by D/2 against a sin table whose first half is negated."""
        cfg = self.cfg
        bsz, t = x.shape[:2]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qk_size = cfg.q_size + cfg.kv_size
        qkv = self.qkv(layer, x)
        qk = qkv[..., :qk_size].view(bsz, t, nh + nkv, d)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
        v = qkv[..., qk_size:].view(bsz, t, nkv, d).transpose(1, 2)
        return qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2), v

    def mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """x + SwiGLU(RMSNorm(x)). With the CPU's two-block gate|up weight the blocks are the
        gate and the up projection, taken apart with no copy."""
        cfg = self.cfg
        hn = F.rms_norm(x, (cfg.hidden_size,), layer.mlp_norm, cfg.rms_norm_eps)
        if layer.gate_up.splits == 2 and layer.gate_up.bias is None:
            gate, up = layer.gate_up.blocks(hn).view(2, *x.shape[:2], cfg.intermediate_size)
        else:
            gate, up = layer.gate_up(hn).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up, residual=x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.cfg.hidden_size,), self.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., H] -> float32 logits [..., vocab]."""
        return self.lm_head(hidden).float()

    # ---- eager passes ------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Logits [B, 1, vocab] (float32) of the last of tokens ``ids`` [B, T], run at positions
        start..start+T-1 (see ``hidden``)."""
        return self.logits(self.final_norm(self._dense(ids, cache, start)[:, -1:]))

    def forward_all(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of every token of ``ids`` (see ``hidden``)."""
        return self.logits(self.hidden(ids, cache, start))

    def hidden(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Run tokens ``ids`` [B, T] at positions start..start+T-1 (earlier positions come from
        ``cache``), store their keys/values in cache slots start..start+T-1 and return their
        final-normed hidden states [B, T, H].

        Written for few dispatched ops per layer: at batch 1 on a CPU, per-op overhead is a
        large part of a decode step."""
        return self.final_norm(self._dense(ids, cache, start))

    def last_hidden(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """``hidden(...)[:, -1]`` [B, H], the final norm applied to the last token only (a prefill:
        the heads' input and, through ``logits``, the next token's logits)."""
        return self.final_norm(self._dense(ids, cache, start)[:, -1])

    def _dense(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        t = ids.shape[1]
        cos, sin = self.rope(self._check(cache, start, t))
        mask = self._mask(start, t, self.cfg.num_heads // self.cfg.num_kv_heads)
        return self._layers(ids, cache, start, cos[start:start + t, None], sin[start:start + t, None], mask, None)

    def tree_hidden(self, ids: torch.Tensor, cache: KVCache, start: int, offsets: torch.Tensor,
                    tree_mask: torch.Tensor) -> torch.Tensor:
        """The T tokens ``ids`` [B, T] are the nodes of a candidate tree (Medusa): node i sits at
        position start + offsets[i] and attends to the whole cache and to the nodes its row of
        ``tree_mask`` [T, T] allows; their keys/values go to slots start..start+T-1. Returns
        final-normed hidden states [B, T, H]."""
        cos, sin = self.rope(self._check(cache, start, ids.shape[1]))
        positions = offsets + start
        cos, sin = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]
        return self.final_norm(self._layers(ids, cache, start, cos, sin, None, tree_mask))

    def layer_pass(self, li: int, layer: Layer, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Hidden states ``x`` [B, T, H] of tokens at positions 0..T-1 through ``layer`` in the place
        of layer ``li`` (its cache rows are overwritten): for calibrating one layer at a time."""
        t = x.shape[1]
        cos, sin = self.rope(t)
        mask = self._mask(0, t, self.cfg.num_heads // self.cfg.num_kv_heads)
        return self._layer(li, layer, x, cache, 0, cos[:t, None], sin[:t, None], mask, None)

    def _check(self, cache: KVCache, start: int, t: int) -> int:
        end = start + t
        if end > cache.max_len:
            raise EngineError(f"context full: {end} tokens exceed the context size of {cache.max_len}")
        return end

    def _layers(self, ids, cache: KVCache, start: int, cos, sin, mask, tree_mask) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        stack = self._cpu_stack(x)
        if stack is not None:  # every layer in one call (kernels/cpu_layer.py)
            cfg = self.cfg
            x = stack(x[0], cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cache.k[:, 0], cache.v[:, 0], start,
                      cos[:, 0], sin[:, 0], None if tree_mask is None else tree_mask.contiguous())[None]
        else:
            for li, layer in enumerate(self.layers):
                x = self._layer(li, layer, x, cache, start, cos, sin, mask, tree_mask)
        cache.length = start + ids.shape[1]
        return x

    def _layer(self, li: int, layer: Layer, x: torch.Tensor, cache: KVCache, start: int, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor | None, tree_mask: torch.Tensor | None) -> torch.Tensor:
        """One decoder layer of the eager passes (cos/sin [T, 1, D] of the tokens' positions)."""
        cfg = self.cfg
        bsz, t = x.shape[:2]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.attention_input(layer, x, cos, sin)
        keys, values = cache.write(li, start, k, v)
        if tree_mask is not None:
            attn = tree_attention(q, keys, values, start, tree_mask)  # Triton on CUDA
        else:
            # Grouped-query attention without copying K/V: the query heads that share a KV
            # head become extra query rows of that head.
            qg = q.reshape(bsz, nkv, (nh // nkv) * t, d).contiguous()
            if mask is None and t > 1:
                attn = F.scaled_dot_product_attention(qg, keys, values, is_causal=True)
            else:
                attn = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
            attn = attn.view(bsz, nh, t, d)
        attn = attn.transpose(1, 2).reshape(bsz, t, cfg.q_size)
        x = layer.o(attn, residual=x)
        return self.mlp(layer, x)

    def _cpu_stack(self, x: torch.Tensor) -> cpu_layer.LayerStack | None:
        """The layers as our CPU kernel takes them, where they can all run as one call: batch 1,
        float32 on a CPU, at most FUSED_ROWS tokens, every projection in the kernel's panels (not
        while calibrating, whose recorders see each projection's input). Built once, and again
        when a layer's projections are replaced."""
        if x.shape[1] > FUSED_ROWS or x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        kinds = [getattr(layer, name) for layer in self.layers for name in LINEARS]
        cached = self._stack
        if cached is not None and len(cached[0]) == len(kinds) and all(a is b for a, b in zip(cached[0], kinds)):
            return cached[1]
        panels = [getattr(kind, "cpu_panels", lambda: None)() for kind in kinds]
        if any(p is None for p in panels):
            return None
        stack = cpu_layer.LayerStack([([layer.attn_norm, layer.mlp_norm], panels[4 * i:4 * i + 4])
                                      for i, layer in enumerate(self.layers)])
        self._stack = (kinds, stack)
        return stack

    def _mask(self, start: int, t: int, groups: int) -> torch.Tensor | None:
        """Boolean attention mask for T > 1 new tokens (rows ordered group-major, as the grouped
        query rows are); None where SDPA needs none (one token) or is_causal is right."""
        if t == 1 or (start == 0 and groups == 1):
            return None
        end = start + t
        q_pos = torch.arange(start, end, device=self.device)
        mask = torch.arange(end, device=self.device)[None, :] <= q_pos[:, None]
        return mask.repeat(groups, 1)

    # ---- static passes (CUDA graphs) --------------------------------------------------------
    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step with static shapes, for CUDA-graph capture: ``ids`` [B, 1] and the
        position ``pos`` (a 0-d int64 tensor) live on the device, the cache write is an
        index_copy_ at ``pos`` and attention runs over the whole cache with positions > pos
        masked out. Same result as ``forward(ids, cache, pos)``; returns logits [B, vocab]. The
        caller advances ``pos`` and ``cache.length``."""
        at = pos.reshape(1)
        mask = (torch.arange(cache.max_len, device=self.device) <= pos)[None, :]  # [1, L]: all query rows
        x = self._static_pass(ids, at, at, mask, cache)
        return self.logits(self.final_norm(x[:, 0]))

    def tree_step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, offsets: torch.Tensor,
                  tree_mask: torch.Tensor) -> torch.Tensor:
        """``tree_hidden(ids, cache, pos, offsets, tree_mask)[0]`` with static shapes, for
        CUDA-graph capture of the Medusa verify pass: the N tree nodes ``ids`` [1, N] go to cache
        slots pos..pos+N-1 and attend over the whole cache, the prefix (slots < pos) and the tree
        slots their mask row allows. Returns final-normed hidden states [N, H]."""
        n = ids.shape[1]
        slots = pos + torch.arange(n, device=self.device)
        rel = torch.arange(cache.max_len, device=self.device) - pos  # slot - pos
        in_tree = (rel >= 0) & (rel < n)
        mask = (rel < 0)[None, :] | (tree_mask[:, rel.clamp(0, n - 1)] & in_tree[None, :])  # [N, L]
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        x = self._static_pass(ids, slots, pos + offsets, mask.repeat(groups, 1), cache)
        return self.final_norm(x[0])

    def _static_pass(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     cache: KVCache) -> torch.Tensor:
        """The layers for ``ids`` [B, T] written at cache ``slots`` [T], rotated for
        ``positions`` [T], attending over the whole cache under ``mask`` ([groups * T or 1, L],
        rows group-major); no host sync, no shape that depends on values."""
        cfg = self.cfg
        bsz, t = ids.shape
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self.rope(cache.max_len)
        cos, sin = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]
        x = F.embedding(ids, self.embed)
        for li, layer in enumerate(self.layers):
            q, k, v = self.attention_input(layer, x, cos, sin)
            cache.k[li].index_copy_(2, slots, k)
            cache.v[li].index_copy_(2, slots, v)
            qg = q.reshape(bsz, nkv, (nh // nkv) * t, d)
            attn = F.scaled_dot_product_attention(qg, cache.k[li], cache.v[li], attn_mask=mask)
            attn = attn.view(bsz, nh, t, d).transpose(1, 2).reshape(bsz, t, cfg.q_size)
            x = layer.o(attn, residual=x)
            x = self.mlp(layer, x)
        return x

    # ---- sizes -------------------------------------------------------------------------------
    def n_params(self) -> int:
        n = self.embed.numel() + sum(getattr(layer, name).in_features * getattr(layer, name).out_features
                                     for layer in self.layers for name in LINEARS)
        if not self.cfg.tie_word_embeddings:
            n += self.lm_head.in_features * self.lm_head.out_features
        return n

    def weight_bytes(self) -> int:
        n = self.embed.numel() * self.embed.element_size() + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            n += sum(getattr(layer, name).nbytes() for name in LINEARS)
            n += (layer.attn_norm.numel() + layer.mlp_norm.numel()) * layer.attn_norm.element_size()
        return n + self.lm_head.nbytes()
