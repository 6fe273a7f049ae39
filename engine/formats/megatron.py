"""Legacy Megatron-LM checkpoints: one ``torch.save`` pickle per tensor-parallel rank,
``mp_rank_00/model_optim_rng.pt``, as NVIDIA ships the DMC models (nvidia/Llama-2-7B-DMC-8x and
its siblings: TP=1, PP=1, Megatron-core GPT model with Transformer-Engine layers).

The file is a pickle, so it is read with torch.load(weights_only=True) and an explicit allow-list
on top of PyTorch's own (tensors, storages, dtypes, OrderedDict, bytes): inert stand-ins for
``argparse.Namespace`` (the stored ``args``), ``megatron.core.enums.ModelType`` and
``_io.BytesIO`` (Transformer-Engine ``_extra_state`` blobs, not needed for inference). Nothing in
the file can run code; a pickle that asks for anything else is refused.

The model config comes from the stored ``args`` (no config.json); tensors are renamed to the
Hugging Face names engine/model/weights.py reads:

    embedding.word_embeddings.weight                  -> model.embed_tokens.weight
    decoder.layers.N.self_attention.linear_qkv.layer_norm_weight
                                                      -> model.layers.N.input_layernorm.weight
    decoder.layers.N.self_attention.linear_qkv.weight -> q_proj, k_proj, v_proj: rows grouped per
        KV group, [groups, (heads/groups + 2) * D, hidden]: the group's query heads, its key
        head, its value head
    decoder.layers.N.self_attention.linear_proj.weight -> o_proj
    decoder.layers.N.mlp.linear_fc1.layer_norm_weight -> post_attention_layernorm.weight
    decoder.layers.N.mlp.linear_fc1.weight            -> [gate_proj; up_proj]
    decoder.layers.N.mlp.linear_fc2.weight            -> down_proj
    decoder.final_layernorm.weight                    -> model.norm.weight
    output_layer.weight                               -> lm_head.weight (untied embeddings)

(Layer norms as separate modules, ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``, are
accepted too.) The tokenizer is not in the checkpoint: the Llama 2 SentencePiece
``tokenizer.model`` is looked for next to it or given by path (engine/hub/layout.py tokenizer_path)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from engine.formats.tensor_source import TensorSource
from engine.config import ModelConfig, RopeScaling
from engine.errors import EngineError
from engine.formats.torch_pickle import load_weights_only
from engine.hub.layout import checkpoint_file



# ---- what the pickle may build ----------------------------------------------------------------
class StoredArgs:
    """Stand-in for argparse.Namespace: the pickled attributes, nothing else."""


class StoredModelType:
    """Stand-in for the megatron.core.enums.ModelType enum (pickled as ModelType(value))."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"ModelType({self.value!r})"


class StoredBlob:
    """Stand-in for io.BytesIO (Transformer-Engine _extra_state): keeps the size only."""

    def __setstate__(self, state):
        data = state[0] if isinstance(state, tuple) and state else b""
        self.nbytes = len(data) if isinstance(data, (bytes, bytearray)) else 0


def empty_bytes() -> bytes:
    """Stand-in for bytes, which protocol-2 pickles call with no arguments for b"" (an empty
    extra-state blob); any argument is refused."""
    return b""


SAFE_GLOBALS = [(StoredArgs, "argparse.Namespace"), (StoredModelType, "megatron.core.enums.ModelType"),
                (StoredBlob, "_io.BytesIO"), (empty_bytes, "builtins.bytes")]


def _load_pickle(path: Path) -> dict:
    obj = load_weights_only(path, SAFE_GLOBALS, "tensors, args, ModelType, extra-state blobs")
    if not isinstance(obj, dict):
        raise EngineError(f"{path}: expected a Megatron checkpoint (a dict with 'args' and 'model'), "
                          f"found {type(obj).__name__}")
    return obj


# ---- where things are ------------------------------------------------------------------------
# ---- config ----------------------------------------------------------------------------------
def config_from_args(args, source: str, state: dict) -> ModelConfig:
    """ModelConfig from the stored training arguments (and the embedding's shape)."""
    if not isinstance(args, StoredArgs):
        raise EngineError(f"{source}: the checkpoint has no stored 'args' (an argparse.Namespace)")
    stored = args.__dict__

    def need(name):
        value = stored.get(name)
        if value is None:
            raise EngineError(f"{source}: stored args have no {name!r}")
        return value

    def unsupported(name, value, expected):
        raise EngineError(f"{source}: args.{name} = {value!r} is not supported (this loader runs Llama models: "
                          f"{expected})")

    for name, ok, expected in (("normalization", ("RMSNorm",), "RMSNorm"),
                               ("position_embedding_type", ("rope",), "rope")):
        if stored.get(name) is not None and stored.get(name) not in ok:
            unsupported(name, stored.get(name), expected)
    for name, expected in (("swiglu", True), ("add_bias_linear", False), ("add_qkv_bias", False),
                           ("rotary_interleaved", False), ("use_rope_scaling", False)):
        if stored.get(name) is not None and bool(stored.get(name)) != expected:
            unsupported(name, stored.get(name), f"{name} {expected}")
    if stored.get("rotary_percent") not in (None, 1.0):
        unsupported("rotary_percent", stored.get("rotary_percent"), "rotary_percent 1.0")
    try:
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        groups = int(need("num_query_groups")) if stored.get("group_query_attention") else heads
        embed = state.get("embedding.word_embeddings.weight")
        vocab = stored.get("padded_vocab_size") or (embed.shape[0] if embed is not None else
                                                    need("padded_vocab_size"))
        llama2_tokens = stored.get("tokenizer_type") in ("Llama2Tokenizer", None)
        max_pos = int(stored.get("max_position_embeddings") or need("seq_length"))
        cfg = ModelConfig(
            hidden_size=hidden,
            intermediate_size=int(need("ffn_hidden_size")),
            num_layers=int(need("num_layers")),
            num_heads=heads,
            num_kv_heads=groups,
            head_dim=int(stored.get("kv_channels") or hidden // heads),
            vocab_size=int(vocab),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(stored.get("norm_epsilon") or 1e-5),
            rope_theta=float(stored.get("rotary_base") or 10000.0),
            rope_scaling=RopeScaling(original_max_position_embeddings=max_pos),
            tie_word_embeddings=not stored.get("untie_embeddings_and_output_weights", "output_layer.weight" in state),
            bos_token_id=1 if llama2_tokens else None,
            eos_token_ids=(2,) if llama2_tokens else (),
            torch_dtype="bfloat16" if stored.get("bf16") else ("float16" if stored.get("fp16") else None),
        )
    except (TypeError, ValueError) as e:
        raise EngineError(f"{source}: bad value in stored args: {e}") from None
    if heads % groups:
        raise EngineError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_query_groups ({groups})")
    return cfg


# ---- tensors ---------------------------------------------------------------------------------
def _hf_tensors(cfg: ModelConfig, state: dict, source: str) -> dict[str, torch.Tensor]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
    per_group = nh // nkv
    used = set()

    def take(*names, shape):
        for name in names:
            if name in state:
                t = state[name]
                if not isinstance(t, torch.Tensor):
                    raise EngineError(f"{source}: {name!r} is not a tensor")
                if tuple(t.shape) != tuple(shape):
                    raise EngineError(f"{source}: tensor {name!r} has shape {list(t.shape)}, the stored args imply "
                                      f"{list(shape)}")
                used.add(name)
                return t
        raise EngineError(f"{source}: tensor {names[0]!r} is missing from the checkpoint")

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight", shape=(cfg.vocab_size, h))}
    for li in range(cfg.num_layers):
        m, p = f"decoder.layers.{li}.", f"model.layers.{li}."
        out[p + "input_layernorm.weight"] = take(m + "self_attention.linear_qkv.layer_norm_weight",
                                                 m + "input_layernorm.weight", shape=(h,))
        qkv = take(m + "self_attention.linear_qkv.weight", shape=((nh + 2 * nkv) * d, h))
        qkv = qkv.view(nkv, per_group + 2, d, h)
        out[p + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(nh * d, h)
        out[p + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(nkv * d, h)
        out[p + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(nkv * d, h)
        out[p + "self_attn.o_proj.weight"] = take(m + "self_attention.linear_proj.weight", shape=(h, nh * d))
        out[p + "post_attention_layernorm.weight"] = take(m + "mlp.linear_fc1.layer_norm_weight",
                                                          m + "pre_mlp_layernorm.weight", shape=(h,))
        fc1 = take(m + "mlp.linear_fc1.weight", shape=(2 * i, h))
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = fc1[:i], fc1[i:]
        out[p + "mlp.down_proj.weight"] = take(m + "mlp.linear_fc2.weight", shape=(h, i))
    out["model.norm.weight"] = take("decoder.final_layernorm.weight", shape=(h,))
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("output_layer.weight", shape=(cfg.vocab_size, h))
    extra = sorted(n for n in state if n not in used and not n.endswith("._extra_state"))
    if extra:
        raise EngineError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} not read; this loader reads "
                          "Megatron-core GPT models in the Llama layout, no biases)")
    return out


def read_megatron_checkpoint(path: Path) -> tuple[ModelConfig, TensorSource, dict]:
    """Config, tensors under Hugging Face names, and what else the checkpoint says
    (iteration, checkpoint_version, the stored args as a dict)."""
    file = checkpoint_file(path)
    ckpt = _load_pickle(file)
    source = str(file)
    state = ckpt.get("model")
    if state is None and "model0" in ckpt:
        raise EngineError(f"{source}: a virtual-pipeline checkpoint (model0, model1, ...) is not supported")
    if not isinstance(state, (dict, OrderedDict)):
        raise EngineError(f"{source}: no 'model' state dict in the checkpoint")
    if "language_model" in state:
        raise EngineError(f"{source}: a legacy (non-core) Megatron model layout is not supported; expected "
                          "Megatron-core names (decoder.layers.N...)")
    args = ckpt.get("args")
    cfg = config_from_args(args, source, state)
    tensors = _hf_tensors(cfg, state, source)
    info = {"iteration": ckpt.get("iteration"), "checkpoint_version": ckpt.get("checkpoint_version"),
            "args": dict(args.__dict__)}
    return cfg, TensorSource.from_tensors(tensors, file), info
