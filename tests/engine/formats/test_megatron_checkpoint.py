"""Legacy Megatron checkpoints (mp_rank_00/model_optim_rng.pt): a tiny one written with
torch.save in the layout of the DMC releases (args as an argparse.Namespace, a ModelType, an
OrderedDict of Megatron-core + Transformer-Engine tensors with BytesIO _extra_state entries)
loads, and gives the same logits as the same weights in Hugging Face layout; pickles that would
run code are refused."""

import dataclasses
import os
import types
from collections import OrderedDict

import pytest
import torch

from engine.formats.tensor_source import TensorSource
from engine.decoding.dmc import DMCForward
from engine.errors import EngineError
from engine.decoding.dmc import dmc_settings
from engine.formats.megatron import read_megatron_checkpoint
from engine.hub.layout import tokenizer_path
from engine.model.weights import from_dir, from_source, from_megatron

from fakes.megatron import FFN, GROUPS, HEAD_DIM, HEADS, HIDDEN, LAYERS, VOCAB, hf_weights, write_hf, write_megatron


def test_megatron_checkpoint_gives_the_logits_of_the_same_weights_in_hf_layout(tmp_path, fake_megatron):
    weights = hf_weights()
    root = write_megatron(tmp_path / "dmc", weights, fake_megatron)
    hf = from_dir(write_hf(tmp_path / "hf", weights), "cpu", torch.float32)
    meg = from_megatron(root, "cpu", torch.float32)
    cfg, _, info = read_megatron_checkpoint(root / "mp_rank_00" / "model_optim_rng.pt")
    assert cfg == dataclasses.replace(hf.cfg, bos_token_id=1, eos_token_ids=(2,), torch_dtype="bfloat16")
    assert info["iteration"] == 2000 and info["checkpoint_version"] == 3.0
    assert info["args"]["model_type"].value == 1 and info["args"]["dmc_window_size"] == 12
    assert dmc_settings(info["args"]) == {"init_val": 5.0, "window": 12}
    assert dmc_settings({}) == {"init_val": 5.0, "window": 12}
    with pytest.raises(EngineError, match="unbounded"):
        dmc_settings({"dmc_window_size": 0})
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want = hf.forward_all(ids, hf.new_cache(16, batch=2), 0)
    got = meg.forward_all(ids, meg.new_cache(16, batch=2), 0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # a wrong q/k/v split (e.g. all q heads first) would not give these logits
    assert not torch.allclose(want, from_source(
        cfg, _plain_split(root), "cpu", torch.float32).forward_all(ids, hf.new_cache(16, batch=2), 0),
        atol=1e-3)
    # and DMC runs on it the same way as on the HF copy
    torch.testing.assert_close(DMCForward(meg, batch=2, max_len=16).prefill(ids),
                               DMCForward(hf, batch=2, max_len=16).prefill(ids), atol=1e-6, rtol=1e-6)


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
    assert str(e.value).startswith(f"{path}: not a PyTorch file this loader can read safely") and "\n" not in str(e.value)
