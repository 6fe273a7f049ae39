"""A loaded model and its KV cache: turns a conversation into a stream of events.

The same code serves the CLI (called directly) and the UI (through the worker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine import memory
from engine.decoding.medusa import verify as medusa
from engine.decoding.dmc import DMCDecoder
from engine.formats.tensor_source import TensorSource
from engine.errors import EngineError
from engine.events import Done, GenerationStats, LoadModel, ModelInfo, SamplingParams, Step, Token
from engine.model.llama import LlamaModel
from engine.decoding.medusa.verify import MedusaHeads, TypicalAcceptance, accept_greedy
from engine.decoding.medusa.heads import load_heads, shipped_heads
from engine.decoding.medusa.plan import Plan, plan
from engine.formats.dmc_delta import load_dmc_model, tokenizer_dir
from engine.hub.resolve import resolve
from engine.formats.fp8 import detect
from engine.decoding.sampling import Sampler
from engine.tokenizer import ChatTokenizer

DEFAULT_CONTEXT = 8192
PREFILL_CHUNK = 512


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise EngineError(f"device {name!r} is not supported (use cpu or cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(name)


class Session:
    def __init__(self, name: str, path: Path, model: LlamaModel, tokenizer: ChatTokenizer, context: int,
                 quantization: str | None = None, heads: MedusaHeads | None = None, plan: Plan | None = None,
                 dmc: dict | None = None):
        self.name = name
        self.heads, self.plan = heads, plan
        self._tree_graph = None  # the verify pass as a CUDA graph, captured at the first Medusa reply on a GPU
        self.quantization = quantization
        self.path = path
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        # DMC (``dmc``: DMCDecoder's init_val and window): a DMC cache takes the dense one's place
        self.dmc = DMCDecoder(model, 1, context, **dmc) if dmc is not None else None
        self.cache = model.new_cache(context) if dmc is None else None
        self.context = context
        self.cached_ids: list[int] = []  # tokens whose keys/values are in the cache, in order

    @property
    def tree(self):
        """The Medusa tree verified per step (None: one token per step)."""
        return self.plan.tree if self.plan is not None else None

    @property
    def decoding(self) -> str:
        return "medusa" if self.heads is not None else "dmc" if self.dmc is not None else "plain"

    def kv_bytes(self) -> tuple[int, int]:
        """Bytes of K/V the cache holds now, and what a plain (dense) cache holds for the same tokens."""
        if self.dmc is not None:
            c = self.dmc.cache
            return c.nbytes_used(), c.nbytes_dense()
        used = self.cache.nbytes_used()
        return used, used

    @classmethod
    def load(cls, req: LoadModel, progress=lambda msg: None) -> "Session":
        device = pick_device(req.device)
        name, path = resolve(req.model, progress)
        progress(f"loading {name} on {device.type}")
        if req.decoding not in ("plain", "medusa", "dmc"):
            raise EngineError(f"decoding {req.decoding!r} is not supported (supported: plain, medusa, dmc)")
        dmc = None
        if req.decoding == "dmc":
            if req.quantize:
                raise EngineError(f"--quantize {req.quantize} cannot be combined with DMC decoding")
            model, dmc, source = load_dmc_model(name, path, device)
            progress(f"DMC decoding (weights: {source})")
            path = tokenizer_dir(path, req.tokenizer)
        else:
            model = LlamaModel.from_dir(path, device, quantize=req.quantize, progress=progress)
        tokenizer = ChatTokenizer(path, model.cfg)
        context = req.context or min(model.cfg.max_position_embeddings, DEFAULT_CONTEXT)
        if context < 16:
            raise EngineError(f"context {context} is too small")
        heads = tree_plan = None
        if req.decoding == "medusa":
            cfg = model.cfg
            heads = load_heads(path, cfg.medusa, TensorSource(path), cfg.hidden_size, cfg.vocab_size, device,
                               model.dtype, detect(path, cfg.quantization_config))
            profile = None
            if heads is None:
                heads, profile = shipped_heads(name, cfg, device, model.dtype)
            if heads is None:
                raise EngineError(f"{name}: the checkpoint has no Medusa heads (config.json 'medusa' entry or "
                                  "medusa_lm_head.safetensors) and chatapp ships none for it")
            progress("choosing the Medusa tree for this device")
            tree_plan = plan(model, heads, name, req.medusa_choices, profile)
        return cls(name, path, model, tokenizer, context, req.quantize, heads, tree_plan, dmc)

    def info(self) -> ModelInfo:
        m = self.model
        n_params = m.embed.numel() + sum(
            lin.in_features * lin.out_features for layer in m.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                                                  layer.down))
        if not m.cfg.tie_word_embeddings:
            n_params += m.lm_head.in_features * m.lm_head.out_features
        return ModelInfo(self.name, str(self.path), self.device.type, str(m.dtype).removeprefix("torch."),
                         n_params, m.weight_bytes(), self.context, decoding=self.decoding,
                         quantization=self.quantization, medusa_tree=self.plan.choices if self.plan else None)

    def recommended_params(self) -> SamplingParams:
        """Sampling settings from the checkpoint's generation_config.json (greedy when it has none)."""
        gen = self.model.cfg.generation
        if not gen.get("do_sample"):
            return SamplingParams()
        try:
            return SamplingParams(temperature=float(gen.get("temperature", 1.0)), top_p=float(gen.get("top_p", 1.0)),
                                  top_k=int(gen.get("top_k") or 0))
        except (TypeError, ValueError) as e:
            raise EngineError(f"{self.path / 'generation_config.json'}: bad sampling setting ({e})") from None

    def close(self) -> None:
        self.cache = None
        if self.dmc is not None:
            self.dmc.free()
            self.dmc = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- generation --------------------------------------------------------------------------
    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the cache to hold ``ids`` and return the logits and the final-normed hidden
        state after the last one. The longest prefix already in the cache (the earlier turns of
        a chat) is reused."""
        reuse = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            reuse += 1
        pos, logits, hidden = reuse, None, None
        self.cached_ids = self.cached_ids[:reuse]
        while pos < len(ids):
            chunk = ids[pos:pos + PREFILL_CHUNK]
            logits, hidden = self.model.forward(torch.tensor([chunk], device=self.device), self.cache, pos,
                                                return_hidden=True)
            pos += len(chunk)
        self.cached_ids = list(ids)
        return logits[0, -1], hidden[0, -1]

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
        t0 = time.perf_counter()
        t_first = t_last = None
        with torch.inference_mode():
            steps = (self._medusa_steps if self.tree is not None else self._dmc_steps if self.dmc is not None
                     else self._plain_steps)(prompt, params, sampler, eos)
            while True:
                try:
                    ids = next(steps)
                except StopIteration as stop:
                    reason = stop.value
                    break
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                accepted.append(len(ids))
                out_ids += ids
                text = "".join(detok.step(t) for t in ids)
                pieces.append(text)
                yield Token(text, ids, len(ids))
                used, total = memory.in_use(self.device)
                after_first = len(out_ids) - accepted[0]
                rate = after_first / (t_last - t_first) if after_first else 0.0
                kv, kv_dense = self.kv_bytes()
                yield Step(len(ids), rate, used, total, kv, kv_dense)
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    steps.close()
                    break
        n = len(out_ids)
        kv, kv_dense = self.kv_bytes()
        after_first = n - (accepted[0] if accepted else 0)
        stats = GenerationStats(
            text="".join(pieces), token_ids=out_ids, n_prompt_tokens=len(prompt), n_generated=n,
            time_to_first_token_s=(t_first - t0) if t_first is not None else 0.0,
            decode_tokens_per_s=after_first / (t_last - t_first) if after_first else 0.0,
            steps=len(accepted), accepted_per_step=accepted,
            peak_memory_bytes=memory.peak(self.device), device=self.device.type, model=self.name,
            decoding=self.decoding, quantization=self.quantization,
            medusa_tree=self.plan.choices if self.plan else None,
            kv_cache_bytes=kv, kv_cache_bytes_dense=kv_dense, kv_compression=kv_dense / kv if kv else 1.0)
        yield Done(reason, stats)

    def _plain_steps(self, prompt: list[int], params: SamplingParams, sampler: Sampler, eos):
        """One token per step. Returns why it stopped: "eos" or "length"."""
        logits, _ = self._prefill(prompt)
        return (yield from self._one_token_steps(
            logits, params, sampler, eos, lambda: self.cache.length >= self.cache.max_len,
            lambda tok: self.model.forward(torch.tensor([[tok]], device=self.device), self.cache,
                                           self.cache.length)[0, -1]))

    def _one_token_steps(self, logits, params: SamplingParams, sampler: Sampler, eos, full, advance):
        """The loop of the one-token-per-step decodings: sample, stop at EOS, the token limit or
        when ``full()``, else ``advance(token)`` to the next logits."""
        produced = 0
        while True:
            tok = sampler(logits)
            if tok in eos:
                return "eos"
            yield [tok]
            produced += 1
            if produced >= params.max_new_tokens or full():
                return "length"
            logits = advance(tok)
            self.cached_ids.append(tok)

    def _dmc_steps(self, prompt: list[int], params: SamplingParams, sampler: Sampler, eos):
        """One token per step through the DMC cache. Merges cannot be undone, so the cache is
        reused only when everything it holds is a prefix of the new prompt (the next turn of the
        same chat); otherwise it is emptied and the whole prompt prefilled."""
        dmc, held = self.dmc, len(self.cached_ids)
        if not (0 < held < len(prompt) and self.cached_ids == prompt[:held]):
            dmc.reset()
            self.cached_ids, held = [], 0
        logits = dmc.prefill(torch.tensor([prompt[held:]], device=self.device))[0]
        self.cached_ids = list(prompt)
        return (yield from self._one_token_steps(
            logits, params, sampler, eos, lambda: dmc.length >= self.context,
            lambda tok: dmc.step(torch.tensor([tok], device=self.device))[0]))

    def _medusa_steps(self, prompt: list[int], params: SamplingParams, sampler: Sampler, eos):
        """Medusa: the root and the accepted proposals per step (greedy acceptance when greedy,
        typical acceptance when sampling)."""
        greedy = params.temperature == 0
        accept = accept_greedy if greedy else TypicalAcceptance(params.temperature)
        logits, hidden = self._prefill(prompt)
        produced = 0
        if self._tree_graph is None:
            self._tree_graph = medusa.TreeGraph.for_device(self.model, self.tree, self.cache)
        for ids in medusa.generate(self.model, self.heads, self.tree, self.cache, logits, hidden,
                                   params.max_new_tokens, eos, None if greedy else sampler, accept,
                                   self._tree_graph):
            produced += len(ids)
            self.cached_ids += ids  # every accepted token's keys/values are in the cache, in order
            yield ids
        return "length" if produced >= params.max_new_tokens or \
            self.cache.length + self.tree.num_nodes > self.cache.max_len else "eos"
