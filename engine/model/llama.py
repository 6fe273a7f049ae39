"""Our Llama forward pass (Llama 2, Llama 3.x, SmolLM2): RMSNorm, RoPE, grouped-query
attention over a preallocated KV cache, SwiGLU, tied or untied embeddings.

Weights are kept as [in_features, out_features] and q/k/v and gate/up are fused: at batch 1
the matmuls are weight-read bound, and this layout reads each weight once, in order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import cpu_gemm
from kernels.tree_attention import tree_attention

from engine.formats.tensor_source import TensorSource
from engine.config import ModelConfig, load_config
from engine.errors import EngineError
from engine.model.fp8_linear import Fp8Linear
from engine.model.kv_cache import KVCache
from engine.formats.fp8 import Fp8Format, ModelOptFp8, detect
from engine.model.rope import cos_sin_table


class Linear:
    """y = x @ W (+ b) (+ residual). The one place a weight format plugs in.

    On an x86 CPU with AVX2, float32 weights are packed in 16-column panels for our small-M
    GEMM (kernels/cpu_gemm): at 1…16 rows it reads W once per call, where the GEMM library's
    cost doubles or triples from one row to a few (a Medusa tree's verify pass). Elsewhere W is
    stored as ``splits`` column blocks, [splits, in, out / splits], and multiplied with one
    batched GEMM: on a CPU without our kernel, a batch of two blocks runs on both cores and
    reads the weights ~25 % faster than one matrix product; each output is the same dot
    product as with one block."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None = None, splits: int = 1):
        k, n = weight_t.shape
        self.in_features, self.out_features, self.bias = k, n, bias
        self.packed = None
        if weight_t.device.type == "cpu" and weight_t.dtype == torch.float32 and cpu_gemm.available():
            self.packed, self.weight, self.splits = cpu_gemm.pack(weight_t), None, 1
            return
        if n % splits:
            splits = 1
        self.splits = splits
        self.weight = weight_t.view(k, splits, n // splits).transpose(0, 1).contiguous()

    @property
    def device(self) -> torch.device:
        return (self.weight if self.packed is None else self.packed).device

    def dense(self) -> torch.Tensor:
        """W as [in, out] (a copy when the storage is blocked or packed)."""
        if self.packed is not None:
            return cpu_gemm.unpack(self.packed, self.out_features)
        return self.weight.transpose(0, 1).reshape(self.in_features, self.out_features)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The product as [splits, tokens, out / splits] (no bias): for a fused weight whose
        blocks are its parts (gate | up), the parts come out separate, with no copy."""
        x2 = x.reshape(1, -1, self.in_features)
        return torch.bmm(x2.expand(self.splits, -1, -1), self.weight)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            x2 = x.reshape(-1, self.in_features).contiguous()
            r2 = None if residual is None else residual.reshape(x2.shape[0], self.out_features).contiguous()
            out = cpu_gemm.gemm(x2, self.packed, self.out_features, self.bias, r2)
            return out.view(*x.shape[:-1], self.out_features)
        if self.splits == 1:
            x2 = x.reshape(-1, self.in_features)
            if residual is not None and self.bias is None:
                return torch.addmm(residual.reshape(x2.shape[0], -1), x2, self.weight[0]).view(residual.shape)
            out = x2 @ self.weight[0]
        else:
            out = self.blocks(x).transpose(0, 1).reshape(-1, self.out_features)
        out = out.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out if residual is None else out + residual

    def nbytes(self) -> int:
        w = self.weight if self.packed is None else self.packed
        n = w.numel() * w.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def default_splits(device) -> int:
    """Column blocks per weight (see Linear): two on a CPU, one on a GPU."""
    return 2 if torch.device(device).type == "cpu" else 1


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear | Fp8Linear
    o: Linear | Fp8Linear
    mlp_norm: torch.Tensor
    gate_up: Linear | Fp8Linear
    down: Linear | Fp8Linear


def block_linears(cfg: ModelConfig, li: int) -> dict[str, tuple[list[tuple[str, tuple[int, int]]], bool]]:
    """Layer ``li``'s linear layers as chatapp fuses them: name -> ([(checkpoint name, [out, in])
    of each part, in order], has a bias)."""
    p, h, i = f"model.layers.{li}.", cfg.hidden_size, cfg.intermediate_size
    return {
        p + "qkv": ([(p + "self_attn.q_proj", (cfg.q_size, h)), (p + "self_attn.k_proj", (cfg.kv_size, h)),
                     (p + "self_attn.v_proj", (cfg.kv_size, h))], cfg.attention_bias),
        p + "o": ([(p + "self_attn.o_proj", (h, cfg.q_size))], cfg.attention_bias),
        p + "gate_up": ([(p + "mlp.gate_proj", (i, h)), (p + "mlp.up_proj", (i, h))], cfg.mlp_bias),
        p + "down": ([(p + "mlp.down_proj", (h, i))], cfg.mlp_bias),
    }


def fused_weight(src: TensorSource, names_shapes, get=None) -> torch.Tensor:
    """The parts' weights [out, in] stacked along out (``get(name, shape)``: how to read one)."""
    get = get or src.get_shaped
    return torch.cat([get(n + ".weight", s) for n, s in names_shapes], dim=0)


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

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 quantize: str | None = None, progress=lambda msg: None):
        """``quantize="fp8"``: FP8 weights rounded with error compensation calibrated on the model's
        own samples (engine/fp8_calibration.py; computed once per checkpoint, then cached)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise EngineError(f"{model_dir}: model folder not found")
        cfg = load_config(model_dir)
        fmt = detect(model_dir, cfg.quantization_config)
        src = TensorSource(model_dir)
        if torch.device(device).type == "cpu" and dtype in (None, torch.float32):  # where Linear will use it
            progress("preparing the CPU matrix kernel (compiled on first use)")
            cpu_gemm.available()
        if quantize == "fp8" and fmt is None:
            from engine.model.gptq import load_calibrated  # GPTQ rounding, cached per checkpoint

            return load_calibrated(cls, cfg, src, device, dtype, progress)
        return cls.from_source(cfg, src, device, dtype, quantize, fmt)

    @classmethod
    def from_source(cls, cfg: ModelConfig, src: TensorSource, device="cpu", dtype: torch.dtype | None = None,
                    quantize: str | None = None, fmt: Fp8Format | None = None,
                    fp8_weights: dict[str, torch.Tensor] | None = None):
        """``fmt``: the checkpoint's FP8 format (see quantized_checkpoint), whose quantized layers
        are read as they are stored. ``quantize="fp8"``: a high-precision checkpoint's block linear
        layers are quantized to FP8 as they are loaded (per-channel weight scales, dynamic per-token
        activations), rounded to nearest, or taken from ``fp8_weights`` (``<linear>.weight`` e4m3
        and ``<linear>.weight_scale`` [N, 1] for each name of ``block_linears``); embeddings, norms
        and lm_head stay in ``dtype``, as in the published FP8 checkpoints."""
        if quantize not in (None, "fp8"):
            raise EngineError(f"quantize {quantize!r} is not supported (supported: fp8)")
        if quantize and fmt is not None:
            raise EngineError(f"--quantize {quantize}: the checkpoint is already quantized ({fmt.name} FP8)")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        h = cfg.hidden_size

        def get(name, shape):
            t = src.get_shaped(name, shape)
            if not (t.is_floating_point()):
                raise EngineError(f"{src.file_of(name)}: tensor {name!r} has dtype {t.dtype}, expected a float type")
            return t.to(device=device, dtype=dtype)

        splits = default_splits(device)

        def fused(names_shapes, bias: bool, quantizable: bool = True, key: str = "") -> Linear | Fp8Linear:
            b = torch.cat([get(n + ".bias", (s[0],)) for n, s in names_shapes]) if bias else None
            if fmt is not None:
                stored = {fmt.quantized(n) for n, _ in names_shapes}
                if len(stored) > 1:
                    raise EngineError(f"{fmt.source}: {', '.join(n for n, _ in names_shapes)} are fused but only "
                                      "some of them are quantized")
                if stored.pop():
                    return fmt.load(src, names_shapes, b, device)
            if quantize == "fp8" and quantizable and fp8_weights is not None:
                return Fp8Linear(fp8_weights[key + ".weight"].to(device), fp8_weights[key + ".weight_scale"].to(device),
                                 None, b)
            w = fused_weight(src, names_shapes, get)
            if quantize == "fp8" and quantizable:
                return Fp8Linear.quantize(w, b)
            return Linear(w.t(), b, splits)

        layers = []
        for li in range(cfg.num_layers):
            p = f"model.layers.{li}."
            lin = {key: fused(parts, bias, key=key) for key, (parts, bias) in block_linears(cfg, li).items()}
            layers.append(Layer(attn_norm=get(p + "input_layernorm.weight", (h,)), qkv=lin[p + "qkv"], o=lin[p + "o"],
                                mlp_norm=get(p + "post_attention_layernorm.weight", (h,)),
                                gate_up=lin[p + "gate_up"], down=lin[p + "down"]))
        embed = get("model.embed_tokens.weight", (cfg.vocab_size, h))
        if cfg.tie_word_embeddings or "lm_head.weight" not in src:
            lm_head = Linear(embed.t(), None, splits)
        else:
            lm_head = fused([("lm_head", (cfg.vocab_size, h))], False, quantizable=False)
        norm = get("model.norm.weight", (h,))
        if isinstance(fmt, ModelOptFp8):
            fmt.check_kv_scales(src, cfg.num_layers)
        return cls(cfg, embed, layers, norm, lm_head, device, dtype)

    # ---- running -------------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, max_len, batch, self.device, self.dtype)

    def _rope_tables(self, length: int):
        """cos / signed sin for positions 0..length-1 at least; grown by doubling."""
        have = 0 if self._cos is None else self._cos.shape[0]
        if have < length:
            self._cos, self._sin = cos_sin_table(self.cfg, max(length, 2 * have, 256), self.device, self.dtype)
        return self._cos, self._sin

    def forward(self, ids: torch.Tensor, cache: KVCache, start: int, all_logits: bool = False,
                tree: tuple[torch.Tensor, torch.Tensor] | None = None, return_hidden: bool = False,
                logits: bool = True):
        """Run tokens ``ids`` [B, T] at positions start..start+T-1 (earlier positions come from
        ``cache``), store their keys/values in cache slots start..start+T-1 and return logits
        [B, T or 1, vocab] in float32 (and the final-normed hidden states with ``return_hidden``;
        only those, for all T, with ``logits=False``).

        ``tree = (position_offsets [T], attn_mask [T, T])``: the T tokens are the nodes of a
        candidate tree (Medusa): node i sits at position start + offsets[i] and attends to the
        whole cache and to the nodes its row of the mask allows.

        Written for few dispatched ops per layer: at batch 1 on a CPU, per-op overhead is a
        large part of a decode step."""
        cfg = self.cfg
        bsz, t = ids.shape
        end = start + t
        if end > cache.max_len:
            raise EngineError(f"context full: {end} tokens exceed the context size of {cache.max_len}")
        h = cfg.hidden_size
        cos, sin = self._rope_tables(end)
        if tree is None:
            cos, sin = cos[start:end, None], sin[start:end, None]  # [T, 1, D]: broadcast over heads
            mask = self._mask(start, t, cfg.num_heads // cfg.num_kv_heads)
        else:
            mask = None  # the tree's mask is tree[1]
            positions = tree[0] + start
            cos, sin = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]
        eps = cfg.rms_norm_eps
        x = F.embedding(ids, self.embed)
        for li, layer in enumerate(self.layers):
            x = self._layer(li, layer, x, cache, start, cos, sin, mask, tree)
        cache.length = end
        if not logits:
            return F.rms_norm(x, (h,), self.norm, eps)
        if not all_logits:
            x = x[:, -1:]
        hidden = F.rms_norm(x, (h,), self.norm, eps)
        out = self.logits(hidden)
        return (out, hidden) if return_hidden else out

    def _layer(self, li: int, layer: Layer, x: torch.Tensor, cache: KVCache, start: int, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor | None, tree) -> torch.Tensor:
        """One decoder layer of ``forward`` (its arguments as forward computes them)."""
        cfg = self.cfg
        bsz, t = x.shape[:2]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self._qkv(layer, x, cos, sin)
        keys, values = cache.write(li, start, k, v)
        if tree is not None:
            attn = tree_attention(q, keys, values, start, tree[1])  # Triton on CUDA
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
        return self._mlp(layer, x)

    def layer_pass(self, li: int, layer: Layer, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Hidden states ``x`` [B, T, H] of tokens at positions 0..T-1 through ``layer`` in the place
        of layer ``li`` (its cache rows are overwritten): for calibrating one layer at a time."""
        t = x.shape[1]
        cos, sin = self._rope_tables(t)
        mask = self._mask(0, t, self.cfg.num_heads // self.cfg.num_kv_heads)
        return self._layer(li, layer, x, cache, 0, cos[:t, None], sin[:t, None], mask, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., H] -> float32 logits [..., vocab]."""
        return self.lm_head(hidden).float()

    def _qkv(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normed input -> q [B, H, T, D], k and v [B, Hkv, T, D], q and k rotated (cos/sin [T, 1, D]).
        q and k heads are rotated together: x*cos + rotate_half(x)*sin, with rotate_half done as
        a roll by D/2 against a sin table whose first half is negated."""
        cfg = self.cfg
        bsz, t = x.shape[:2]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qk_size = cfg.q_size + cfg.kv_size
        qkv = layer.qkv(F.rms_norm(x, (cfg.hidden_size,), layer.attn_norm, cfg.rms_norm_eps))
        qk = qkv[..., :qk_size].view(bsz, t, nh + nkv, d)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
        v = qkv[..., qk_size:].view(bsz, t, nkv, d).transpose(1, 2)
        return qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2), v

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """x + SwiGLU(RMSNorm(x)). With the CPU's two-block gate|up weight the blocks are the
        gate and the up projection, taken apart with no copy."""
        cfg = self.cfg
        hn = F.rms_norm(x, (cfg.hidden_size,), layer.mlp_norm, cfg.rms_norm_eps)
        if layer.gate_up.splits == 2 and layer.gate_up.bias is None:
            gate, up = layer.gate_up.blocks(hn).view(2, *x.shape[:2], cfg.intermediate_size)
        else:
            gate, up = layer.gate_up(hn).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up, residual=x)

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step with static shapes, for CUDA-graph capture: ``ids`` [B, 1] and the
        position ``pos`` (a 0-d int64 tensor) live on the device, the cache write is an
        index_copy_ at ``pos`` and attention runs over the whole cache with positions > pos
        masked out. Same result as ``forward(ids, cache, pos)``; returns logits [B, vocab]. The
        caller advances ``pos`` and ``cache.length``."""
        at = pos.reshape(1)
        mask = (torch.arange(cache.max_len, device=self.device) <= pos)[None, :]  # [1, L]: all query rows
        x = self._static_pass(ids, at, at, mask, cache)
        return self.logits(F.rms_norm(x[:, 0], (self.cfg.hidden_size,), self.norm, self.cfg.rms_norm_eps))

    def tree_step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, offsets: torch.Tensor,
                  tree_mask: torch.Tensor) -> torch.Tensor:
        """``forward(ids, cache, pos, tree=(offsets, tree_mask), logits=False)`` with static
        shapes, for CUDA-graph capture of the Medusa verify pass: the N tree nodes ``ids`` [1, N]
        go to cache slots pos..pos+N-1 and attend over the whole cache, the prefix (slots < pos)
        and the tree slots their mask row allows. Returns final-normed hidden states [N, H]."""
        n = ids.shape[1]
        slots = pos + torch.arange(n, device=self.device)
        rel = torch.arange(cache.max_len, device=self.device) - pos  # slot - pos
        in_tree = (rel >= 0) & (rel < n)
        mask = (rel < 0)[None, :] | (tree_mask[:, rel.clamp(0, n - 1)] & in_tree[None, :])  # [N, L]
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        x = self._static_pass(ids, slots, pos + offsets, mask.repeat(groups, 1), cache)
        return F.rms_norm(x[0], (self.cfg.hidden_size,), self.norm, self.cfg.rms_norm_eps)

    def _static_pass(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     cache: KVCache) -> torch.Tensor:
        """The layers for ``ids`` [B, T] written at cache ``slots`` [T], rotated for
        ``positions`` [T], attending over the whole cache under ``mask`` ([groups * T or 1, L],
        rows group-major); no host sync, no shape that depends on values."""
        cfg = self.cfg
        bsz, t = ids.shape
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self._rope_tables(cache.max_len)
        cos, sin = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]
        x = F.embedding(ids, self.embed)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            cache.k[li].index_copy_(2, slots, k)
            cache.v[li].index_copy_(2, slots, v)
            qg = q.reshape(bsz, nkv, (nh // nkv) * t, d)
            attn = F.scaled_dot_product_attention(qg, cache.k[li], cache.v[li], attn_mask=mask)
            attn = attn.view(bsz, nh, t, d).transpose(1, 2).reshape(bsz, t, cfg.q_size)
            x = layer.o(attn, residual=x)
            x = self._mlp(layer, x)
        return x

    def _mask(self, start: int, t: int, groups: int) -> torch.Tensor | None:
        """Boolean attention mask for T > 1 new tokens (rows ordered group-major, as the grouped
        query rows are); None where SDPA needs none (one token) or is_causal is right."""
        if t == 1 or (start == 0 and groups == 1):
            return None
        end = start + t
        q_pos = torch.arange(start, end, device=self.device)
        mask = torch.arange(end, device=self.device)[None, :] <= q_pos[:, None]
        return mask.repeat(groups, 1)

    def weight_bytes(self) -> int:
        n = self.embed.numel() * self.embed.element_size() + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            n += sum(l.nbytes() for l in (layer.qkv, layer.o, layer.gate_up, layer.down))
            n += (layer.attn_norm.numel() + layer.mlp_norm.numel()) * layer.attn_norm.element_size()
        return n + self.lm_head.nbytes()
