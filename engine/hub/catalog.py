"""The models chatapp knows (assets/catalog.json) and the ones on this machine, with what each
needs: its download size and an estimate of the memory it takes on this machine's device.

No torch here: the UI process lists models, and the UI process must not import torch.

Memory estimate (estimate_memory), for one sequence of ``context`` tokens:

- weights: the catalog's ``weights_gb`` when given (FP8 checkpoints keep embeddings, lm_head and
  norms in bf16, so their weights are larger than params x 1 byte), else params x
  ``bytes_per_weight``. On the CPU the engine computes in fp32 (engine.model.llama), so 16-bit weights
  count 4 bytes each there; FP8 weights stay as stored.
- KV cache: K and V, 2 bytes an element (bf16; 4 on the CPU, fp32), for every layer:
  ``2 x layers x kv_heads x head_dim x bytes x context``, divided by ``kv_compression`` for
  DMC models (8.0 for the 8x DMC checkpoint).
- overhead (CUDA context, activations, allocator slack, sampling buffers): 1 GiB + 5% of
  weights + KV.
- verdict against the device's free memory: "fits" below 90%, "tight" from 90% to 100%,
  "won't fit" above; models that need several GPUs (``num_gpus`` > 1) always "won't fit", with the
  way to run them on a server and connect with ``chatapp --remote``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from engine.errors import EngineError
from engine.events import DEFAULT_CONTEXT
from engine.hub import embedded, hf_cache
from engine.paths import ASSETS
from engine.units import gb, gib

CATALOG = ASSETS / "catalog.json"

GiB = 1024 ** 3
OVERHEAD_FIXED = 1 * GiB
OVERHEAD_FRACTION = 0.05
TIGHT_FRACTION = 0.90
VERDICTS = ("fits", "tight", "won't fit")


# ---- the catalog -----------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """A model chatapp knows or found on this machine. ``local_path``: where it is, or None when it
    is not downloaded (the embedded model: its converted folder, or "(built on first use)")."""

    id: str
    format: str
    params_b: float | None
    description: str
    local_path: str | None = None
    source: str = "hub"  # "embedded" (ships with chatapp), "hub" (in the catalog), "cache" (found in the HF cache)
    hf_repo: str | None = None  # the Hugging Face repository (the id, unless the entry says otherwise)
    approx_download_gb: float | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_context: int | None = None
    bytes_per_weight: float | None = None
    weights_gb: float | None = None
    kv_compression: float = 1.0
    num_gpus: int = 1
    gated: bool = False
    base: str | None = None
    serve: str | None = None  # how to serve a multi-GPU model (a vLLM command line)
    partial: bool = False  # in the cache, but a download of it did not finish (``chatapp pull`` resumes it)

    @property
    def downloaded(self) -> bool:
        return bool(self.local_path) and not self.partial and Path(self.local_path).is_dir()

    @property
    def multi_gpu(self) -> bool:
        return self.num_gpus > 1

    @property
    def repo_id(self) -> str:
        return self.hf_repo or self.id

    def to_dict(self) -> dict:
        return {**asdict(self), "downloaded": self.downloaded, "multi_gpu": self.multi_gpu}


def catalog() -> list[dict]:
    """The catalog's entries as they are in assets/catalog.json."""
    return json.loads(CATALOG.read_text(encoding="utf-8"))["models"]


def _entry(raw: dict) -> ModelEntry:
    num_gpus = int(raw.get("num_gpus") or (8 if raw.get("multi_gpu") else 1))
    return ModelEntry(
        id=raw["id"], format=raw["format"], params_b=raw.get("params_b"), description=raw.get("description", ""),
        source=raw.get("source", "hub"), hf_repo=raw.get("hf_repo"), approx_download_gb=raw.get("approx_download_gb"),
        num_layers=raw.get("num_layers"), num_kv_heads=raw.get("num_kv_heads"), head_dim=raw.get("head_dim"),
        max_context=raw.get("max_context"), bytes_per_weight=raw.get("bytes_per_weight"),
        weights_gb=raw.get("weights_gb"), kv_compression=float(raw.get("kv_compression") or 1.0),
        num_gpus=num_gpus, gated=bool(raw.get("gated")), base=raw.get("base"), serve=raw.get("serve"))


def entries() -> list[ModelEntry]:
    """The catalog as ModelEntry objects (local_path not filled in)."""
    return [_entry(m) for m in catalog()]


def find(model_id: str) -> ModelEntry | None:
    """The catalog entry for an id (case-insensitive; the embedded model also by its repository)."""
    key = model_id.lower()
    for e in entries():
        if key in (e.id.lower(), (e.hf_repo or "").lower()):
            return e
    return None


def entry_from_checkpoint(model_id: str, path: str | Path) -> ModelEntry:
    """An entry for a checkpoint folder that is not in the catalog, from its config.json (and the
    size of its weight files); fields it cannot tell stay None."""
    path = Path(path)
    e = ModelEntry(model_id, "?", None, "in the Hugging Face cache", str(path), source="cache")
    weight_files = [p for p in path.glob("*.safetensors")] + [p for p in path.rglob("model_optim_rng.pt")]
    try:
        size = sum(p.stat().st_size for p in weight_files)
    except OSError:
        size = 0
    if size:
        e.weights_gb = e.approx_download_gb = size / 1e9
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return e
    if not isinstance(cfg, dict):
        return e
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    heads = text.get("num_attention_heads")
    e.num_layers = text.get("num_hidden_layers")
    e.num_kv_heads = text.get("num_key_value_heads") or heads
    e.head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
    e.max_context = text.get("max_position_embeddings")
    quant = cfg.get("quantization_config") or {}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
    if quant or (path / "hf_quant_config.json").exists():
        e.format, e.bytes_per_weight = "fp8", 1
    else:
        e.format = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
        e.bytes_per_weight = 4 if dtype == "float32" else 2
    if size and e.bytes_per_weight:
        e.params_b = size / e.bytes_per_weight / 1e9
    return e


def list_models() -> list[ModelEntry]:
    """The catalog's models, then any other models in the Hugging Face cache; each with
    ``local_path`` set when it is on this machine; ``partial`` when the cache lacks some of the
    files the engine loads (by the tree listing huggingface_hub keeps next to a snapshot)."""
    local = hf_cache.snapshots()
    out = []
    for e in entries():
        e.local_path = local.pop(e.id, None)
        if e.local_path is not None:
            e.partial = hf_cache.complete_snapshot(e.id, e.format) is None
        if e.source == "embedded":
            e.local_path = (str(embedded.converted_dir()) if embedded.converted_dir().exists()
                            else "(built on first use)")
        out.append(e)
    for repo_id, path in sorted(local.items()):
        e = entry_from_checkpoint(repo_id, path)
        e.partial = hf_cache.complete_snapshot(repo_id) is None
        out.append(e)
    return out


# ---- device memory ---------------------------------------------------------------------------
class DeviceMemory(NamedTuple):
    name: str  # the GPU's name, or "CPU"
    free_bytes: int | None
    total_bytes: int | None

    @property
    def is_cpu(self) -> bool:
        return self.name == "CPU"


def _nvidia_smi() -> str | None:
    """nvidia-smi's CSV line(s) for the GPUs, or None when there is no usable NVIDIA GPU."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,memory.total",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 and r.stdout.strip() else None


def _meminfo() -> str | None:
    try:
        return Path("/proc/meminfo").read_text()
    except OSError:
        return None


def parse_nvidia_smi(text: str) -> DeviceMemory | None:
    """The first GPU of nvidia-smi's ``name, free MiB, total MiB`` lines."""
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3:
            try:
                return DeviceMemory(parts[0], int(float(parts[1])) * 1024 ** 2, int(float(parts[2])) * 1024 ** 2)
            except ValueError:
                continue
    return None


def parse_meminfo(text: str | None) -> DeviceMemory:
    values = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemAvailable", "MemTotal", "MemFree") and rest.split():
            values[key] = int(rest.split()[0]) * 1024  # kB
    return DeviceMemory("CPU", values.get("MemAvailable", values.get("MemFree")), values.get("MemTotal"))


def device_memory() -> DeviceMemory:
    """(name, free bytes, total bytes) of the device a model would run on: the first NVIDIA GPU
    (from nvidia-smi; no torch), else this machine's RAM (MemAvailable, MemTotal) named "CPU".
    Tests replace ``_nvidia_smi`` / ``_meminfo``, or this function, with monkeypatch."""
    smi = _nvidia_smi()
    gpu = parse_nvidia_smi(smi) if smi else None
    return gpu if gpu is not None else ram()


def ram() -> DeviceMemory:
    """This machine's RAM: MemAvailable (free) and MemTotal from /proc/meminfo."""
    return parse_meminfo(_meminfo())


# ---- memory estimate -------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    verdict: str  # one of VERDICTS
    reason: str  # one line, for a user
    context: int = 0
    max_context_that_fits: int | None = None  # the longest context that fits the free memory (single-GPU models)

    def to_dict(self) -> dict:
        return asdict(self)


def _weights_bytes(entry: ModelEntry, on_cpu: bool, quantize: str | None = None) -> int:
    if quantize == "fp8" and entry.params_b:  # FP8 linears: a byte a weight (embeddings and norms are few)
        return int(entry.params_b * 1e9)
    if quantize == "bf16" and entry.params_b:  # bf16 linears: two bytes a weight
        return int(entry.params_b * 2e9)
    bpw = entry.bytes_per_weight or 2
    if on_cpu and bpw >= 2:  # the engine computes in fp32 on the CPU
        return int((entry.params_b or 0) * 1e9 * 4) if entry.params_b else int((entry.weights_gb or 0) * 1e9 * 4 / bpw)
    if entry.weights_gb:
        return int(entry.weights_gb * 1e9)
    return int((entry.params_b or 0) * 1e9 * bpw)


def kv_bytes_per_token(entry: ModelEntry, on_cpu: bool = False, compressed: bool = True) -> float:
    """K and V bytes per token of context, all layers, after DMC compression (``compressed``)."""
    if not (entry.num_layers and entry.num_kv_heads and entry.head_dim):
        return 0.0
    elem = 4 if on_cpu else 2
    ratio = (entry.kv_compression or 1.0) if compressed else 1.0
    return 2 * entry.num_layers * entry.num_kv_heads * entry.head_dim * elem / ratio


def _overhead(weights: float, kv: float) -> int:
    return int(OVERHEAD_FIXED + OVERHEAD_FRACTION * (weights + kv))


def _remote_hint(entry: ModelEntry) -> str:
    serve = entry.serve or f"vllm serve {entry.repo_id} --tensor-parallel-size {entry.num_gpus}"
    return f"run it on a server: {serve}, then chatapp --remote http://HOST:8000/v1 --model {entry.repo_id}"


def estimate_memory(entry: ModelEntry, context: int | None = None, free_bytes: int | None = None,
                    total_bytes: int | None = None, *, on_cpu: bool = False, decoding: str | None = None,
                    quantize: str | None = None) -> MemoryEstimate:
    """What ``entry`` needs with a KV cache of ``context`` tokens (default: the engine's default,
    min(max_context, 8192)), and whether that fits ``free_bytes`` (``total_bytes`` when the free
    figure is unknown). ``on_cpu``: the device is the CPU (fp32 compute). ``decoding`` and
    ``quantize``: the set-up (a DMC cache divides the KV bytes by the model's compression, FP8
    weights take a byte a weight); None: the catalog's own (its compression, as stored)."""
    if context is None:
        context = min(entry.max_context or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if context < 1:
        raise EngineError(f"context {context}: must be at least 1 token")
    if entry.multi_gpu:
        on_cpu = False  # it runs on GPUs elsewhere, whatever this machine has
    weights = _weights_bytes(entry, on_cpu, quantize)
    per_token = kv_bytes_per_token(entry, on_cpu, compressed=decoding is None or "dmc" in decoding.split("+"))
    kv = int(per_token * context)
    overhead = _overhead(weights, kv)
    need = weights + kv + overhead

    def result(verdict, reason, max_ctx=None):
        return MemoryEstimate(weights, kv, overhead, need, verdict, reason, context, max_ctx)

    if entry.multi_gpu:
        return result("won't fit", f"won't fit: needs {entry.num_gpus} GPUs ({entry.params_b:g}B "
                                   f"{entry.format.split('-')[0].upper()} is {gb(weights)}); {_remote_hint(entry)}")
    if not entry.params_b and not entry.weights_gb:
        return result("tight", "size unknown: no parameter count or weight files to go by")
    avail = free_bytes if free_bytes is not None else total_bytes
    where = "free" if free_bytes is not None else "in total"
    if avail is None:
        return result("tight", f"needs {gib(need)}; the device's memory is unknown")
    max_ctx = None
    if per_token:
        room = (avail - OVERHEAD_FIXED) / (1 + OVERHEAD_FRACTION) - weights
        max_ctx = max(0, int(room // per_token))
        if entry.max_context:
            max_ctx = min(max_ctx, entry.max_context)
    if need > avail:
        if weights + _overhead(weights, 0) > avail:
            reason = f"won't fit: the weights alone need {gib(weights)}, {gib(avail)} {where}"
        else:
            reason = (f"won't fit: needs {gib(need)}, {gib(avail)} {where}; the KV cache for {context} tokens "
                      f"is {gib(kv)}")
            if max_ctx and max_ctx >= 16:
                reason += f"; a context of up to {max_ctx} tokens fits (--context {_round_down(max_ctx)})"
        return result("won't fit", reason, max_ctx)
    if need > TIGHT_FRACTION * avail:
        return result("tight", f"tight: needs {gib(need)}, {need / avail:.0%} of the {where} {gib(avail)}", max_ctx)
    return result("fits", f"needs {gib(need)}, {gib(avail)} {where}", max_ctx)


def _round_down(n: int) -> int:
    """A round context length at most ``n`` (a multiple of 1024 when n >= 1024)."""
    return n - n % 1024 if n >= 1024 else n


def estimate_for_device(entry: ModelEntry, context: int | None = None, device: DeviceMemory | None = None,
                        decoding: str | None = None, quantize: str | None = None) -> MemoryEstimate:
    """estimate_memory against this machine's device (device_memory())."""
    device = device or device_memory()
    return estimate_memory(entry, context, device.free_bytes, device.total_bytes, on_cpu=device.is_cpu,
                           decoding=decoding, quantize=quantize)


# ---- download size ---------------------------------------------------------------------------
def catalog_size(entry: ModelEntry | None) -> tuple[int | None, str]:
    """(bytes, "catalog") from the entry's approx_download_gb, or (None, "unknown")."""
    if entry is not None and entry.approx_download_gb is not None:
        return int(entry.approx_download_gb * 1e9), "catalog"
    return None, "unknown"


def download_size(entry_or_repo_id: ModelEntry | str, token: str | None = None,
                  timeout: float = 10.0) -> tuple[int | None, str]:
    """(bytes, source): the size of the files ``chatapp pull`` downloads, from the hub (source
    "hub") when it can be reached, else the catalog's approx_download_gb (source "catalog"), else
    (None, "unknown"). Never raises."""
    entry = entry_or_repo_id if isinstance(entry_or_repo_id, ModelEntry) else find(entry_or_repo_id)
    repo_id = entry.repo_id if entry else str(entry_or_repo_id)
    if entry is not None and entry.source == "embedded":
        return 0, "embedded"
    if hf_cache.hub_offline():
        return catalog_size(entry)
    try:
        from huggingface_hub import HfApi  # here: huggingface_hub's HTTP client stays out of the UI at import
        from huggingface_hub.utils import filter_repo_objects

        info = HfApi(token=token).model_info(repo_id, files_metadata=True, timeout=timeout)
        sizes = {s.rfilename: (s.lfs.size if s.lfs is not None else s.size) for s in info.siblings or []}
        wanted = filter_repo_objects(sizes.keys(), allow_patterns=hf_cache.allow_patterns(entry and entry.format))
        total = sum(sizes[name] or 0 for name in wanted)
        return (total, "hub") if total else catalog_size(entry)
    except Exception:  # offline, gated, unknown repo, hub down: the catalog's figure is the best we have
        return catalog_size(entry)


# ---- the picker's rows ---------------------------------------------------------------------
@dataclass
class ModelRow:
    """One model for a picker: the entry, its download size and its memory estimate on the device."""

    entry: ModelEntry
    download_bytes: int | None
    download_source: str  # "hub", "catalog", "cache" (size on disk), "embedded", "unknown"
    estimate: MemoryEstimate
    device: str = ""

    def to_dict(self) -> dict:
        return {**self.entry.to_dict(), "download_bytes": self.download_bytes,
                "download_source": self.download_source, "device": self.device,
                "estimate": self.estimate.to_dict()}


def model_rows(context: int | None = None, device: DeviceMemory | None = None, online: bool = False,
               token: str | None = None) -> list[ModelRow]:
    """Every model of list_models() with its download size and memory estimate on ``device``
    (default: this machine's). ``online``: ask the hub for exact download sizes (slower; the
    catalog's figures otherwise)."""
    device = device or device_memory()
    rows = []
    for e in list_models():
        if e.source == "embedded":
            size, src = 0, "embedded"
        elif e.source == "cache":
            size, src = (int(e.approx_download_gb * 1e9), "cache") if e.approx_download_gb else (None, "unknown")
        elif online:
            size, src = download_size(e, token)
        else:
            size, src = catalog_size(e)
        rows.append(ModelRow(e, size, src, estimate_for_device(e, context, device), device.name))
    return rows
