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
