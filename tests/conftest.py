import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; it must be set before the
# first import of triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.events import LoadModel
from engine.session import Session


@pytest.fixture(autouse=True)
def _user_dirs(tmp_path_factory, monkeypatch):
    """Chat history and settings of each test in folders of its own, never the user's."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("CHATAPP_CONFIG_DIR", str(root / "config"))


@pytest.fixture(scope="session")
def embedded_session() -> Session:
    """The embedded model on CPU, loaded once for the test run."""
    return Session.load(LoadModel(device="cpu"))


@pytest.fixture(scope="session")
def hf_reference(embedded_session):
    """transformers' LlamaForCausalLM on the same converted weights: the reference."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(embedded_session.path), dtype=torch.float32).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_tiny_checkpoint(path, embedded_path, **overrides):
    """A tiny random Llama in Hugging Face layout that uses the embedded model's tokenizer,
    so that every code path (chat template, detokenization) runs, fast."""
    import shutil

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


@pytest.fixture
def tiny_checkpoint(tmp_path, embedded_session):
    return write_tiny_checkpoint(tmp_path / "tiny", embedded_session.path)
