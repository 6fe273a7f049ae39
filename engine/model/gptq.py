"""FP8 quantization on load (``--quantize fp8``) with error-compensating rounding.

Rounding each weight to the nearest e4m3 value (per-output-channel scales) costs a small model
several percent of perplexity. GPTQ (Frantar et al., 2022) rounds a layer's weight columns one
at a time and spreads each column's rounding error over the columns not rounded yet, weighted by
the inverse of H = X^T X of the layer's real inputs X, so that the layer's outputs change least.
The format stays that of compressed-tensors' FP8-dynamic checkpoints (per-channel weight scales
from each row's max, dynamic per-token activations); only the e4m3 value each weight rounds to
changes, so the kernels and the memory are those of round-to-nearest.

Calibration data: the model's own text. A checkpoint ships no data and a fixed text would favour
its own domain, so ``SAMPLES`` sequences of ``LENGTH`` tokens are sampled (temperature 1, seeded)
from the BOS token by the round-to-nearest FP8 model.

The model loads with its block linears rounded to nearest (``Fp8OnLoad`` as the quantization
method of engine/model/weights.py); calibration is then a pass over the loaded model. Layers are
calibrated in order, each on the outputs of the layers already quantized before it, with only
that layer's high-precision weights in memory (the model stays FP8-sized). The result
is cached as ``<cache>/fp8/<key>.safetensors``; the key names the checkpoint's files (the blob
names of the Hugging Face cache, which are content hashes, or else path, size and modification
time), its config and the calibration settings, so a later load reads the rounded weights."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kernels.fp8_quant import FP8, FP8_MAX

from engine.formats.tensor_source import TensorSource
from engine.config import ModelConfig
from engine.errors import EngineError
from engine.model.linear import Fp8Linear, Int8Linear, Linear, default_splits
from engine.model.llama import LINEARS
from engine.model.weights import block_linears, fused_weight
from engine.paths import cache_dir
from engine.units import duration

METHOD = "gptq-e4m3-channel v1"
# 48 x 128 sampled tokens: the embedded model's held-out perplexity +1.6 % (bf16 lm_head), where
# 32 x 128 gave +2.4 %, 16 x 128 +3.1 % and 64 x 256 +1.9 % in 3x the time (bench/results/
# fp8_quality.jsonl; the GPTQ paper calibrates on 128 x 2048)
SAMPLES, LENGTH, SEED = 48, 128, 0
DAMP = 0.01  # of the mean of diag(H), added to its diagonal
BLOCK = 128  # columns rounded per block (the lazy batch update of the GPTQ paper)
# what GPTQ rounds to, by format: the stored dtype and the linear kind (the lm_head formats that are
# calibrated along with the block linears)
ROUNDED = {"fp8": (FP8, Fp8Linear), "int8": (torch.int8, Int8Linear)}


def gptq_round(w: torch.Tensor, h: torch.Tensor, fmt: str = "fp8", damp: float | None = None, block: int = BLOCK
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``w`` [N, K] and ``h`` = X^T X [K, K] of its inputs -> (q [N, K], scale [N, 1] fp32),
    real weight = q * scale, q e4m3 (``fmt`` "fp8") or int8 ("int8": -127..127, per-channel
    scale max |row| / 127). Columns go in order of decreasing diag(H) ("act order")."""
    assert fmt in ROUNDED
    w = w.float().clone()
    h = h.float().clone()
    n, k = w.shape
    top = FP8_MAX if fmt == "fp8" else 127.0
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, DAMP if damp is None else damp)  # (DAMP read when called)
    q = torch.empty_like(w)
    for a in range(0, k, block):
        b = min(a + block, k)
        wb, err = w[:, a:b].clone(), torch.empty(n, b - a, device=w.device)
        hb = hinv[a:b, a:b]
        for i in range(b - a):
            col = wb[:, i:i + 1]
            qv = (col / scale).clamp(-top, top)
            qv = qv.to(FP8).float() if fmt == "fp8" else torch.round(qv)
            q[:, a + i:a + i + 1] = qv
            qc = qv * scale
            e = (col - qc) / hb[i, i]
            wb[:, i:] -= e @ hb[i:i + 1, i:]
            err[:, i:i + 1] = e
        w[:, b:] -= err @ hinv[a:b, b:]
    # q holds e4m3 values or integers: the cast is exact
    return q[:, torch.argsort(perm)].to(ROUNDED[fmt][0]), scale


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1; the damping grows until H is positive definite."""
    eye = torch.eye(h.shape[0], device=h.device)
    mean = torch.diagonal(h).mean()
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if not info:
            inv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if not info:
                return inv
        damp *= 10
    raise EngineError("FP8 calibration: the inputs' Hessian is not positive definite even with damping")


class _Recorder:
    """A high-precision linear layer that adds X^T X of its inputs to ``h``."""

    def __init__(self, lin):
        self.lin, self.splits, self.bias = lin, lin.splits, lin.bias
        self.h = torch.zeros(lin.in_features, lin.in_features, device=lin.device)

    def _add(self, x: torch.Tensor):
        x2 = x.reshape(-1, self.h.shape[0]).float()
        self.h.addmm_(x2.t(), x2)

    def __call__(self, x, residual=None):
        self._add(x)
        return self.lin(x, residual)

    def blocks(self, x):
        self._add(x)
        return self.lin.blocks(x)


def sample_ids(model, n: int, length: int, seed: int = SEED, progress=lambda msg: None) -> torch.Tensor:
    """``n`` sequences [n, length] sampled from the model, starting with its BOS token. On a CPU,
    which has no FP8 arithmetic, the FP8 layers run dequantized while sampling (the same weights,
    without converting them at every step)."""
    if model.device.type != "cpu":
        return _sample(model, n, length, seed, progress)
    def plain(lin):
        if not isinstance(lin, Fp8Linear):
            return lin
        return Linear((lin.weight.float() * lin.weight_scale).to(model.dtype).t(), lin.bias)

    fp8_layers = model.layers
    model.layers = [replace(ly, **{n: plain(getattr(ly, n)) for n in LINEARS}) for ly in fp8_layers]
    try:
        return _sample(model, n, length, seed, progress)
    finally:
        model.layers = fp8_layers


def progress_bar(label: str, done: int, total: int, t0: float, width: int = 20) -> str:
    """``label [#####...............] 25%, about 01:10 left`` (the time left at the rate so far)."""
    frac = done / max(total, 1)
    filled = int(frac * width)
    left = (time.time() - t0) * (1 - frac) / frac if frac > 0 else None
    eta = f", about {duration(left)} left" if left is not None and done < total else ""
    return f"{label} [{'#' * filled}{'.' * (width - filled)}] {frac:.0%}{eta}"


def _sample(model, n: int, length: int, seed: int, progress=lambda msg: None) -> torch.Tensor:
    cfg = model.cfg
    length = min(length, cfg.max_position_embeddings)
    start = cfg.bos_token_id if cfg.bos_token_id is not None else min(cfg.eos_token_ids, default=0)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    ids = torch.full((n, length), start, dtype=torch.long, device=model.device)
    cache = model.new_cache(length, batch=n)
    with torch.inference_mode():
        t0, step = time.time(), max(1, length // 10)
        logits = model.forward(ids[:, :1], cache, 0)
        for pos in range(1, length):
            probs = torch.softmax(logits[:, -1].float(), dim=-1)
            ids[:, pos] = torch.multinomial(probs, 1, generator=gen)[:, 0]
            logits = model.forward(ids[:, pos:pos + 1], cache, pos)
            if pos % step == 0:
                progress(progress_bar(f"FP8 calibration 1/2, sampling {n} texts", pos, length, t0))
    return ids


class RoundToNearest:
    """FP8 block linears rounded to nearest as they are read (per-channel weight scales, dynamic
    per-token activations); embeddings and norms stay as they are. A quantization method of
    ``weights.from_source``: ``linear`` makes each block linear from its high-precision weight,
    ``head`` the output projection, ``after_loading`` finishes the loaded model.

    The lm_head (``head_format``; on a CPU decoding is bound by the bytes of weights read, and a
    small model's lm_head is a large share of them: the embedded model's is 28 M of its 135 M
    parameters): bf16, half the bytes of float32 at 0.1 % of perplexity or less; "int8"
    (engine/model/linear's Int8Linear) halves it again (a decode step of the embedded model 1 ms
    faster on our CPUs): rounded to nearest it costs up to 0.15 % more than bf16, calibrated with
    the block linears (Fp8OnLoad) within 0.1 % of bf16 (48 x 128: +1.68 % against +1.71 %, +2.26 %
    against +2.15 % in two calibration runs); "fp8", even
    calibrated, costs 1.5 % more than bf16 (bench/fp8_quality.py). A tied embedding table stays
    as it is for the lookup."""

    def __init__(self, head_format: str = "bf16"):
        assert head_format in ("int8", "bf16", "fp8")
        self.head_format = head_format

    def linear(self, key: str, weight, bias: torch.Tensor | None, device) -> Fp8Linear:
        """``key``: the linear's name (block_linears); ``weight()`` reads its weight [out, in] on
        ``device`` in the model's dtype."""
        return Fp8Linear.quantize(weight(), bias)

    def head(self, weight: torch.Tensor) -> Linear | Fp8Linear | Int8Linear:
        """The lm_head from its weight [vocab, hidden]."""
        if self.head_format == "fp8":
            return Fp8Linear.quantize(weight)
        if self.head_format == "int8":
            return Int8Linear.quantize(weight)
        return Linear(weight.to(torch.bfloat16).t(), None, default_splits(weight.device))

    def after_loading(self, model, progress=lambda msg: None) -> None:
        pass


def default_head(device) -> str:
    """The lm_head format of ``--quantize fp8``: int8 (calibrated) where our CPU kernel serves
    int8, else bf16."""
    return "int8" if Int8Linear.in_panels(device) else "bf16"


class Fp8OnLoad(RoundToNearest):
    """``--quantize fp8``: GPTQ-rounded FP8 block linears. With this checkpoint's rounded weights in
    the cache they are read from there (and the high-precision ones are never read); otherwise the
    model loads rounded to nearest and ``after_loading`` calibrates it (a pass over the loaded
    model, one layer's high-precision weights in memory at a time) and caches the result."""

    def __init__(self, cfg: ModelConfig, src: TensorSource, layer_pass=None, pass_name: str = "dense",
                 samples: int | None = None, length: int | None = None, head_format: str = "bf16"):
        """``layer_pass(model, batch, length)``: the pass that carries calibration text through
        one layer at a time, as the model will decode (``fn(li, layer, x) -> x``; default: dense
        attention, LlamaModel.layer_pass); ``pass_name`` names it in the cache key. ``samples``
        sequences of ``length`` tokens calibrate (bench/fp8_quality.py measures the choice)."""
        super().__init__(head_format)
        self.cfg, self.src = cfg, src
        self.layer_pass, self.pass_name = layer_pass, pass_name
        self.samples, self.length = samples or SAMPLES, length or LENGTH  # (read when called: tests set them)
        self.path = cache_dir() / "fp8" / f"{cache_key(cfg, src, pass_name, self.samples, self.length, head_format)}.safetensors"
        self.cached = _read_cached(self.path, cfg, self._calibrated_head()) if self.path.is_file() else None

    def _calibrated_head(self) -> str | None:
        """The lm_head's format when it is calibrated with the block linears (FP8, int8), else None."""
        return self.head_format if self.head_format in ROUNDED else None

    def linear(self, key, weight, bias, device):
        if self.cached is None:
            return super().linear(key, weight, bias, device)
        return Fp8Linear(self.cached[key + ".weight"].to(device), self.cached[key + ".weight_scale"].to(device),
                         None, bias)

    def head(self, weight):
        if self._calibrated_head() is None:
            return super().head(weight)
        if self.cached is None:  # to be calibrated: the samples are drawn through the bf16 lm_head
            return RoundToNearest("bf16").head(weight)
        kind = ROUNDED[self.head_format][1]
        return kind(self.cached["lm_head.weight"].to(weight.device),
                    self.cached["lm_head.weight_scale"].to(weight.device))

    def after_loading(self, model, progress=lambda msg: None) -> None:
        if self.cached is not None:
            return
        progress("FP8 calibration: rounding the weights with error compensation (once for this checkpoint)")
        t0 = time.time()
        tensors = calibrate(model, self.src, progress, self.layer_pass, self.samples, self.length,
                            self._calibrated_head())
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, str(tmp),
                  metadata={"method": METHOD, "pass": self.pass_name, "samples": str(self.samples), "length": str(self.length),
                            "seed": str(SEED),
                            "source": str(self.src.model_dir), "seconds": f"{time.time() - t0:.1f}"})
        tmp.replace(path)
        progress(f"FP8 calibration done in {time.time() - t0:.0f} s; cached in {path}")


def calibrate(model, src: TensorSource, progress=lambda msg: None, layer_pass=None, samples: int | None = None,
              length: int | None = None, head: str | None = None) -> dict[str, torch.Tensor]:
    """Round ``model``'s block linears (FP8, rounded to nearest) again with GPTQ, from the
    high-precision weights in ``src``; replaces them in the model and returns them as
    ``{<linear>.weight, <linear>.weight_scale}``; ``head`` ("fp8", "int8"): the lm_head too, in that
    format. ``layer_pass``: see Fp8OnLoad."""
    cfg, dev = model.cfg, model.device
    ids = sample_ids(model, samples or SAMPLES, length or LENGTH, SEED, progress)
    out: dict[str, torch.Tensor] = {}
    if layer_pass is None:
        cache = model.new_cache(ids.shape[1], batch=ids.shape[0])
        run = lambda li, layer, x: model.layer_pass(li, layer, x, cache)  # noqa: E731
    else:
        run = layer_pass(model, ids.shape[0], ids.shape[1])
    t0 = time.time()
    with torch.inference_mode():
        x = torch.nn.functional.embedding(ids, model.embed)
        for li, layer in enumerate(model.layers):
            linears = block_linears(cfg, li)
            weights = {key: fused_weight(src, parts).to(dev, torch.float32) for key, (parts, _) in linears.items()}
            field = {key: key.rsplit(".", 1)[1] for key in linears}  # model.layers.N.qkv -> qkv
            bias = {key: getattr(layer, field[key]).bias for key in linears}
            rec = {key: _Recorder(Linear(w.to(model.dtype).t(), bias[key])) for key, w in weights.items()}
            run(li, replace(layer, **{field[key]: r for key, r in rec.items()}), x)
            new = {}
            for key, w in weights.items():
                q, scale = gptq_round(w, rec[key].h)
                out[key + ".weight"], out[key + ".weight_scale"] = q, scale
                new[field[key]] = Fp8Linear(q, scale, None, bias[key])
            model.layers[li] = layer = replace(layer, **new)
            x = run(li, layer, x)
            progress(progress_bar(f"FP8 calibration 2/2, layer {li + 1}/{cfg.num_layers}", li + 1, cfg.num_layers, t0))
        if head is None:
            return out
        # the lm_head, on the final-normed outputs of the quantized layers
        hn = model.final_norm(x).reshape(-1, cfg.hidden_size).float()
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in src
        w = model.embed if tied else src.get_shaped("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        q, scale = gptq_round(w.to(dev, torch.float32), hn.t() @ hn, head)
        out["lm_head.weight"], out["lm_head.weight_scale"] = q, scale
        model.lm_head = ROUNDED[head][1](q, scale)
    return out


def cache_key(cfg: ModelConfig, src: TensorSource, pass_name: str = "dense", samples: int | None = None,
              length: int | None = None, head_format: str | None = None) -> str:
    """Names the checkpoint's weights and config and the calibration settings."""
    h = hashlib.sha256(f"{METHOD} {samples or SAMPLES} {length or LENGTH} {SEED} {DAMP} {BLOCK}\n".encode())
    if head_format in ROUNDED:
        h.update(f"{head_format} lm_head\n".encode())
    if pass_name != "dense":  # (the dense pass's keys are those of before there was a choice)
        h.update(f"pass {pass_name}\n".encode())
    config = src.model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in src.files():
        if f.is_symlink() and "blobs" in Path(os.readlink(f)).parts:  # the HF cache: a content hash
            h.update(f"{f.name} {Path(os.readlink(f)).name}\n".encode())
        else:
            st = f.stat()
            h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _read_cached(path: Path, cfg: ModelConfig, head: str | None = None) -> dict[str, torch.Tensor] | None:
    """The cached rounded weights, or None when the file is missing, unreadable or incomplete."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None
    for li in range(cfg.num_layers):
        for key, (parts, _) in block_linears(cfg, li).items():
            w, s = tensors.get(key + ".weight"), tensors.get(key + ".weight_scale")
            shape = (sum(p[1][0] for p in parts), parts[0][1][1])
            if w is None or s is None or w.dtype != FP8 or tuple(w.shape) != shape or tuple(s.shape) != (shape[0], 1):
                return None
    if head is None:
        return tensors
    w, s = tensors.get("lm_head.weight"), tensors.get("lm_head.weight_scale")
    if w is None or s is None or w.dtype != ROUNDED[head][0] or tuple(w.shape) != (cfg.vocab_size, cfg.hidden_size) \
            or tuple(s.shape) != (cfg.vocab_size, 1):
        return None
    return tensors
