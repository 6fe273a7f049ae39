"""Our Llama forward pass (Llama 2, Llama 3.x, SmolLM2): RMSNorm, RoPE, grouped-query
attention over a preallocated KV cache, SwiGLU, tied or untied embeddings.

Weights are kept as [in_features, out_features] and q/k/v and gate/up are fused: at batch 1
the matmuls are weight-read bound, and this layout reads each weight once, in order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import TensorSource
from .config import ModelConfig, load_config
from .errors import EngineError
from .kv_cache import KVCache
from .rope import apply_rope, cos_sin_table


class Linear:
    """y = x @ W (+ b), W stored [in, out]. The one place a weight format plugs in."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight_t = weight_t
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight_t).view(*x.shape[:-1], -1)

    def nbytes(self) -> int:
        n = self.weight_t.numel() * self.weight_t.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


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
    def from_dir(cls, model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise EngineError(f"{model_dir}: model folder not found")
        cfg = load_config(model_dir)
        src = TensorSource(model_dir)
        return cls.from_source(cfg, src, device, dtype)

    @classmethod
    def from_source(cls, cfg: ModelConfig, src: TensorSource, device="cpu", dtype: torch.dtype | None = None):
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

        def get(name, shape):
            t = src.get_shaped(name, shape)
            if not (t.is_floating_point()):
                raise EngineError(f"{src.file_of(name)}: tensor {name!r} has dtype {t.dtype}, expected a float type")
            return t.to(device=device, dtype=dtype)

        def fused(names_shapes, bias: bool) -> Linear:
            ws = [get(n + ".weight", s) for n, s in names_shapes]
            w_t = torch.cat(ws, dim=0).t().contiguous()
            b = torch.cat([get(n + ".bias", (s[0],)) for n, s in names_shapes]) if bias else None
            return Linear(w_t, b)

        layers = []
        for li in range(cfg.num_layers):
            p = f"model.layers.{li}."
            layers.append(Layer(
                attn_norm=get(p + "input_layernorm.weight", (h,)),
                qkv=fused([(p + "self_attn.q_proj", (cfg.q_size, h)),
                           (p + "self_attn.k_proj", (cfg.kv_size, h)),
                           (p + "self_attn.v_proj", (cfg.kv_size, h))], cfg.attention_bias),
                o=fused([(p + "self_attn.o_proj", (h, cfg.q_size))], cfg.attention_bias),
                mlp_norm=get(p + "post_attention_layernorm.weight", (h,)),
                gate_up=fused([(p + "mlp.gate_proj", (i, h)), (p + "mlp.up_proj", (i, h))], cfg.mlp_bias),
                down=fused([(p + "mlp.down_proj", (h, i))], cfg.mlp_bias),
            ))
        embed = get("model.embed_tokens.weight", (cfg.vocab_size, h))
        if cfg.tie_word_embeddings or "lm_head.weight" not in src:
            lm_head = Linear(embed.t().contiguous())
        else:
            lm_head = fused([("lm_head", (cfg.vocab_size, h))], False)
        norm = get("model.norm.weight", (h,))
        return cls(cfg, embed, layers, norm, lm_head, device, dtype)

    # ---- running -------------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, max_len, batch, self.device, self.dtype)

    def _rope_tables(self, length: int):
        if self._cos is None or self._cos.shape[0] < length:
            self._cos, self._sin = cos_sin_table(self.cfg, max(length, 256), self.device, self.dtype)
        return self._cos, self._sin

    def forward(self, ids: torch.Tensor, cache: KVCache, start: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens ``ids`` [B, T] at positions start..start+T-1 (earlier positions come from
        ``cache``), store their keys/values and return logits [B, T or 1, vocab] in float32."""
        cfg = self.cfg
        bsz, t = ids.shape
        end = start + t
        if end > cache.max_len:
            raise EngineError(f"context full: {end} tokens exceed the context size of {cache.max_len}")
        cos, sin = self._rope_tables(end)
        cos, sin = cos[start:end], sin[start:end]
        groups = cfg.num_heads // cfg.num_kv_heads
        mask = None
        if t > 1 and start > 0:
            q_pos = torch.arange(start, end, device=self.device)
            mask = torch.arange(end, device=self.device)[None, :] <= q_pos[:, None]
            mask = mask.repeat(groups, 1)
        causal = t > 1 and start == 0
        x = F.embedding(ids, self.embed)
        for li, layer in enumerate(self.layers):
            hn = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(hn)
            q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
            q = apply_rope(q.view(bsz, t, cfg.num_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(bsz, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            v = v.view(bsz, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            keys, values = cache.write(li, start, k, v)
            # Grouped-query attention without copying K/V: the query heads that share a KV head
            # become extra query rows of that head.
            qg = q.reshape(bsz, cfg.num_kv_heads, groups * t, cfg.head_dim)
            if causal:
                attn = self._causal_grouped(qg, keys, values, groups, t)
            else:
                attn = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
            attn = attn.view(bsz, cfg.num_heads, t, cfg.head_dim).transpose(1, 2).reshape(bsz, t, cfg.q_size)
            x = x + layer.o(attn)
            hn = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(hn).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        cache.length = end
        if not all_logits:
            x = x[:, -1:]
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return self.lm_head(x).float()

    def _causal_grouped(self, qg, keys, values, groups, t):
        # is_causal aligns the mask to the top-left, which is right only when keys == queries;
        # with grouped rows the query count is groups * t, so build the mask explicitly.
        if groups == 1:
            return F.scaled_dot_product_attention(qg, keys, values, is_causal=True)
        mask = torch.ones(t, t, dtype=torch.bool, device=qg.device).tril().repeat(groups, 1)
        return F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)

    def weight_bytes(self) -> int:
        n = self.embed.numel() * self.embed.element_size() + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            n += sum(l.nbytes() for l in (layer.qkv, layer.o, layer.gate_up, layer.down))
            n += (layer.attn_norm.numel() + layer.mlp_norm.numel()) * layer.attn_norm.element_size()
        return n + (self.lm_head.nbytes() if self.lm_head.weight_t.data_ptr() != self.embed.data_ptr() else 0)
