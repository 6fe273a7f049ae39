"""The DMC retrofit delta format: what training/dmc.py writes and the loader applies to a Hugging
Face checkpoint (which models qualify for DMC and where their delta is: engine/hub/layout.py).

Delta format (one safetensors file; metadata ``format`` = ``chatapp-dmc-delta``, ``version`` 1,
``init_val``, ``window``, ``model``, and the base shape ``num_layers``, ``num_heads``,
``num_kv_heads``, ``head_dim``, ``hidden_size``):

    model.layers.N.self_attn.q_proj.decision_rows  [num_heads, hidden]     row D-1 of each query head
    model.layers.N.self_attn.k_proj.decision_rows  [num_kv_heads, hidden]  row D-1 of each key head
    <any base tensor name>                          its base shape          replaces it whole
    <base weight name>.lora_a, .lora_b              [r, in], [out, r]       a low-rank update: W + b @ a

The decision rows are applied last (over a replaced or updated q_proj / k_proj). Every layer
needs its q and k decision rows, either as ``decision_rows`` or within a whole replaced q_proj /
k_proj weight; a tensor the base checkpoint does not have, a shape that differs, a missing layer
or metadata that does not match the model is refused with an EngineError."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.formats.tensor_source import TensorSource
from engine.config import ModelConfig
from engine.errors import EngineError

FORMAT = "chatapp-dmc-delta"
VERSION = 1
ROWS = ".decision_rows"
LOW_RANK = (".lora_a", ".lora_b")


def delta_metadata(cfg: ModelConfig, model: str, init_val: float, window: int) -> dict[str, str]:
    return {"format": FORMAT, "version": str(VERSION), "model": model, "init_val": repr(float(init_val)),
            "window": str(int(window)), "num_layers": str(cfg.num_layers), "num_heads": str(cfg.num_heads),
            "num_kv_heads": str(cfg.num_kv_heads), "head_dim": str(cfg.head_dim),
            "hidden_size": str(cfg.hidden_size)}


def decision_row_index(n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows D-1 of each head of a q_proj / k_proj weight [n_heads * D, hidden]."""
    return torch.arange(n_heads) * head_dim + head_dim - 1


class PatchedSource(TensorSource):
    """A TensorSource with some tensors replaced (the base is read lazily as before)."""

    def __init__(self, base: TensorSource, replaced: dict[str, torch.Tensor], delta_path: Path):
        self.model_dir, self._base, self._replaced, self._delta = base.model_dir, base, replaced, delta_path

    def __contains__(self, name: str) -> bool:
        return name in self._base

    def names(self) -> set[str]:
        return self._base.names()

    def files(self) -> list[Path]:
        """The base checkpoint's files and the delta (what a quantized copy's cache key is made of)."""
        return sorted({*self._base.files(), self._delta})

    def file_of(self, name: str) -> Path:
        return self._delta if name in self._replaced else self._base.file_of(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self._replaced:
            self._base.claim([name])
            return self._replaced[name]
        return self._base.get(name)

    def claim(self, names) -> None:
        self._base.claim(names)

    def unread(self) -> list[str]:
        return self._base.unread()


def read_delta(path: Path, cfg: ModelConfig, base: TensorSource) -> tuple[dict[str, torch.Tensor], dict]:
    """The delta's tensors checked against the base checkpoint, and its settings
    {"init_val", "window"}."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EngineError(f"{path}: not a valid safetensors file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise EngineError(f"{path}: not a DMC delta of version {VERSION} (metadata format={meta.get('format')!r}, "
                          f"version={meta.get('version')!r})")
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
        want = getattr(cfg, key)
        if meta.get(key) != str(want):
            raise EngineError(f"{path}: made for a model with {key}={meta.get(key)}, this one has {want}")
    try:
        settings = {"init_val": float(meta["init_val"]), "window": int(meta["window"])}
    except (KeyError, ValueError) as e:
        raise EngineError(f"{path}: bad or missing DMC setting in the metadata ({e})") from None
    if settings["window"] < 1:
        raise EngineError(f"{path}: DMC window {settings['window']}: must be at least 1")
    h, d = cfg.hidden_size, cfg.head_dim
    whole, rows, low = {}, {}, {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise EngineError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected a float type")
        if name.endswith(ROWS):
            target = name[: -len(ROWS)] + ".weight"
            n = cfg.num_heads if target.endswith("q_proj.weight") else cfg.num_kv_heads
            if not target.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) or target not in base:
                raise EngineError(f"{path}: tensor {name!r} replaces nothing in the model")
            if tuple(t.shape) != (n, h):
                raise EngineError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {[n, h]}")
            rows[target] = t
        elif name.endswith(LOW_RANK):
            target = name[: -len(".lora_a")]
            if target not in base or base.get(target).dim() != 2:
                raise EngineError(f"{path}: tensor {name!r} updates no weight matrix of the model")
            low.setdefault(target, {})[name[-1]] = t
        else:
            if name not in base:
                raise EngineError(f"{path}: tensor {name!r} is not in the base checkpoint")
            want = tuple(base.get(name).shape)
            if tuple(t.shape) != want:
                raise EngineError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the base has {list(want)}")
            whole[name] = t
    for target, ab in low.items():
        out_f, in_f = base.get(target).shape
        a, b = ab.get("a"), ab.get("b")
        if a is None or b is None:
            raise EngineError(f"{path}: {target} has only one of lora_a, lora_b")
        if target in whole:
            raise EngineError(f"{path}: {target} is given both whole and as a low-rank update")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise EngineError(f"{path}: {target}.lora_a {list(a.shape)} / lora_b {list(b.shape)} do not make a "
                              f"[{out_f}, {in_f}] update")
        w = base.get(target)
        whole[target] = (w.float() + b.float() @ a.float()).to(w.dtype)
    for li in range(cfg.num_layers):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{li}.self_attn.{proj}.weight"
            if name not in rows and name not in whole:
                raise EngineError(f"{path}: no decision rows for {name} (expected {name[:-len('.weight')]}{ROWS})")
    for target, r in rows.items():
        w = (whole[target] if target in whole else base.get(target)).clone()
        w[decision_row_index(r.shape[0], d)] = r.to(w.dtype)
        whole[target] = w
    return whole, settings
