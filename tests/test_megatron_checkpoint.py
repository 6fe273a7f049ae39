"""Legacy Megatron checkpoints (mp_rank_00/model_optim_rng.pt): a tiny one written with
torch.save in the layout of the DMC releases (args as an argparse.Namespace, a ModelType, an
OrderedDict of Megatron-core + Transformer-Engine tensors with BytesIO _extra_state entries)
loads, and gives the same logits as the same weights in Hugging Face layout; pickles that would
run code are refused."""

import argparse
import dataclasses
import enum
import io
import json
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import TensorSource
from engine.dmc import DMCDecoder
from engine.errors import EngineError
from engine.llama import LlamaModel
from engine.megatron_checkpoint import dmc_settings, load_megatron_model, read_megatron_checkpoint, tokenizer_path

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


def test_megatron_checkpoint_gives_the_logits_of_the_same_weights_in_hf_layout(tmp_path, fake_megatron):
    weights = hf_weights()
    root = write_megatron(tmp_path / "dmc", weights, fake_megatron)
    hf = LlamaModel.from_dir(write_hf(tmp_path / "hf", weights), "cpu", torch.float32)
    meg = load_megatron_model(root, "cpu", torch.float32)
    cfg, _, info = read_megatron_checkpoint(root / "mp_rank_00" / "model_optim_rng.pt")
    assert cfg == dataclasses.replace(hf.cfg, bos_token_id=1, eos_token_ids=(2,), torch_dtype="bfloat16")
    assert info["iteration"] == 2000 and info["checkpoint_version"] == 3.0
    assert info["args"]["model_type"].value == 1 and info["args"]["dmc_window_size"] == 12
    assert dmc_settings(info["args"]) == {"init_val": 5.0, "window": 12}
    assert dmc_settings({}) == {"init_val": 5.0, "window": 12}
    with pytest.raises(EngineError, match="unbounded"):
        dmc_settings({"dmc_window_size": 0})
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want = hf.forward(ids, hf.new_cache(16, batch=2), 0, all_logits=True)
    got = meg.forward(ids, meg.new_cache(16, batch=2), 0, all_logits=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # a wrong q/k/v split (e.g. all q heads first) would not give these logits
    assert not torch.allclose(want, LlamaModel.from_source(
        cfg, _plain_split(root), "cpu", torch.float32).forward(ids, hf.new_cache(16, batch=2), 0, all_logits=True),
        atol=1e-3)
    # and DMC runs on it the same way as on the HF copy
    torch.testing.assert_close(DMCDecoder(meg, batch=2, max_len=16).prefill(ids),
                               DMCDecoder(hf, batch=2, max_len=16).prefill(ids), atol=1e-6, rtol=1e-6)


def _plain_split(root):
    """The HF tensors with q, k, v cut from the fused weight as [all q; all k; all v]."""
    _, src, _ = read_megatron_checkpoint(root)
    tensors = {n: src.get(n) for n in src.names()}
    for li in range(LAYERS):
        p = f"model.layers.{li}.self_attn."
        fused = torch.cat([tensors[p + "q_proj.weight"].view(GROUPS, -1, HIDDEN),
                           tensors[p + "k_proj.weight"].view(GROUPS, -1, HIDDEN),
                           tensors[p + "v_proj.weight"].view(GROUPS, -1, HIDDEN)], dim=1).reshape(-1, HIDDEN)
        q, k, v = fused.split([HEADS * HEAD_DIM, GROUPS * HEAD_DIM, GROUPS * HEAD_DIM])
        tensors.update({p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v})
    return TensorSource.from_tensors(tensors, root / "x.pt")


def test_loads_from_the_file_the_rank_folder_and_megatron_iteration_layout(tmp_path, fake_megatron):
    weights = hf_weights(1)
    root = write_megatron(tmp_path / "a", weights, fake_megatron)
    iter_root = tmp_path / "b"
    (iter_root / "iter_0002000").mkdir(parents=True)
    (root / "mp_rank_00").rename(iter_root / "iter_0002000" / "mp_rank_00")
    (iter_root / "latest_checkpointed_iteration.txt").write_text("2000\n")
    file = iter_root / "iter_0002000" / "mp_rank_00" / "model_optim_rng.pt"
    for path in (iter_root, file, file.parent):
        cfg, src, _ = read_megatron_checkpoint(path)
        assert cfg.num_layers == LAYERS and cfg.num_kv_heads == GROUPS and not cfg.tie_word_embeddings
        torch.testing.assert_close(src.get("model.layers.1.mlp.up_proj.weight"),
                                   weights["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(EngineError, match="no Megatron checkpoint file"):
        read_megatron_checkpoint(tmp_path / "a")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "eval", "unlisted class"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, fake_megatron, payload):
    marker = tmp_path / "ran"
    evil = {"os.system": _RunsCode(marker), "eval": _Eval(marker),
            "unlisted class": types.SimpleNamespace(num_layers=2)}[payload]
    (tmp_path / "mp_rank_00").mkdir()
    path = tmp_path / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"args": evil, "model": OrderedDict(), "iteration": 1}, path)
    with pytest.raises(EngineError) as e:
        read_megatron_checkpoint(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "\n" not in msg
    assert not marker.exists()


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


def test_checks_against_the_stored_args(tmp_path, fake_megatron):
    weights = hf_weights(2)
    root = write_megatron(tmp_path / "wrong_ffn", weights, fake_megatron, ffn_hidden_size=FFN + 8)
    with pytest.raises(EngineError, match=r"mlp\.linear_fc1\.weight.*shape"):
        read_megatron_checkpoint(root)
    root = write_megatron(tmp_path / "layernorm", weights, fake_megatron, normalization="LayerNorm")
    with pytest.raises(EngineError, match="normalization"):
        read_megatron_checkpoint(root)
    root = write_megatron(tmp_path / "tied", weights, fake_megatron, untie_embeddings_and_output_weights=False)
    with pytest.raises(EngineError, match="unexpected tensor 'output_layer.weight'"):
        read_megatron_checkpoint(root)


def test_the_tokenizer_is_looked_for_next_to_the_checkpoint(tmp_path, fake_megatron):
    root = write_megatron(tmp_path / "dmc", hf_weights(3), fake_megatron)
    with pytest.raises(EngineError, match="tokenizer.model") as e:
        tokenizer_path(root)
    assert str(root / "tokenizer.model") in str(e.value)
    (root / "tokenizer.model").write_bytes(b"\x00")
    assert tokenizer_path(root / "mp_rank_00") == root / "tokenizer.model"
    other = tmp_path / "tok.model"
    with pytest.raises(EngineError, match="not found"):
        tokenizer_path(root, other)
    other.write_bytes(b"\x00")
    assert tokenizer_path(root, other) == other


def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(EngineError) as e:
        read_megatron_checkpoint(path)
    assert str(e.value).startswith(f"{path}: not a PyTorch checkpoint") and "\n" not in str(e.value)
