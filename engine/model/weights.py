"""Assembling a LlamaModel from checkpoint tensors: Hugging Face names, fused q|k|v and gate|up,
each linear layer of the kind its stored format calls for (engine/model/linear.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kernels import cpu_gemm

from engine.config import ModelConfig, load_config
from engine.errors import EngineError
from engine.formats.dmc_delta import PatchedSource, read_delta
from engine.formats.fp8 import Fp8Format, ModelOptFp8, detect
from engine.formats.megatron import read_megatron_checkpoint
from engine.formats.tensor_source import TensorSource
from engine.model.linear import Fp8Linear, Linear, default_splits
from engine.model.llama import Layer, LlamaModel


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def block_linears(cfg: ModelConfig, li: int) -> dict[str, tuple[list[tuple[str, tuple[int, int]]], bool]]:
    """Layer ``li``'s linear layers as chatapp fuses them: name -> ([(checkpoint name, [out, in])
    of each part, in order], has a bias). The names end in the Layer field (qkv, o, gate_up, down)."""
    p, h, i = f"model.layers.{li}.", cfg.hidden_size, cfg.intermediate_size
    return {
        p + "qkv": ([(p + "self_attn.q_proj", (cfg.q_size, h)), (p + "self_attn.k_proj", (cfg.kv_size, h)),
                     (p + "self_attn.v_proj", (cfg.kv_size, h))], cfg.attention_bias),
        p + "o": ([(p + "self_attn.o_proj", (h, cfg.q_size))], cfg.attention_bias),
        p + "gate_up": ([(p + "mlp.gate_proj", (i, h)), (p + "mlp.up_proj", (i, h))], cfg.mlp_bias),
        p + "down": ([(p + "mlp.down_proj", (h, i))], cfg.mlp_bias),
    }


class Bf16OnLoad:
    """``--quantize bf16``: the block linears and the lm_head kept in bfloat16, half the bytes of
    float32, which decoding on a CPU is bound by; our CPU kernel widens them to float32 in
    registers (exactly) and computes in float32. On a GPU the weights are bfloat16 anyway. A
    quantization method of ``from_source`` (see engine/model/gptq.py for the other)."""

    def linear(self, key: str, weight, bias: torch.Tensor | None, device) -> Linear:
        return Linear(weight().to(torch.bfloat16).t(), bias, default_splits(device))

    def head(self, weight: torch.Tensor) -> Linear:
        return Linear(weight.to(torch.bfloat16).t(), None, default_splits(weight.device))

    def after_loading(self, model, progress=lambda msg: None) -> None:
        pass


def fused_weight(src: TensorSource, names_shapes, get=None) -> torch.Tensor:
    """The parts' weights [out, in] stacked along out (``get(name, shape)``: how to read one)."""
    get = get or src.get_shaped
    return torch.cat([get(n + ".weight", s) for n, s in names_shapes], dim=0)


def from_dir(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             progress=lambda msg: None) -> LlamaModel:
    """The model of a Hugging Face checkpoint folder, its layers as stored (FP8 formats included)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EngineError(f"{model_dir}: model folder not found")
    cfg = load_config(model_dir)
    prepare_cpu_kernel(device, dtype, progress)
    return from_source(cfg, TensorSource(model_dir), device, dtype, detect(model_dir, cfg.quantization_config))


def prepare_cpu_kernel(device, dtype: torch.dtype | None, progress=lambda msg: None) -> None:
    """Build our CPU GEMM kernel (on first use) before the weights that Linear packs for it:
    float32 weights on a CPU."""
    if torch.device(device).type == "cpu" and dtype in (None, torch.float32):
        progress("preparing the CPU matrix kernel (compiled on first use)")
        cpu_gemm.available()


def from_source(cfg: ModelConfig, src: TensorSource, device="cpu", dtype: torch.dtype | None = None,
                fmt: Fp8Format | None = None, quantize=None) -> LlamaModel:
    """``fmt``: the checkpoint's FP8 format (see engine/formats/fp8.py), whose quantized layers
    are read as they are stored; everything else is read in ``dtype`` (float32 on a CPU, bfloat16
    on a GPU by default). ``quantize``: a quantization method for a high-precision checkpoint's
    block linears (engine/model/gptq.py: ``quantize.linear(name, read_weight, bias, device)``
    makes each one and ``quantize.head(weight)`` the lm_head; the caller runs
    ``quantize.after_loading(model)`` on the result)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    h = cfg.hidden_size

    def get(name, shape):
        t = src.get_shaped(name, shape)
        if not t.is_floating_point():
            raise EngineError(f"{src.file_of(name)}: tensor {name!r} has dtype {t.dtype}, expected a float type")
        t = t.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(t).all()):  # one pass over the weights: cheap next to reading them
            raise EngineError(f"{src.file_of(name)}: tensor {name!r} holds NaN or infinite values")
        return t

    extra = sorted({int(m[1]) for n in src.names() if (m := _LAYER.match(n))} - set(range(cfg.num_layers)))
    if extra:
        raise EngineError(f"{src.model_dir}: the checkpoint has tensors of layer {extra[0]}, but the config says "
                          f"{cfg.num_layers} layers (num_hidden_layers)")

    splits = default_splits(device)

    def fused(names_shapes, bias: bool, key: str | None = None) -> Linear | Fp8Linear:
        b = torch.cat([get(n + ".bias", (s[0],)) for n, s in names_shapes]) if bias else None
        if fmt is not None:
            stored = {fmt.quantized(n) for n, _ in names_shapes}
            if len(stored) > 1:
                raise EngineError(f"{fmt.source}: {', '.join(n for n, _ in names_shapes)} are fused but only "
                                  "some of them are quantized")
            if stored.pop():
                return Fp8Linear(*fmt.read(src, names_shapes, device), b)
        if quantize is not None and key is not None:
            src.claim(n + ".weight" for n, _ in names_shapes)  # the method may read a cached copy instead
            return quantize.linear(key, lambda: fused_weight(src, names_shapes, get), b, device)
        return Linear(fused_weight(src, names_shapes, get).t(), b, splits)

    layers = []
    for li in range(cfg.num_layers):
        p = f"model.layers.{li}."
        lin = {key.rsplit(".", 1)[1]: fused(parts, bias, key) for key, (parts, bias) in block_linears(cfg, li).items()}
        layers.append(Layer(attn_norm=get(p + "input_layernorm.weight", (h,)),
                            mlp_norm=get(p + "post_attention_layernorm.weight", (h,)), **lin))
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, h))
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in src
    if quantize is not None:  # the method's output projection, from the high-precision weight
        lm_head = quantize.head(embed if tied else get("lm_head.weight", (cfg.vocab_size, h)))
    elif tied:
        lm_head = Linear(embed.t(), None, splits)
    else:
        lm_head = fused([("lm_head", (cfg.vocab_size, h))], False)
    norm = get("model.norm.weight", (h,))
    if isinstance(fmt, ModelOptFp8):
        fmt.check_kv_scales(src, cfg.num_layers)
    return LlamaModel(cfg, embed, layers, norm, lm_head, device, dtype)


# Tensors a checkpoint may hold that a model loaded from it does not need: rotary tables computed
# from config.json, static activation and KV-cache scales (chatapp scales activations dynamically),
# and a tied lm_head's copy of the embeddings.
_HARMLESS = re.compile(r"(\.rotary_emb\.inv_freq|\.(input|k|v|kv|output)_scale|\._extra_state)$")
_MODEL_PART = re.compile(r"^(model\.|lm_head\.)")


def check_all_used(src: TensorSource, where: Path, progress=lambda msg: None) -> None:
    """After loading: a tensor of the model's own (``model.*``, ``lm_head.*``) that nothing read is
    an error — the config describes a different model, and results would be silently wrong (a
    bias not applied, a layer left out); other extras (a Medusa head when decoding without it, a
    training-time tensor) are reported and left."""
    unread = [n for n in src.unread() if not _HARMLESS.search(n) and n != "lm_head.weight"]
    own = [n for n in unread if _MODEL_PART.match(n)]
    if own:
        more = f" and {len(own) - 3} more" if len(own) > 3 else ""
        raise EngineError(f"{where}: the checkpoint has tensors that config.json's model does not use: "
                          f"{', '.join(own[:3])}{more} (does config.json belong to these weights?)")
    if unread:
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        progress(f"note: {len(unread)} tensors of the checkpoint are not used: {', '.join(unread[:3])}{more}")


def from_megatron(path: Path, device="cpu", dtype: torch.dtype | None = None) -> LlamaModel:
    """The model of a legacy Megatron checkpoint (file, mp_rank_00 folder or root)."""
    cfg, src, _ = read_megatron_checkpoint(path)
    return from_source(cfg, src, device, dtype)


def retrofitted_source(path: Path, delta: Path) -> tuple[ModelConfig, PatchedSource, dict]:
    """A Hugging Face checkpoint with a DMC delta applied (engine/formats/dmc_delta.py): its
    config, its tensors with the delta's in their place, and the DMC settings {"init_val", "window"}."""
    cfg = load_config(path)
    if detect(path, cfg.quantization_config) is not None:
        raise EngineError(f"{path}: DMC deltas apply to high-precision checkpoints, this one is stored quantized "
                          "(use the high-precision checkpoint, with --quantize fp8 for FP8 weights)")
    base = TensorSource(path)
    replaced, settings = read_delta(delta, cfg, base)
    return cfg, PatchedSource(base, replaced, Path(delta)), settings


def load_retrofitted(path: Path, delta: Path, device, dtype=None) -> tuple[LlamaModel, dict]:
    """The model of a Hugging Face checkpoint with a DMC delta applied, and its DMC settings."""
    cfg, src, settings = retrofitted_source(path, delta)
    return from_source(cfg, src, device, dtype), settings
