"""Reading a PyTorch pickle (a Megatron checkpoint, a Medusa heads ``.pt``) without running it:
``torch.load(weights_only=True)`` with an explicit allow-list, and errors that say what was
refused and why, in one line."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from engine.errors import EngineError


def load_weights_only(path: Path, safe_globals: list = (), allowed: str = "tensors") -> object:
    """The object pickled in ``path``, unpickled with PyTorch's weights-only unpickler plus
    ``safe_globals`` ((stand-in, "module.Name") pairs). ``allowed`` says in words what the
    allow-list holds, for the message when the file asks for something else."""
    path = Path(path)
    try:
        if os.stat(path).st_size == 0:
            raise EngineError(f"{path}: the file is empty")
    except OSError as e:
        raise EngineError(f"{path}: cannot read it ({e.strerror or e})") from None

    def load(mmap: bool):
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return load(mmap=False)  # a file in the pre-zip format: read into memory
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL ([\w.]+)|function ([\w.<>]+)|got (<class [^>]+>)", str(e))
        if what:
            culprit = next(g for g in what.groups() if g)
            raise EngineError(f"{path}: refused to load it: it asks for {culprit}, which is not on the allow-list "
                              f"({allowed}); unpickling it without that check would run code from the file, so "
                              "chatapp does not, and nothing in it was run") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise EngineError(f"{path}: not a PyTorch file this loader can read safely ({reason}); nothing in it was "
                          "run") from None
    except OSError as e:
        raise EngineError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (RuntimeError, EOFError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"{path}: not a readable PyTorch file ({first})") from None
