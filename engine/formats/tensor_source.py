"""Reading tensors from Hugging Face safetensors checkpoints, single file or sharded,
with errors that name the file and tensor at fault."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import EngineError

INDEX_NAME = "model.safetensors.index.json"


class TensorSource:
    """Name -> tensor over the safetensors files of one checkpoint folder. Tensors are
    read lazily (memory-mapped) and each is read at most once by the caller."""

    def __init__(self, model_dir: Path, files: list[Path] | None = None):
        """All the checkpoint's files (by its index, or every *.safetensors), or just ``files``."""
        self.model_dir = Path(model_dir)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._read: set[str] = set()
        index = self.model_dir / INDEX_NAME
        if files is not None:
            for path in files:
                for name in self._keys(self._open(Path(path))):
                    self._where[name] = Path(path)
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise EngineError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in weight_map.items()):
                raise EngineError(f"{index}: not a valid safetensors index (weight_map must map tensor names "
                                  "to file names)")
            files = sorted(set(weight_map.values()))
            inside = self.model_dir.resolve()
            for f in files:
                if not (self.model_dir / f).resolve().is_relative_to(inside):
                    raise EngineError(f"{index}: {f!r} is outside the checkpoint folder; refused")
            for f in files:
                self._open(self.model_dir / f)
            for name, f in weight_map.items():
                path = self.model_dir / f
                if name not in self._keys(path):
                    raise EngineError(f"{path}: tensor {name!r} listed in {INDEX_NAME} is not in the file")
                self._where[name] = path
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
                if pickles:
                    raise EngineError(
                        f"{self.model_dir}: no *.safetensors files, only {pickles[0]}, a PyTorch pickle, which chatapp "
                        "does not load; convert it once with transformers (weights-only unpickling): python -c "
                        "\"from transformers import AutoModelForCausalLM as M; "
                        f"M.from_pretrained('{self.model_dir}').save_pretrained('{self.model_dir}-safetensors')\"")
                raise EngineError(f"{self.model_dir}: no *.safetensors files found")
            for path in files:
                for name in self._keys(self._open(path)):
                    self._where[name] = path

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], path: Path) -> "TensorSource":
        """The same interface over tensors already in memory (e.g. a .pt file's state dict)."""
        src = cls.__new__(cls)
        src.model_dir = Path(path).parent
        src._handles = {Path(path): _InMemory(tensors)}
        src._where = dict.fromkeys(tensors, Path(path))
        src._read = set()
        return src

    def _open(self, path: Path) -> Path:
        try:
            with open(path, "rb"):  # the OS's own reason: no such file, permission denied, a symlink loop
                pass
        except OSError as e:
            raise EngineError(f"{path}: cannot read it ({e.strerror or e})") from None
        try:
            self._handles[path] = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error type for bad headers and sizes
            raise EngineError(f"{path}: not a valid safetensors file ({e})") from None
        return path

    def _keys(self, path: Path) -> set[str]:
        return set(self._handles[path].keys())

    def files(self) -> list[Path]:
        """The files the tensors come from."""
        return sorted(set(self._where.values()))

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise EngineError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        path = self._where[name]
        self._read.add(name)
        try:
            return self._handles[path].get_tensor(name)
        except Exception as e:
            raise EngineError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def claim(self, names) -> None:
        """Count ``names`` as used although they were not read here (e.g. a cached quantized copy stood in)."""
        self._read.update(names)

    def unread(self) -> list[str]:
        """The tensors nobody asked for, in name order."""
        return sorted(set(self._where) - self._read)

    def get_shaped(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.get(name)
        if tuple(t.shape) != tuple(shape):
            raise EngineError(
                f"{self._where[name]}: tensor {name!r} has shape {list(t.shape)}, the config implies {list(shape)}"
            )
        return t


class _InMemory:
    """What TensorSource needs of a safetensors handle, over a dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def keys(self):
        return self._tensors.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]
