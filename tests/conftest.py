import pytest
import torch

from engine.events import LoadModel
from engine.session import Session


@pytest.fixture(scope="session")
def embedded_session() -> Session:
    """The embedded model on CPU, loaded once for the test run."""
    return Session.load(LoadModel(device="cpu"))


@pytest.fixture(scope="session")
def hf_reference(embedded_session):
    """transformers' LlamaForCausalLM on the same converted weights: the reference."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(embedded_session.path), dtype=torch.float32).eval()
