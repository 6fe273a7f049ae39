"""Model configuration: Hugging Face ``config.json`` (Llama 2, Llama 3.x, SmolLM2) mapped
onto the one set of fields our Llama implementation needs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError

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
    sampling: dict = field(default_factory=dict, hash=False, compare=False)  # its checked sampling (recommended_sampling)
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
    for name, value in (("rope_theta", theta), ("rope factor", rs.factor), ("rope low_freq_factor", rs.low_freq_factor),
                        ("rope high_freq_factor", rs.high_freq_factor),
                        ("rope original_max_position_embeddings", rs.original_max_position_embeddings)):
        if not math.isfinite(value) or value <= 0:
            raise EngineError(f"{source}: {name} is {value}; it must be a positive number")
    if kind == "llama3" and rs.high_freq_factor <= rs.low_freq_factor:
        raise EngineError(f"{source}: rope high_freq_factor ({rs.high_freq_factor}) must be above low_freq_factor "
                          f"({rs.low_freq_factor})")
    return theta, rs


def _size(raw: dict, key: str, source: str, default=None) -> int:
    """A size field of config.json: a positive integer (``default`` when left out or null)."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise EngineError(f"{source}: missing required field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"{source}: {key} is {json.dumps(value)}; it must be a positive integer")
    return value


def recommended_sampling(generation: dict, source: str) -> dict:
    """The sampling that generation_config.json recommends, checked once as the model loads:
    {} (greedy) without ``do_sample``, else SamplingParams' temperature / top_p / top_k (a null
    or missing value: no change from plain sampling). A bad value is an EngineError naming it."""
    if not generation.get("do_sample"):
        return {}
    checks = {"temperature": (1.0, lambda v: v >= 0, "a number ≥ 0"),
              "top_p": (1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              "top_k": (0, lambda v: v >= 0 and float(v).is_integer(), "an integer ≥ 0")}
    out = {}
    for key, (default, ok, what) in checks.items():
        value = generation.get(key)
        if value is None:
            out[key] = default
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise EngineError(f"{source}: {key} is {json.dumps(value)}; expected {what}")
        out[key] = int(value) if key == "top_k" else float(value)
    return out


def config_from_dict(raw: dict, source: str = "config.json", generation: dict | None = None,
                     generation_source: str = "generation_config.json") -> ModelConfig:
    """Map a Hugging Face Llama config (plus its generation_config, if any) to ModelConfig. Every
    size is checked to be a positive integer and every float to be finite, once, here."""
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise EngineError(f"{source}: model_type {model_type!r} is not supported (chatapp runs Llama-family models)")
    hidden = _size(raw, "hidden_size", source)
    heads = _size(raw, "num_attention_heads", source)
    kv_heads = _size(raw, "num_key_value_heads", source, heads)
    if hidden % heads and raw.get("head_dim") is None:
        raise EngineError(f"{source}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    head_dim = _size(raw, "head_dim", source, hidden // heads)
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise EngineError(f"{source}: rms_norm_eps is {json.dumps(eps)}; it must be a positive number")
    sampling = recommended_sampling(generation or {}, generation_source)
    try:
        theta, scaling = _rope(raw, source)
        eos = _ids((generation or {}).get("eos_token_id")) or _ids(raw.get("eos_token_id"))
        cfg = ModelConfig(
            hidden_size=hidden,
            intermediate_size=_size(raw, "intermediate_size", source),
            num_layers=_size(raw, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_size(raw, "vocab_size", source),
            max_position_embeddings=_size(raw, "max_position_embeddings", source, 2048),
            rms_norm_eps=float(eps),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=_ids(raw.get("bos_token_id"))[0] if raw.get("bos_token_id") is not None else None,
            eos_token_ids=eos,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            generation=dict(generation or {}),
            sampling=sampling,
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
    except OSError as e:  # a folder, a symlink loop, no permission
        raise EngineError(f"{path}: cannot read it ({e.strerror or e})") from None
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
    return config_from_dict(raw, str(path), generation, str(gen_path))
