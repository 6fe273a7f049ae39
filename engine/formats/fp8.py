"""FP8 checkpoint formats: which linear layers are quantized and how to read them.

- modelopt (TensorRT Model Optimizer) export: ``hf_quant_config.json`` (or ``quantization_config``
  with ``quant_method: modelopt`` in config.json), quant_algo FP8: float8_e4m3fn weights, scalar
  ``weight_scale``, static scalar ``input_scale``; ``exclude_modules`` wildcards; optional
  ``k_scale``/``v_scale`` KV-cache scales (read, checked and not used: our KV cache stays in the
  model's dtype).
- compressed-tensors: ``quantization_config.quant_method == "compressed-tensors"``, format
  float-quantized: FP8 weights with per-channel (or per-tensor) ``weight_scale``, activations
  dynamic per token (or static per tensor with ``input_scale``); ``ignore`` list; 2:4-sparse
  weights stored dense or as ``sparse-24-bitmask`` (``compressed`` + ``bitmask`` + ``shape``).

Scales are dequantization multipliers in both. Fused layers (q|k|v, gate|up) keep each part's
weight scale (per-tensor scales become a per-channel vector, exactly) and take the largest
input scale."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import torch

from engine.formats.tensor_source import TensorSource
from engine.errors import EngineError

FP8 = torch.float8_e4m3fn


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: expected a JSON object")
    return data


class Fp8Format:
    """What the two formats share: reading FP8 weights and scales, fusing parts."""

    name = ""
    dynamic_activations = True
    per_channel = False

    def __init__(self, source: str):
        self.source = source  # the file that declared the format, for messages

    def quantized(self, module: str) -> bool:
        raise NotImplementedError

    def _weight(self, src: TensorSource, module: str, shape: tuple[int, int]) -> torch.Tensor:
        w = src.get_shaped(module + ".weight", shape)
        if w.dtype != FP8:
            raise EngineError(f"{src.file_of(module + '.weight')}: tensor '{module}.weight' has dtype {w.dtype}, "
                              f"{self.name} FP8 needs float8_e4m3fn")
        return w

    def _scale(self, src: TensorSource, name: str, rows: int | None) -> torch.Tensor:
        """A scale tensor: scalar when rows is None, else [rows] (a scalar is broadcast)."""
        s = src.get(name).float()
        if rows is None or s.numel() == 1:
            if s.numel() != 1:
                raise EngineError(f"{src.file_of(name)}: tensor {name!r} has shape {list(s.shape)}, expected a scalar")
            s = s.reshape(())
        else:
            if s.numel() != rows:
                raise EngineError(f"{src.file_of(name)}: tensor {name!r} has shape {list(s.shape)}, "
                                  f"expected {rows} per-channel scales")
            s = s.reshape(rows)
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise EngineError(f"{src.file_of(name)}: tensor {name!r} holds a scale that is not a positive number")
        return s

    def read(self, src: TensorSource, parts: list[tuple[str, tuple[int, int]]], device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The fused parts' e4m3 weight [N, K], weight scale ([1]: per tensor, else [N]) and static
        input scale (None: dynamic per-token activations), on ``device``: an Fp8Linear's arguments."""
        weights, scales, input_scales = [], [], []
        for module, shape in parts:
            weights.append(self._weight(src, module, shape))
            s = self._scale(src, module + ".weight_scale", shape[0] if self.per_channel else None)
            scales.append(s.expand(shape[0]) if s.dim() == 0 else s)
            if not self.dynamic_activations:
                input_scales.append(self._scale(src, module + ".input_scale", None))
        scale = torch.cat(scales)
        if bool((scale == scale[0]).all()):
            scale = scale[:1]  # one per-tensor scale
        input_scale = torch.stack(input_scales).max() if input_scales else None
        weight = torch.cat(weights).to(device)
        return weight, scale.to(device), None if input_scale is None else input_scale.to(device)



class ModelOptFp8(Fp8Format):
    name = "modelopt"
    dynamic_activations = False

    def __init__(self, source: str, quant: dict):
        super().__init__(source)
        algo = str(quant.get("quant_algo", "")).upper()
        if algo != "FP8":
            raise EngineError(f"{source}: quant_algo {quant.get('quant_algo')!r} is not supported "
                              "(supported: FP8, per-tensor weights and static per-tensor activations)")
        kv = quant.get("kv_cache_quant_algo")
        if kv not in (None, "FP8", "fp8"):
            raise EngineError(f"{source}: kv_cache_quant_algo {kv!r} is not supported (supported: none, FP8)")
        self.kv_scales = kv is not None
        patterns = quant.get("exclude_modules") or quant.get("ignore") or []
        self.exclude = [p for p in patterns if isinstance(p, str)]

    def quantized(self, module: str) -> bool:
        # wildcards as modelopt writes them; excluding a module excludes what it contains
        return not any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*") for p in self.exclude)

    def check_kv_scales(self, src: TensorSource, num_layers: int) -> None:
        """KV-cache scales are read and checked; our KV cache stays in the model's dtype, so
        they are not used."""
        if not self.kv_scales:
            return
        for li in range(num_layers):
            for kind in ("k", "v"):
                name = f"model.layers.{li}.self_attn.{kind}_proj.{kind}_scale"
                if name in src:
                    self._scale(src, name, None)


class CompressedTensorsFp8(Fp8Format):
    name = "compressed-tensors"

    def __init__(self, source: str, qc: dict):
        super().__init__(source)
        fmt = qc.get("format")
        if fmt not in (None, "float-quantized", "naive-quantized"):
            raise EngineError(f"{source}: quantization_config.format {fmt!r} is not supported "
                              "(supported: float-quantized FP8)")
        groups = qc.get("config_groups") or {}
        if not groups:
            raise EngineError(f"{source}: quantization_config.config_groups is empty")
        self.targets, strategies, dynamics = [], set(), set()
        for gname, group in groups.items():
            w = group.get("weights") or {}
            where = f"{source}: quantization_config.config_groups.{gname}"
            if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
                raise EngineError(f"{where}.weights: {w.get('num_bits')}-bit {w.get('type')} weights are not "
                                  "supported (supported: 8-bit float)")
            if w.get("strategy") not in ("channel", "tensor"):
                raise EngineError(f"{where}.weights.strategy {w.get('strategy')!r} is not supported "
                                  "(supported: channel, tensor)")
            a = group.get("input_activations")
            if a is None:
                raise EngineError(f"{where}: weight-only FP8 is not supported (input_activations missing)")
            if a.get("type") != "float" or int(a.get("num_bits", 0)) != 8:
                raise EngineError(f"{where}.input_activations: only 8-bit float activations are supported")
            dyn = bool(a.get("dynamic"))
            if (dyn and a.get("strategy") != "token") or (not dyn and a.get("strategy") != "tensor"):
                raise EngineError(f"{where}.input_activations: strategy {a.get('strategy')!r} with dynamic={dyn} is "
                                  "not supported (supported: dynamic per token, static per tensor)")
            strategies.add(w.get("strategy"))
            dynamics.add(dyn)
            self.targets += list(group.get("targets") or [])
        if len(dynamics) > 1:
            raise EngineError(f"{source}: groups mixing dynamic and static activations are not supported")
        self.per_channel = "channel" in strategies
        self.dynamic_activations = dynamics.pop()
        self.ignore = [str(p) for p in qc.get("ignore") or []]
        sparsity = qc.get("sparsity_config") or {}
        self.sparse_format = sparsity.get("format") if sparsity else None
        if self.sparse_format not in (None, "dense", "sparse-24-bitmask"):
            raise EngineError(f"{source}: sparsity_config.format {self.sparse_format!r} is not supported "
                              "(supported: dense, sparse-24-bitmask)")
        structure = str(sparsity.get("sparsity_structure") or "2:4") if sparsity else None
        if self.sparse_format == "sparse-24-bitmask" and structure.lower() != "2:4":
            raise EngineError(f"{source}: sparsity_structure {structure!r} is not supported with sparse-24-bitmask")
        self.sparse_ignore = [str(p) for p in sparsity.get("ignore") or []] if sparsity else []

    @staticmethod
    def _matches(module: str, patterns: list[str]) -> bool:
        for p in patterns:
            if p.startswith("re:"):
                if re.match(p[3:], module):
                    return True
            elif module == p or module.endswith("." + p):
                return True
        return False

    def quantized(self, module: str) -> bool:
        return not self._matches(module, self.ignore)

    def _weight(self, src: TensorSource, module: str, shape: tuple[int, int]) -> torch.Tensor:
        if self.sparse_format != "sparse-24-bitmask" or module + ".weight" in src:
            return super()._weight(src, module, shape)
        return _bitmask_decompress(src, module, shape)


def _bitmask_decompress(src: TensorSource, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """``sparse-24-bitmask``: ``compressed`` holds the kept values row by row, ``bitmask`` one bit per
    dense element (bit j of byte b is column 8*b + j), ``shape`` the dense shape."""
    rows, cols = shape
    stored_shape = src.get(module + ".shape").reshape(-1).tolist()
    if [int(v) for v in stored_shape] != [rows, cols]:
        raise EngineError(f"{src.file_of(module + '.shape')}: tensor '{module}.shape' is {stored_shape}, "
                          f"the config implies {[rows, cols]}")
    values = src.get(module + ".compressed")
    bitmask = src.get_shaped(module + ".bitmask", (rows, (cols + 7) // 8))
    if values.dtype != FP8:
        raise EngineError(f"{src.file_of(module + '.compressed')}: tensor '{module}.compressed' has dtype "
                          f"{values.dtype}, expected float8_e4m3fn")
    bits = (bitmask.to(torch.uint8)[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    mask = bits.reshape(rows, -1)[:, :cols].bool()
    if int(mask.sum()) != values.numel():
        raise EngineError(f"{src.file_of(module + '.compressed')}: tensor '{module}.compressed' holds "
                          f"{values.numel()} values but '{module}.bitmask' marks {int(mask.sum())}")
    dense = torch.zeros(rows, cols, dtype=torch.uint8)
    dense[mask] = values.reshape(-1).view(torch.uint8)
    return dense.view(FP8)


def detect(model_dir: Path, qc: dict | None) -> Fp8Format | None:
    """The FP8 format of a checkpoint folder (``qc``: its config.json's quantization_config), None
    for a plain (bf16/fp16/fp32) checkpoint, an error for any other quantization."""
    model_dir = Path(model_dir)
    hf_quant = model_dir / "hf_quant_config.json"
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    if method == "compressed-tensors":
        return CompressedTensorsFp8(f"{model_dir / 'config.json'}", qc)
    if method not in (None, "modelopt"):
        raise EngineError(f"{model_dir / 'config.json'}: quantization method {method!r} is not supported "
                          "(supported: FP8 from modelopt or compressed-tensors)")
    if hf_quant.exists():  # modelopt's own file; config.json may mirror it
        data = _read(hf_quant)
        return ModelOptFp8(str(hf_quant), data.get("quantization", data))
    if method == "modelopt":
        return ModelOptFp8(f"{model_dir / 'config.json'}", qc.get("quantization", qc))
    return None
