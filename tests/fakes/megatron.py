"""A tiny legacy Megatron checkpoint written with torch.save in the layout of the DMC releases
(args as an argparse.Namespace, a ModelType, an OrderedDict of Megatron-core + Transformer-Engine
tensors with BytesIO _extra_state entries), and the same weights in Hugging Face layout."""

import argparse
import enum
import io
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

VOCAB, HIDDEN, HEADS, GROUPS, HEAD_DIM, LAYERS, FFN = 48, 64, 4, 2, 16, 2, 96


def hf_weights(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.2: torch.randn(*s, generator=g) * std
    t = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN, std=1.0), "model.norm.weight": 1 + rnd(HIDDEN, std=0.1),
         "lm_head.weight": rnd(VOCAB, HIDDEN, std=1.0)}
    for li in range(LAYERS):
        p = f"model.layers.{li}."
        t.update({p + "input_layernorm.weight": 1 + rnd(HIDDEN, std=0.1),
                  p + "post_attention_layernorm.weight": 1 + rnd(HIDDEN, std=0.1),
                  p + "self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.k_proj.weight": rnd(GROUPS * HEAD_DIM, HIDDEN),
                  p + "self_attn.v_proj.weight": rnd(GROUPS * HEAD_DIM, HIDDEN),
                  p + "self_attn.o_proj.weight": rnd(HIDDEN, HEADS * HEAD_DIM),
                  p + "mlp.gate_proj.weight": rnd(FFN, HIDDEN), p + "mlp.up_proj.weight": rnd(FFN, HIDDEN),
                  p + "mlp.down_proj.weight": rnd(HIDDEN, FFN)})
    return t


def write_hf(path: Path, weights) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": GROUPS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False}))
    return path


def megatron_state(weights) -> OrderedDict:
    """The same weights under Megatron-core + TE names, fused as Megatron fuses them."""
    per = HEADS // GROUPS
    state = OrderedDict()
    state["embedding.word_embeddings.weight"] = weights["model.embed_tokens.weight"]
    for li in range(LAYERS):
        p, m = f"model.layers.{li}.", f"decoder.layers.{li}."
        q = weights[p + "self_attn.q_proj.weight"].view(GROUPS, per, HEAD_DIM, HIDDEN)
        k = weights[p + "self_attn.k_proj.weight"].view(GROUPS, 1, HEAD_DIM, HIDDEN)
        v = weights[p + "self_attn.v_proj.weight"].view(GROUPS, 1, HEAD_DIM, HIDDEN)
        state[m + "self_attention.linear_proj.weight"] = weights[p + "self_attn.o_proj.weight"]
        state[m + "self_attention.linear_proj._extra_state"] = io.BytesIO(b"\x80\x04N.")
        state[m + "self_attention.linear_qkv.layer_norm_weight"] = weights[p + "input_layernorm.weight"]
        state[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, HIDDEN)
        state[m + "self_attention.linear_qkv._extra_state"] = None
        state[m + "mlp.linear_fc1.layer_norm_weight"] = weights[p + "post_attention_layernorm.weight"]
        state[m + "mlp.linear_fc1.weight"] = torch.cat([weights[p + "mlp.gate_proj.weight"],
                                                        weights[p + "mlp.up_proj.weight"]])
        state[m + "mlp.linear_fc1._extra_state"] = io.BytesIO(b"")
        state[m + "mlp.linear_fc2.weight"] = weights[p + "mlp.down_proj.weight"]
    state["decoder.final_layernorm.weight"] = weights["model.norm.weight"]
    state["output_layer.weight"] = weights["lm_head.weight"]
    return state


@pytest.fixture
def fake_megatron(monkeypatch):
    """A megatron.core.enums module with a ModelType enum, so that torch.save can pickle one
    under that name (as a real Megatron run does)."""
    mod = types.ModuleType("megatron.core.enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2

    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    mod.ModelType = ModelType
    for name in ("megatron", "megatron.core"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "megatron.core.enums", mod)
    return ModelType


def write_megatron(root: Path, weights, model_type, **arg_overrides) -> Path:
    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, group_query_attention=True,
        num_query_groups=GROUPS, ffn_hidden_size=FFN, kv_channels=HEAD_DIM, norm_epsilon=1e-5, rotary_base=10000,
        padded_vocab_size=VOCAB, max_position_embeddings=128, seq_length=128, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", rotary_percent=1.0, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, bf16=True, tokenizer_type="Llama2Tokenizer", model_type=model_type.encoder_or_decoder,
        dmc_init_val=5.0, dmc_window_size=12, dmc_cr=8.0)
    for k, v in arg_overrides.items():
        setattr(args, k, v)
    ckpt = {"args": args, "checkpoint_version": 3.0, "iteration": 2000, "model": megatron_state(weights)}
    (root / "mp_rank_00").mkdir(parents=True)
    torch.save(ckpt, root / "mp_rank_00" / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("2000")
    return root
