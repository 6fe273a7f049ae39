"""Requests the front end sends to the engine and the events it gets back: plain dataclasses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from engine.errors import EngineError

# The decodings, named once for every front end: proposers (Medusa heads, lookup in the
# conversation, both, or none) over a KV cache (dense, or DMC), written "proposers+cache".
PROPOSERS = ("medusa", "lookup")
CACHES = ("dmc",)
DECODINGS = ("plain", "medusa", "lookup", "medusa+lookup", "dmc", "medusa+dmc", "lookup+dmc", "medusa+lookup+dmc")


def decoding_name(text: str) -> str:
    """The decoding a user's spelling names: terms joined by "+" or "," in any order ("dmc,medusa"
    -> "medusa+dmc"; "plain" alone), or a one-line EngineError."""
    terms = [t.strip().lower() for t in text.replace(",", "+").split("+") if t.strip()]
    unknown = [t for t in terms if t not in (*PROPOSERS, *CACHES, "plain")]
    if unknown or not terms:
        raise EngineError(f"decoding {text!r}: not a decoding (supported: {', '.join(DECODINGS)})")
    if "plain" in terms and len(terms) > 1:
        raise EngineError(f"decoding {text!r}: plain is a decoding of its own, not a part of one")
    if len(set(terms)) != len(terms) or sum(t in CACHES for t in terms) > 1:
        raise EngineError(f"decoding {text!r}: each proposer ({', '.join(PROPOSERS)}) at most once and one cache "
                          f"({', '.join(CACHES)})")
    return "+".join([t for t in (*PROPOSERS, *CACHES) if t in terms]) or "plain"


def decoding_parts(decoding: str) -> tuple[tuple[str, ...], str | None]:
    """(proposers, cache) of a decoding name: "medusa+lookup+dmc" -> (("medusa", "lookup"), "dmc"),
    "plain" -> ((), None)."""
    terms = decoding.split("+")
    return tuple(t for t in PROPOSERS if t in terms), next((t for t in terms if t in CACHES), None)
QUANTIZE = ("fp8", "bf16")  # what --quantize accepts: FP8 weights rounded on load, or bfloat16 weights
SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what torch.Generator.manual_seed takes on every device
DEFAULT_CONTEXT = 8192  # KV cache length when none is asked for: min(the model's context, this)


# ---- requests ------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def check(self) -> None:
        """Every setting in range (NaN and infinities included), or a one-line EngineError."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise EngineError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass
class LoadModel:
    model: str | None = None  # id or path; None = the embedded default model
    device: str | None = None  # cpu | cuda; None = cuda when available
    context: int | None = None  # KV cache length; None = min(model's context, DEFAULT_CONTEXT)
    quantize: str | None = None  # "fp8": quantize a high-precision checkpoint's linear layers on load
    decoding: str = "plain"  # plain | medusa (the checkpoint's Medusa heads, or the ones shipped for it)
    #                          | lookup (drafts from earlier in the conversation; any model)
    #                          | medusa+lookup (both in one tree)
    #                          | dmc (Dynamic Memory Compression: a Megatron DMC checkpoint, or a shipped retrofit)
    #                          | medusa+dmc, lookup+dmc, medusa+lookup+dmc (the drafts verified over the DMC cache)
    medusa_choices: str | None = None  # Medusa tree: "auto" (None: best for this device), "card", or a JSON file
    tokenizer: str | None = None  # for a checkpoint without one (Megatron DMC): a tokenizer.model or a folder


@dataclass
class Generate:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    params: SamplingParams | None = None  # None = the model's recommended settings (generation_config.json)


# ---- events --------------------------------------------------------------------------------
@dataclass
class Progress:
    message: str
    fraction: float | None = None


@dataclass
class ModelInfo:
    name: str
    path: str
    device: str
    dtype: str
    n_params: int
    weight_bytes: int
    context: int
    decoding: str = "plain"
    quantization: str | None = None  # e.g. "fp8"
    medusa_tree: str | None = None  # e.g. "auto (6 nodes)": how the verified tree was chosen


@dataclass
class Loaded:
    info: ModelInfo


@dataclass
class Token:
    text: str  # new text; may be "" while a multi-byte character is incomplete
    token_ids: list[int]
    n_accepted: int  # tokens this step produced (1 for plain decoding)
    drafted_chars: int = 0  # how many of ``text``'s last characters came from accepted drafts
    drafted_by: list[str] = field(default_factory=list)  # per token: the proposer that drafted it ("" for none)


@dataclass
class Step:
    accepted: int
    tok_per_s: float  # decode rate so far
    vram_used: int  # bytes in use on the device (process RSS on CPU)
    vram_total: int
    kv_bytes: int  # K/V bytes the cache holds now
    kv_bytes_dense: int = 0  # what a plain cache holds for the same tokens (= kv_bytes unless DMC)


@dataclass
class GenerationStats:
    text: str
    token_ids: list[int]
    n_prompt_tokens: int
    n_generated: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    steps: int
    accepted_per_step: list[int]
    peak_memory_bytes: int
    device: str
    model: str
    decoding: str
    quantization: str | None = None
    medusa_tree: str | None = None  # how the verified tree was chosen (Medusa only)
    server_metrics: dict | None = None  # remote engine: the server's own figures (remote_metrics.summarize)
    kv_cache_bytes: int = 0  # K/V bytes the cache holds at the end
    kv_cache_bytes_dense: int = 0  # a plain cache for the same tokens
    kv_compression: float = 1.0  # dense / held (1.0 unless DMC)
    speculation: dict | None = None  # drafts, acceptance by position, per proposer (speculative/counters.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Done:
    reason: str  # eos | length | cancelled
    stats: GenerationStats


@dataclass
class Error:
    message: str


Event = Progress | Loaded | Token | Step | Done | Error
