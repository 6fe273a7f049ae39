"""A decoding set-up written as one short spec, for `chatapp compare`: which model, how it is
decoded, its weight format and the sampling settings.

    parse_setup("medusa,fp8")                          # Medusa heads, weights quantized to FP8 on load
    parse_setup("medusa,dmc,fp8")                      # Medusa over a DMC cache, on FP8 weights
    parse_setup("plain,temperature=0.8,seed=1")        # plain decoding, sampled
    parse_setup("model=meta-llama/Llama-3.1-8B-Instruct,plain")

A spec is comma-separated terms: a proposer (medusa) and a cache (dmc), each at most once, or
plain; a weight format (fp8: quantized to FP8 on load; bf16: converted to bf16 on load; stored:
as the checkpoint stores them, the default); or key=value with model, medusa-choices,
temperature, top_p, top_k, seed, max_new_tokens. Unset sampling settings are greedy
(temperature 0)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import EngineError
from engine.events import CACHES, PROPOSERS, QUANTIZE, LoadModel, SamplingParams, decoding_name

STORED = "stored"
WEIGHT_FORMATS = (*QUANTIZE, STORED)  # converted on load, or as stored
KEYS = ("model", "medusa-choices", "temperature", "top_p", "top_k", "seed", "max_new_tokens")
_ALIASES = {"medusa_choices": "medusa-choices", "top-p": "top_p", "top-k": "top_k",
            "max-new-tokens": "max_new_tokens"}
_EXPECTED = (f"expected {', '.join(('plain', *PROPOSERS, *CACHES) + WEIGHT_FORMATS)} or key=value with model, medusa-choices, temperature, "
             "top_p, top_k, seed, max_new_tokens")


@dataclass
class Setup:
    label: str  # the normalised spec, e.g. "medusa,fp8"
    load: LoadModel
    params: SamplingParams

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0


def _number(spec: str, key: str, text: str, kind, low, high=None, *, low_open: bool = False):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise EngineError(f"compare set-up {spec!r}: {key}={text!r} is not {what}") from None
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        if high is None:
            bound = f"above {low:g}" if low_open else f"at least {low:g}"
        else:
            bound = f"in ({low:g}, {high:g}]" if low_open else f"in [{low:g}, {high:g}]"
        raise EngineError(f"compare set-up {spec!r}: {key}={text} must be {bound}")
    return value


def parse_setup(spec: str, *, model: str | None = None, device: str | None = None, context: int | None = None,
                max_new_tokens: int = 256) -> Setup:
    """Read one set-up spec. ``model``, ``device``, ``context`` and ``max_new_tokens`` are the
    defaults that the spec's own terms override. Raises EngineError naming the term at fault."""
    parts: list[str] = []  # the decoding's terms: plain, or a proposer and/or a cache
    weights: str | None = None
    values: dict[str, str] = {}
    terms = [t.strip() for t in str(spec).split(",")]
    if not any(terms):
        raise EngineError(f"compare set-up {spec!r} is empty ({_EXPECTED})")
    for term in terms:
        if not term:
            continue
        if "=" in term:
            key, _, value = term.partition("=")
            key, value = key.strip().lower(), value.strip()
            key = _ALIASES.get(key, key)
            if key not in KEYS:
                raise EngineError(f"compare set-up {spec!r}: unknown key {key!r} in {term!r} ({_EXPECTED})")
            if not value:
                raise EngineError(f"compare set-up {spec!r}: {key} has no value")
            if key in values:
                raise EngineError(f"compare set-up {spec!r}: {key} is given twice")
            values[key] = value
            continue
        word = term.lower()
        if word in ("plain", *PROPOSERS, *CACHES):
            if word not in parts:
                parts.append(word)
        elif word in WEIGHT_FORMATS:
            if weights is not None and weights != word:
                raise EngineError(f"compare set-up {spec!r}: two weight formats, {weights!r} and {word!r}")
            weights = word
        else:
            raise EngineError(f"compare set-up {spec!r}: unknown term {term!r} ({_EXPECTED})")

    try:
        decoding = decoding_name("+".join(parts) or "plain")
    except EngineError as e:
        raise EngineError(f"compare set-up {spec!r}: {str(e).split(': ', 1)[1]}") from None
    if "medusa-choices" in values and "medusa" not in decoding:
        raise EngineError(f"compare set-up {spec!r}: medusa-choices applies to medusa decoding only")

    params = SamplingParams(max_new_tokens=max_new_tokens)
    if "temperature" in values:
        params.temperature = _number(spec, "temperature", values["temperature"], float, 0.0)
    if "top_p" in values:
        params.top_p = _number(spec, "top_p", values["top_p"], float, 0.0, 1.0, low_open=True)
    if "top_k" in values:
        params.top_k = _number(spec, "top_k", values["top_k"], int, 0)
    if "seed" in values:
        params.seed = _number(spec, "seed", values["seed"], int, 0)
    if "max_new_tokens" in values:
        params.max_new_tokens = _number(spec, "max_new_tokens", values["max_new_tokens"], int, 1)

    load = LoadModel(model=values.get("model", model), device=device, context=context,
                     quantize=None if weights in (None, STORED) else weights, decoding=decoding,
                     medusa_choices=values.get("medusa-choices"))

    # the label: the terms in a fixed order, defaults (stored weights, greedy) left out
    label = decoding.split("+") + ([weights] if weights not in (None, STORED) else [])  # "medusa,dmc,fp8"
    if "model" in values:
        label.append(f"model={values['model']}")
    if "medusa-choices" in values:
        label.append(f"medusa-choices={values['medusa-choices']}")
    for key in ("temperature", "top_p", "top_k", "seed", "max_new_tokens"):
        if key in values:
            label.append(f"{key}={getattr(params, key):g}")
    return Setup(",".join(label), load, params)
