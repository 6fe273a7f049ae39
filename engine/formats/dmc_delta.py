"""Which models can decode with DMC, and the retrofit deltas chatapp ships for Hugging Face
checkpoints (assets/dmc/<model name>.safetensors, made by training/dmc.py).

A model qualifies when it is

- a legacy Megatron DMC checkpoint (engine/megatron_checkpoint.py: mp_rank_00/model_optim_rng.pt;
  the DMC settings come from its stored args), or
- a Hugging Face checkpoint with a retrofit delta: ``dmc/delta.safetensors`` in the checkpoint folder,
  or the one chatapp ships for the model's name.

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
from engine.paths import ASSETS

SHIPPED = ASSETS / "dmc"
FORMAT = "chatapp-dmc-delta"
VERSION = 1
ROWS = ".decision_rows"
LOW_RANK = (".lora_a", ".lora_b")
LOCAL_NAME = "dmc/delta.safetensors"  # a delta inside the checkpoint folder (a subfolder: not a weights file)


def shipped_delta(name: str) -> Path | None:
    path = SHIPPED / f"{name}.safetensors"
    return path if path.is_file() else None


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

    def file_of(self, name: str) -> Path:
        return self._delta if name in self._replaced else self._base.file_of(name)

    def get(self, name: str) -> torch.Tensor:
        return self._replaced[name] if name in self._replaced else self._base.get(name)


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


def load_retrofitted(path: Path, delta: Path, device, dtype=None):
    """LlamaModel of a Hugging Face checkpoint with a DMC delta applied, and its DMC settings."""
    from engine.config import load_config
    from engine.model.llama import LlamaModel
    from engine.formats.fp8 import detect

    cfg = load_config(path)
    if detect(path, cfg.quantization_config) is not None:
        raise EngineError(f"{path}: DMC deltas apply to high-precision checkpoints, this one is quantized")
    base = TensorSource(path)
    replaced, settings = read_delta(delta, cfg, base)
    return LlamaModel.from_source(cfg, PatchedSource(base, replaced, Path(delta)), device, dtype), settings


def is_megatron(path: Path) -> bool:
    from engine.formats.megatron import checkpoint_file

    path = Path(path)
    if (path / "config.json").exists():
        return False
    try:
        checkpoint_file(path)
    except EngineError:
        return False
    return True


def load_dmc_model(name: str, path: Path, device, delta: Path | None = None):
    """(LlamaModel, {"init_val", "window"}, where the DMC weights came from) for a model that
    qualifies for DMC (see the module docstring); an EngineError naming what is missing otherwise."""
    if is_megatron(path):
        from engine.model.llama import LlamaModel
        from engine.formats.megatron import dmc_settings, read_megatron_checkpoint

        cfg, src, info = read_megatron_checkpoint(path)
        settings = dmc_settings(info["args"])
        return LlamaModel.from_source(cfg, src, device), settings, "megatron checkpoint"
    own = Path(path) / LOCAL_NAME
    delta = delta or (own if own.is_file() else shipped_delta(name))
    if delta is None:
        raise EngineError(f"{name}: no DMC for this model: not a Megatron DMC checkpoint, no {LOCAL_NAME} in {path}, "
                          f"and chatapp ships no DMC retrofit for it ({SHIPPED / (name + '.safetensors')})")
    model, settings = load_retrofitted(path, delta, device)
    return model, settings, str(delta)



def tokenizer_dir(path: Path, tokenizer: Path | None = None) -> Path:
    """Where the tokenizer files are: the checkpoint folder, or for a Megatron checkpoint (which
    does not include its tokenizer) ``tokenizer`` when given (a tokenizer.model or a folder with
    tokenizer.json), else its root folder's tokenizer.json or SentencePiece tokenizer.model."""
    if not is_megatron(path):
        return Path(path)
    from engine.formats.megatron import checkpoint_file, checkpoint_root, tokenizer_path
    from engine.tokenizer import sentencepiece_dir

    if tokenizer is not None and Path(tokenizer).is_dir():
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            raise EngineError(f"{tokenizer}: no tokenizer.json in this folder")
        return Path(tokenizer)
    root = checkpoint_root(checkpoint_file(path))
    if tokenizer is None and (root / "tokenizer.json").is_file():
        return root
    return sentencepiece_dir(tokenizer_path(path, tokenizer))
