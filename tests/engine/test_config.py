"""Config mapping for the published Llama 2, Llama 3.1 and SmolLM2 config.json files."""

import json

import pytest
import torch

from engine.config import config_from_dict, load_config
from engine.errors import EngineError
from engine.model.rope import inv_frequencies

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
LLAMA31_GENERATION = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                      "temperature": 0.6, "top_p": 0.9}
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "vocab_size": 32000,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 576,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_theta": 100000,
    "tie_word_embeddings": True, "vocab_size": 49152,
}


def test_llama31_8b():
    c = config_from_dict(LLAMA31_8B, generation=LLAMA31_GENERATION)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert c.rope_scaling.kind == "llama3" and c.rope_scaling.factor == 8.0
    assert not c.tie_word_embeddings


def test_llama31_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(**{k: v for k, v in LLAMA31_8B.items() if k != "architectures"})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(inv_frequencies(config_from_dict(LLAMA31_8B)), expected.float())


def test_llama2_7b_is_multi_head():
    c = config_from_dict(LLAMA2_7B)
    assert c.num_kv_heads == 32 and c.rope_scaling.kind == "default" and c.rope_theta == 10000.0
    assert c.eos_token_ids == (2,)


def test_smollm2_is_tied_gqa():
    c = config_from_dict(SMOLLM2_135M)
    assert c.tie_word_embeddings and c.num_kv_heads == 3 and c.head_dim == 64 and c.rope_theta == 100000.0


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_field_is_named(tmp_path, field):
    raw = dict(SMOLLM2_135M)
    del raw[field]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match=rf"config.json: missing required field '{field}'"):
        load_config(tmp_path)


def test_unknown_rope_type_and_model_type():
    with pytest.raises(EngineError, match="rope scaling type 'yarn'"):
        config_from_dict({**LLAMA31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(EngineError, match="model_type 'gpt2'"):
        config_from_dict({**LLAMA2_7B, "model_type": "gpt2"})


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be a positive integer"),
    ({"num_hidden_layers": -2}, "num_hidden_layers is -2; it must be a positive integer"),
    ({"hidden_size": 4096.5}, "hidden_size is 4096.5; it must be a positive integer"),
    ({"vocab_size": "big"}, 'vocab_size is "big"; it must be a positive integer'),
    ({"num_key_value_heads": True}, "num_key_value_heads is true"),
    ({"hidden_size": 4100}, "hidden_size (4100) is not a multiple of num_attention_heads (32)"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps is NaN; it must be a positive number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps is 0; it must be a positive number"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 0}}, "rope factor is 0.0; it must be a positive"),
    ({"rope_theta": float("inf"), "rope_scaling": None}, "rope_theta is inf; it must be a positive number"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "high_freq_factor": 1.0}}, "must be above low_freq_factor"),
])
def test_sizes_and_numbers_are_checked_once(change, message):
    with pytest.raises(EngineError) as info:
        config_from_dict({**LLAMA31_8B, **change}, "/m/config.json")
    assert str(info.value).startswith("/m/config.json: ") and message in str(info.value), str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"temperature": "hot"}, 'temperature is "hot"; expected a number ≥ 0'),
    ({"temperature": -1}, "temperature is -1; expected a number ≥ 0"),
    ({"top_p": 0}, "top_p is 0; expected a number in (0, 1]"),
    ({"top_k": 2.5}, "top_k is 2.5; expected an integer ≥ 0"),
])
def test_recommended_sampling_is_checked_when_the_model_loads(change, message):
    with pytest.raises(EngineError) as info:
        config_from_dict(LLAMA31_8B, "/m/config.json", {**LLAMA31_GENERATION, **change}, "/m/generation_config.json")
    assert str(info.value) == f"/m/generation_config.json: {message}"


def test_recommended_sampling_with_nulls_and_without_do_sample():
    cfg = config_from_dict(LLAMA31_8B, "c", {**LLAMA31_GENERATION, "top_p": None, "top_k": 20})
    assert cfg.sampling == {"temperature": 0.6, "top_p": 1.0, "top_k": 20}
    assert config_from_dict(LLAMA31_8B, "c", {"do_sample": False, "temperature": "ignored"}).sampling == {}
