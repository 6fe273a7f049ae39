"""Model configuration: Hugging Face ``config.json`` (Llama 2, Llama 3.x, SmolLM2) mapped
onto the one set of fields our Llama implementation needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    generation: dict = field(default_factory=dict, hash=False, compare=False)  # generation_config.json
    quantization_config: dict | None = field(default=None, hash=False, compare=False)  # as in config.json
    medusa: dict | None = field(default=None, hash=False, compare=False)  # config.json "medusa" (modelopt export)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope(raw: dict, source: str) -> tuple[float, RopeScaling]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in _SUPPORTED_ROPE:
        raise EngineError(f"{source}: rope scaling type {kind!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE)})")
    try:
        rs = RopeScaling(
            kind=kind,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                merged.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
            ),
        )
    except (TypeError, ValueError) as e:
        raise EngineError(f"{source}: bad rope scaling parameters: {e}") from None
    return theta, rs


def config_from_dict(raw: dict, source: str = "config.json", generation: dict | None = None) -> ModelConfig:
    """Map a Hugging Face Llama config (plus its generation_config, if any) to ModelConfig."""
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise EngineError(f"{source}: model_type {model_type!r} is not supported (chatapp runs Llama-family models)")
    for name in _REQUIRED:
        if name not in raw:
            raise EngineError(f"{source}: missing required field {name!r}")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        theta, scaling = _rope(raw, source)
        eos = _ids((generation or {}).get("eos_token_id")) or _ids(raw.get("eos_token_id"))
        cfg = ModelConfig(
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=_ids(raw.get("bos_token_id"))[0] if raw.get("bos_token_id") is not None else None,
            eos_token_ids=eos,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            generation=dict(generation or {}),
            quantization_config=raw.get("quantization_config"),
            medusa=raw.get("medusa"),
        )
    except (TypeError, ValueError) as e:
        raise EngineError(f"{source}: bad value: {e}") from None
    if heads % kv_heads:
        raise EngineError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    return cfg


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: expected a JSON object")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` when present) from a checkpoint folder."""
    path = Path(model_dir) / "config.json"
    raw = _read_json(path)
    gen_path = Path(model_dir) / "generation_config.json"
    generation = _read_json(gen_path) if gen_path.exists() else None
    return config_from_dict(raw, str(path), generation)
