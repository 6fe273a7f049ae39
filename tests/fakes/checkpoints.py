"""Small checkpoints in Hugging Face layout for tests."""

import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_tiny_checkpoint(path, embedded_path, **overrides):
    """A tiny random Llama in Hugging Face layout that uses the embedded model's tokenizer,
    so that every code path (chat template, detokenization) runs, fast."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **overrides)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (embedded_path / name).exists():
            shutil.copy(embedded_path / name, path / name)
    return path


def write_tiny_gguf(path, source_gguf, vocab: int = 512):
    """A tiny random Llama as a GGUF file written by gguf's own writer, with the first ``vocab``
    tokens of ``source_gguf``'s tokenizer (and the merges among them) and its chat template: what
    the embedded model's conversion reads, small enough to convert in a second."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    src = GGUFReader(str(source_gguf))

    def field(name):
        return src.fields[name].contents()

    tokens = field("tokenizer.ggml.tokens")[:vocab]
    kept = set(tokens)
    merges = [m for m in field("tokenizer.ggml.merges") if "".join(m.split(" ")) in kept
              and all(p in kept for p in m.split(" "))]
    h, ffn, layers, heads, kv = 64, 128, 2, 4, 2
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(h // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(list(field("tokenizer.ggml.token_type")[:vocab]))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(field("tokenizer.chat_template"))
    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", vocab, h)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(h, dtype=np.float32))
        tensor(p + "attn_q.weight", h, h)
        tensor(p + "attn_k.weight", h // heads * kv, h)
        tensor(p + "attn_v.weight", h // heads * kv, h)
        tensor(p + "attn_output.weight", h, h)
        tensor(p + "ffn_gate.weight", ffn, h)
        tensor(p + "ffn_up.weight", ffn, h)
        tensor(p + "ffn_down.weight", h, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
