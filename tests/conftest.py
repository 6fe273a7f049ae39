"""Fixtures shared by every test folder. Torch-free at import: the torch-free packages' test
checks that importing them in a fresh interpreter loads no torch, and the UI tests need none;
the fixtures that need the engine import it when they run."""

import os
import shutil

import pytest

from fakes.checkpoints import write_tiny_checkpoint

# Triton kernels run in the interpreter on machines without a GPU; it must be set before the
# first import of triton (which the model's kernels import).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item):
    """Tests marked ``cuda`` run only where torch sees a CUDA GPU."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _user_dirs(tmp_path_factory, monkeypatch):
    """Chat history and settings of each test in folders of its own, never the user's."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("CHATAPP_CONFIG_DIR", str(root / "config"))


@pytest.fixture(scope="session")
def embedded_session():
    """The embedded model on CPU, loaded once for the test run."""
    from engine.events import LoadModel
    from engine.session import Session

    return Session.load(LoadModel(device="cpu"))


@pytest.fixture(scope="session")
def hf_reference(embedded_session):
    """transformers' LlamaForCausalLM on the same converted weights: the reference."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(embedded_session.path), dtype=torch.float32).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, embedded_session):
    return write_tiny_checkpoint(tmp_path / "tiny", embedded_session.path)
