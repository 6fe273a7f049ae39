"""Bad checkpoints give one clear line that names the file, tensor or field, from the engine
and from the CLI."""

import json
import struct
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from engine.errors import EngineError
from engine.events import LoadModel, SamplingParams
from engine.session import Session


def load(path):
    return Session.load(LoadModel(model=str(path), device="cpu"))


def cli_error(path) -> str:
    """The CLI's error line for ``path`` (a subprocess: the tests that call it are marked slow)."""
    r = subprocess.run([sys.executable, "-m", "chatapp", "run", "--model", str(path), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.startswith("chatapp: error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.slow
def test_missing_model_path(tmp_path):
    with pytest.raises(EngineError, match="no such folder"):
        load(tmp_path / "nope")
    assert str(tmp_path / "nope") in cli_error(tmp_path / "nope")


@pytest.mark.slow
def test_corrupt_safetensors_header(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{this is not json at all........"
    f.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"model\.safetensors: not a valid safetensors file"):
        load(tiny_checkpoint)
    assert "model.safetensors" in cli_error(tiny_checkpoint)


def test_truncated_safetensors(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"model\.safetensors: not a valid safetensors file"):
        load(tiny_checkpoint)


def test_header_length_beyond_the_file(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(EngineError, match=r"model\.safetensors"):
        load(tiny_checkpoint)


@pytest.mark.slow
def test_tensor_with_wrong_shape(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:100].contiguous()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(EngineError, match=rf"tensor '{name}' has shape \[100, 64\], the config implies \[128, 64\]"):
        load(tiny_checkpoint)
    assert name in cli_error(tiny_checkpoint)


def test_missing_tensor(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(EngineError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' is missing"):
        load(tiny_checkpoint)


@pytest.mark.slow
def test_config_missing_field(tiny_checkpoint):
    cfg_file = tiny_checkpoint / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["num_attention_heads"]
    cfg_file.write_text(json.dumps(cfg))
    assert "config.json: missing required field 'num_attention_heads'" in cli_error(tiny_checkpoint)


def test_config_not_json(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("{ broken")
    with pytest.raises(EngineError, match=r"config.json: not valid JSON"):
        load(tiny_checkpoint)


def test_tiny_checkpoint_runs(tiny_checkpoint):
    """The fixture itself is a working model: the errors above come from the damage alone."""
    session = load(tiny_checkpoint)
    done = list(session.generate([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=8)))[-1]
    assert done.stats.n_prompt_tokens > 0


@pytest.mark.parametrize("context, message", [
    (0, "context 0 is too small"),
    (-5, "context -5 is too small"),
    (1_000_000_000, "context 1000000000 is more than the 512 positions"),
])
def test_context_out_of_bounds_is_refused_before_allocating(tiny_checkpoint, context, message):
    with pytest.raises(EngineError, match=message):
        Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu", context=context))


def test_a_context_whose_cache_does_not_fit_free_memory_is_refused(tiny_checkpoint, monkeypatch):
    from engine import memory

    monkeypatch.setattr(memory, "free", lambda device: 1000)
    with pytest.raises(EngineError, match=r"context 512: its KV cache needs 256.0 KiB, more than the 1000 B free"):
        Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu", context=512))


def test_cli_context_zero_is_not_the_default(tiny_checkpoint):
    from chatapp.cli import _parser
    from chatapp.options import load_request

    assert load_request(_parser().parse_args(["run", "--context", "0", "--prompt", "hi"])).context == 0
    assert load_request(_parser().parse_args(["run", "--prompt", "hi"])).context is None


def test_an_empty_model_name_is_a_clear_error():
    with pytest.raises(EngineError, match="model '': give a model id"):
        Session.load(LoadModel(model="", device="cpu"))


def test_a_bad_recommended_sampling_value_is_refused_at_load(tiny_checkpoint):
    """Not at every request (the server would answer 500 to each): once, naming the file."""
    (tiny_checkpoint / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": "warm"}))
    with pytest.raises(EngineError) as info:
        load(tiny_checkpoint)
    assert str(info.value) == f"{tiny_checkpoint / 'generation_config.json'}: temperature is \"warm\"; expected a number ≥ 0"


@pytest.mark.parametrize("text", ["caf\udce9", "\ud800 alone"])
def test_text_that_is_not_unicode_is_a_clear_error(embedded_session, text):
    """Bytes that were not UTF-8 (read with surrogateescape) or a lone surrogate from JSON."""
    for encode in (embedded_session.encode_prompt, lambda t: embedded_session.encode_chat([{"role": "user",
                                                                                           "content": t}])):
        with pytest.raises(EngineError, match="the text is not valid Unicode"):
            encode(text)


def test_perplexity_window_of_one_is_refused(embedded_session):
    with pytest.raises(EngineError, match="window must be at least 2 tokens"):
        embedded_session.perplexity("Hello there, how are you?", window=1, stride=1)


def test_a_megatron_tracker_with_a_non_ascii_digit_is_a_clear_error(tmp_path):
    from engine.hub.layout import checkpoint_file

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("²")
    with pytest.raises(EngineError, match="no Megatron checkpoint file"):
        checkpoint_file(tmp_path)


def _safetensors_index(folder, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("weight_map, message", [
    (["model.safetensors"], "weight_map must map tensor names to file names"),
    ({"model.embed_tokens.weight": 3}, "weight_map must map tensor names to file names"),
    ({"model.embed_tokens.weight": "../elsewhere/model.safetensors"}, "is outside the checkpoint folder"),
    ({"model.embed_tokens.weight": "/etc/model.safetensors"}, "is outside the checkpoint folder"),
])
def test_a_bad_or_escaping_safetensors_index_is_refused(tiny_checkpoint, weight_map, message):
    _safetensors_index(tiny_checkpoint, weight_map)
    with pytest.raises(EngineError) as info:
        load(tiny_checkpoint)
    assert "model.safetensors.index.json" in str(info.value) and message in str(info.value)


def test_file_errors_say_what_the_os_says(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    weights.rename(tiny_checkpoint / "real.safetensors")
    weights.symlink_to(weights)  # a loop
    with pytest.raises(EngineError, match="Too many levels of symbolic links"):
        load(tiny_checkpoint)


def test_a_pytorch_bin_only_checkpoint_says_how_to_convert_it(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").rename(tiny_checkpoint / "pytorch_model.bin")
    with pytest.raises(EngineError) as info:
        load(tiny_checkpoint)
    assert "only pytorch_model.bin, a PyTorch pickle" in str(info.value) and "save_pretrained" in str(info.value)


def test_an_empty_pt_file_says_so(tmp_path):
    from engine.decoding.medusa.heads import load_fasterdecoding

    (tmp_path / "medusa_lm_head.pt").write_bytes(b"")
    with pytest.raises(EngineError, match="medusa_lm_head.pt: the file is empty"):
        load_fasterdecoding(tmp_path / "medusa_lm_head.pt", 64, 100, "cpu", None)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_refused(tiny_checkpoint, value):
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, str(tiny_checkpoint / "model.safetensors"))
    with pytest.raises(EngineError, match=r"model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN"):
        load(tiny_checkpoint)


def test_a_config_with_fewer_layers_than_the_weights_is_refused(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    (tiny_checkpoint / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(EngineError, match="has tensors of layer 1, but the config says 1 layers"):
        load(tiny_checkpoint)


def test_tensors_the_config_does_not_use_are_named(tiny_checkpoint):
    """Attention biases in the file but not in config.json (attention_bias false) would be silently
    left out; a tensor outside the model (a Medusa head, a training tensor) is a note, not an error."""
    import torch

    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    extra = {f"model.layers.{i}.self_attn.q_proj.bias": torch.ones(weights[f"model.layers.{i}.self_attn.q_proj.weight"]
                                                                  .shape[0]) for i in range(2)}
    save_file({**weights, **extra}, str(tiny_checkpoint / "model.safetensors"))
    with pytest.raises(EngineError) as info:
        load(tiny_checkpoint)
    assert str(info.value) == (f"{tiny_checkpoint}: the checkpoint has tensors that config.json's model does not use: "
                               "model.layers.0.self_attn.q_proj.bias, model.layers.1.self_attn.q_proj.bias "
                               "(does config.json belong to these weights?)")
    side = {"medusa_head.0.0.linear.weight": torch.zeros(4, 4), "optimizer.step": torch.zeros(1),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    save_file({**weights, **side}, str(tiny_checkpoint / "model.safetensors"))
    notes = []
    Session.load(LoadModel(model=str(tiny_checkpoint), device="cpu"), notes.append).close()
    assert "note: 2 tensors of the checkpoint are not used: medusa_head.0.0.linear.weight, optimizer.step" in notes


def test_a_medusa_tree_too_large_or_ranking_past_the_heads_is_refused(tmp_path):
    from engine.decoding.medusa.tree import MAX_NODES, build_tree

    with pytest.raises(EngineError, match=f"a tree of 10001 nodes; chatapp verifies at most {MAX_NODES}"):
        build_tree([[i] for i in range(10000)])
    choices = tmp_path / "choices.json"
    choices.write_text(json.dumps([[0], [7000]]))  # the shipped heads score a subset of the vocabulary
    with pytest.raises(EngineError, match="ranks token 7000, but the heads score"):
        Session.load(LoadModel(device="cpu", decoding="medusa", medusa_choices=str(choices)))


@pytest.mark.parametrize("make, message", [
    (lambda cfg: (cfg.unlink(), cfg.mkdir()), "config.json: cannot read it (Is a directory)"),
    (lambda cfg: (cfg.unlink(), cfg.symlink_to(cfg)), "config.json: cannot read it (Too many levels of symbolic links)"),
    (lambda cfg: (cfg.parent / "hf_quant_config.json").write_text('"fp8"'), "hf_quant_config.json: expected a JSON object"),
])
def test_config_files_in_a_bad_state_are_one_line_errors(tiny_checkpoint, make, message):
    make(tiny_checkpoint / "config.json")
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tiny_checkpoint)
