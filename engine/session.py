"""A loaded model and its decoder: turns a conversation into a stream of events.

The same code serves the CLI (called directly), the UI (through the worker) and the server.
What front ends use: ``Session.load``, ``generate`` / ``generate_ids``, ``encode_chat`` /
``encode_prompt``, ``perplexity``, ``context``, ``vocab_size``, ``info``, ``recommended_params``,
``reset`` and ``close``; the model, tokenizer and decoder are the engine's own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine import memory
from engine.decoding.base import Decoder
from engine.decoding.sampling import Sampler
from engine.decoding.speculative.counters import Counters
from engine.cpu_threads import ThreadTuner
from engine.errors import EngineError
from engine.events import Done, GenerationStats, LoadModel, ModelInfo, SamplingParams, Step, Token
from engine.load import LoadedModel, load
from engine.model.llama import LlamaModel
from engine.perplexity import perplexity
from engine.tokenizer import ChatTokenizer


class Session:
    def __init__(self, name: str, path: Path, model: LlamaModel, tokenizer: ChatTokenizer, decoder: Decoder,
                 quantization: str | None = None):
        self.name, self.path = name, path
        self.model, self.tokenizer, self.decoder = model, tokenizer, decoder
        self.quantization = quantization
        self.device = model.device
        self.context = decoder.context
        self.threads = ThreadTuner() if self.device.type == "cpu" else None  # CPU: follows the machine's load

    @classmethod
    def load(cls, req: LoadModel, progress=lambda msg: None) -> "Session":
        return cls.of(load(req, progress))

    @classmethod
    def of(cls, loaded: LoadedModel) -> "Session":
        return cls(loaded.name, loaded.path, loaded.model, loaded.tokenizer, loaded.decoder, loaded.quantization)

    @property
    def decoding(self) -> str:
        return self.decoder.name

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text)

    def perplexity(self, text: str, window: int = 512, stride: int = 256) -> dict:
        return perplexity(self.model, self.tokenizer.encode(text), window, stride)

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(self.name, str(self.path), self.device.type, str(m.dtype).removeprefix("torch."),
                         m.n_params(), m.weight_bytes(), self.context, decoding=self.decoding,
                         quantization=self.quantization, medusa_tree=self.decoder.setup)

    def recommended_params(self) -> SamplingParams:
        """Sampling settings from the checkpoint's generation_config.json (greedy when it has none),
        checked when the model loaded (engine/config.py recommended_sampling)."""
        return SamplingParams(**self.model.cfg.sampling)

    def reset(self) -> None:
        """Forget the cached conversation: the next prompt is prefilled whole."""
        self.decoder.reset()

    def close(self) -> None:
        self.decoder.free()
        self.decoder = self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- generation --------------------------------------------------------------------------
    def generate(self, messages: list[dict], params: SamplingParams | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Token | Step | Done]:
        yield from self.generate_ids(self.tokenizer.encode_chat(messages), params, cancel)

    def generate_ids(self, prompt: list[int], params: SamplingParams | None = None,
                     cancel: threading.Event | None = None) -> Iterator[Token | Step | Done]:
        """The same for a prompt that is already token ids (a raw-text completion: no chat template)."""
        if not prompt:
            raise EngineError("the prompt is empty")
        params = params or self.recommended_params()
        sampler = Sampler(params, self.device)
        ctx = self.context
        if len(prompt) >= ctx:
            raise EngineError(f"prompt has {len(prompt)} tokens, more than the context of {ctx} tokens allows")
        memory.reset_peak(self.device)
        detok = self.tokenizer.stream()
        eos = frozenset() if params.ignore_eos else self.tokenizer.eos_ids
        out_ids: list[int] = []
        pieces: list[str] = []
        accepted: list[int] = []
        counters = Counters()
        t0 = time.perf_counter()
        t_first = t_last = None
        with torch.inference_mode():
            steps = self.decoder.generate(prompt, params, sampler, eos)
            while True:
                try:
                    ids = next(steps)
                except StopIteration as stop:
                    reason = stop.value
                    break
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                elif self.threads is not None:
                    self.threads.step(now - t_last)
                t_last = now
                accepted.append(len(ids))
                counters.add(ids)
                out_ids += ids
                parts = [detok.step(t) for t in ids]
                text = "".join(parts)
                pieces.append(text)
                by = list(getattr(ids, "drafted_by", [""] * len(ids)))
                yield Token(text, list(ids), len(ids), sum(len(p) for p, b in zip(parts, by) if b), by)
                used, total = memory.in_use(self.device)
                after_first = len(out_ids) - accepted[0]
                rate = after_first / (t_last - t_first) if after_first else 0.0
                kv, kv_dense = self.decoder.kv_bytes()
                yield Step(len(ids), rate, used, total, kv, kv_dense)
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    steps.close()
                    break
        if self.threads is not None:
            self.threads.finish()
        n = len(out_ids)
        kv, kv_dense = self.decoder.kv_bytes()
        after_first = n - (accepted[0] if accepted else 0)
        stats = GenerationStats(
            text="".join(pieces), token_ids=out_ids, n_prompt_tokens=len(prompt), n_generated=n,
            time_to_first_token_s=(t_first - t0) if t_first is not None else 0.0,
            decode_tokens_per_s=after_first / (t_last - t_first) if after_first else 0.0,
            steps=len(accepted), accepted_per_step=accepted,
            peak_memory_bytes=memory.peak(self.device), device=self.device.type, model=self.name,
            decoding=self.decoding, quantization=self.quantization,
            medusa_tree=self.decoder.setup,
            kv_cache_bytes=kv, kv_cache_bytes_dense=kv_dense, kv_compression=kv_dense / kv if kv else 1.0,
            speculation=counters.to_dict() if counters.drafts else None)
        yield Done(reason, stats)
