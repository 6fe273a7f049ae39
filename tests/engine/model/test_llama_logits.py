"""Our forward pass against transformers' LlamaForCausalLM on tiny random checkpoints
written to disk as real Hugging Face checkpoints."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from engine.model.weights import from_dir

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            max_position_embeddings=512)

CONFIGS = {
    "llama31_gqa_rope_scaling": dict(
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama2_mha": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                       tie_word_embeddings=False, rms_norm_eps=1e-6),
    "smollm2_tied": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def write_checkpoint(path, overrides, shard=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**BASE, **overrides)
    ref = LlamaForCausalLM(cfg).eval()
    # random norms too, so a wrong norm weight cannot go unnoticed
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(path, max_shard_size="200KB" if shard else "10GB")
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    ref = write_checkpoint(tmp_path, CONFIGS[name], shard=(name == "llama2_mha"))
    if name == "llama2_mha":
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = from_dir(tmp_path)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    cache = ours.new_cache(256)
    got = ours.forward_all(ids, cache, 0)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decode_matches_full_forward(tmp_path, name):
    """Prefill in chunks and then token by token gives the logits of one full pass."""
    ref = write_checkpoint(tmp_path, CONFIGS[name])
    ours = from_dir(tmp_path)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits
    cache = ours.new_cache(128)
    parts = [ours.forward_all(ids[:, :40], cache, 0),
             ours.forward_all(ids[:, 40:70], cache, 40)]
    parts += [ours.forward(ids[:, p:p + 1], cache, p) for p in range(70, 90)]
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=2e-5, rtol=1e-4)
    assert cache.length == 90


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    """bf16 / fp16 checkpoints are read and computed in fp32 on the CPU: the same logits as the
    reference model with the same (rounded) weights."""
    ref = write_checkpoint(tmp_path / "fp32", CONFIGS["llama31_gqa_rope_scaling"])
    ref.to(dtype).save_pretrained(tmp_path / "half")
    ref = ref.to(dtype).float()
    ours = from_dir(tmp_path / "half")
    assert ours.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(ours.forward_all(ids, ours.new_cache(64), 0), expected,
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama31_gqa_rope_scaling", "llama2_mha"])
def test_static_decode_step_matches_forward(tmp_path, name):
    """The CUDA-graph-ready step (device-side position, full-cache masked attention) gives the
    logits of the ordinary decode path."""
    write_checkpoint(tmp_path, CONFIGS[name])
    ours = from_dir(tmp_path)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    a, b = ours.new_cache(64), ours.new_cache(64)
    ours.forward(ids[:, :20], a, 0)
    ours.forward(ids[:, :20], b, 0)
    pos = torch.tensor(20)
    for p in range(20, 30):
        expected = ours.forward(ids[:, p:p + 1], a, p)[:, -1]
        got = ours.decode_step(ids[:, p:p + 1], pos, b)
        pos += 1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.k[:, :, :, :30], a.k[:, :, :, :30])
