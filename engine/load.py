"""The one loader: a LoadModel request -> the model, its tokenizer and the decoder of the
decoding asked for. Every branch on what is loaded happens here, in ``load``:

    which checkpoint      resolve(req.model)                  engine/hub/resolve.py (download, embedded)
    what kind it is       Hugging Face safetensors / Megatron  engine/hub/layout.py
    its weights           as stored (FP8 formats included),    engine/model/weights.py
                          a DMC delta applied
    --quantize fp8        a pass over the loaded model         engine/model/gptq.py
    --quantize bf16       bfloat16 weights                     engine/model/weights.py
    the tokenizer         the checkpoint's, or for Megatron    engine/tokenizer.py
                          the SentencePiece file beside it
    the decoder           proposers (none / Medusa heads +     engine/decoding/
                          tree plan / lookup / both) over a
                          cache (dense / DMC)

The decodings a model offers are the ones engine/hub/layout.py lists for it (the picker's
choices); asking for another is a one-line error that says what is missing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine import memory
from engine.config import load_config
from engine.decoding.base import Decoder
from engine.decoding.dmc import DMCDecoder, calibration_pass, dmc_settings
from engine.decoding.medusa.heads import load_heads, shipped_heads
from engine.decoding.medusa.plan import plan
from engine.decoding.medusa.proposer import MedusaProposer
from engine.decoding.lookup.proposer import LookupBeside, LookupProposer, cost_sizes
from engine.decoding.speculative.decoder import SpeculativeDecoder
from engine.decoding.speculative.step_costs import step_costs
from engine.decoding.plain import PlainDecoder
from engine.errors import EngineError
from engine.events import DEFAULT_CONTEXT, QUANTIZE, LoadModel, decoding_name, decoding_parts
from engine.formats.fp8 import Fp8Format, detect
from engine.formats.megatron import read_megatron_checkpoint
from engine.formats.tensor_source import TensorSource
from engine.hub import layout
from engine.hub.resolve import resolve
from engine.model import gptq, weights
from engine.model.kv_cache import kv_cache_bytes
from engine.model.llama import LlamaModel
from engine.tokenizer import ChatTokenizer, sentencepiece_dir
from engine.units import binary_size



@dataclass
class LoadedModel:
    name: str
    path: Path  # the checkpoint folder
    model: LlamaModel
    tokenizer: ChatTokenizer
    decoder: Decoder
    quantization: str | None = None  # "fp8" when quantized on load


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise EngineError(f"device {name!r} is not supported (use cpu or cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(name)


def load(req: LoadModel, progress=lambda msg: None) -> LoadedModel:
    device = pick_device(req.device)
    name, path = resolve(req.model, progress)
    progress(f"loading {name} on {device.type}")
    decoding = decoding_name(req.decoding)
    proposers, cache_kind = decoding_parts(decoding)
    if req.quantize not in (None, *QUANTIZE):
        raise EngineError(f"quantize {req.quantize!r} is not supported (supported: {', '.join(QUANTIZE)})")

    dmc = None  # the DMC settings {"init_val", "window"} when decoding with DMC
    fmt = None  # the stored FP8 format (Medusa heads are read beside the weights, in it)
    tokenizer_dir = path
    if layout.is_megatron(path):
        if cache_kind != "dmc":
            raise EngineError(f"{path}: a Megatron DMC checkpoint decodes with a DMC cache only (--decoding dmc "
                              "or medusa+dmc): its attention was trained with the compressed cache")
        cfg, src, info = read_megatron_checkpoint(path)
        dmc = dmc_settings(info["args"])
        progress("DMC decoding (weights: megatron checkpoint)")
        tokenizer_dir = _megatron_tokenizer(path, req.tokenizer)
    elif cache_kind == "dmc":
        delta = layout.dmc_delta(name, path)
        if delta is None:
            raise EngineError(f"{name}: no DMC for this model: not a Megatron DMC checkpoint, no "
                              f"{layout.LOCAL_DMC_DELTA} in {path}, and chatapp ships no DMC retrofit for it "
                              f"({layout.SHIPPED_DMC / (name + '.safetensors')})")
        cfg, src, dmc = weights.retrofitted_source(path, delta)  # --quantize calibrates with the delta applied
        progress(f"DMC decoding (weights: {delta})")
    else:
        cfg = load_config(path)
        fmt = detect(path, cfg.quantization_config)
        src = TensorSource(path)
        if req.quantize and fmt is not None:
            raise EngineError(f"--quantize {req.quantize}: the checkpoint is already quantized ({fmt.name} FP8)")
    weights.prepare_cpu_kernel(device, None, progress)
    method = None
    if req.quantize == "fp8":  # calibrated as it will decode: with DMC, through the compressed cache
        head = gptq.default_head(device)
        method = gptq.Fp8OnLoad(cfg, src, head_format=head) if dmc is None else \
            gptq.Fp8OnLoad(cfg, src, calibration_pass(dmc), f"dmc {dmc['init_val']!r} {dmc['window']}", head_format=head)
    elif req.quantize == "bf16":
        method = weights.Bf16OnLoad()
    model = weights.from_source(cfg, src, device, None, fmt, method)
    if method is not None:
        method.after_loading(model, progress)

    tokenizer = ChatTokenizer(tokenizer_dir, model.cfg)
    context = _context(req.context, name, model)
    decoder = DMCDecoder(model, context, **dmc) if cache_kind == "dmc" else PlainDecoder(model, context)
    if proposers:
        decoder = _speculative(name, path, decoder, decoding, proposers, src, fmt, req.medusa_choices, progress)
    weights.check_all_used(src, path, progress)
    return LoadedModel(name, path, model, tokenizer, decoder, req.quantize)


def _context(asked: int | None, name: str, model: LlamaModel) -> int:
    """The KV cache length: as asked (at least 16, at most the model's positions, and a cache that
    fits the device's free memory), or min(the model's positions, DEFAULT_CONTEXT)."""
    most = model.cfg.max_position_embeddings
    if asked is None:
        return min(most, DEFAULT_CONTEXT)
    if asked < 16:
        raise EngineError(f"context {asked} is too small (at least 16 tokens)")
    if asked > most:
        raise EngineError(f"context {asked} is more than the {most} positions {name} was made for "
                          "(max_position_embeddings)")
    need, free = kv_cache_bytes(model.cfg, asked, 1, model.dtype), memory.free(model.device)
    if need > free:
        raise EngineError(f"context {asked}: its KV cache needs {binary_size(need)}, more than the "
                          f"{binary_size(free)} free on the {model.device.type}; ask for a smaller --context")
    return asked


def _speculative(name: str, path: Path, base: Decoder, decoding: str, proposers: tuple[str, ...], src: TensorSource,
                 fmt: Fp8Format | None, choices: str | None, progress) -> SpeculativeDecoder:
    """``proposers`` (medusa, lookup, or both joined in one tree) over ``base`` (the plain or the
    DMC decoder)."""
    model = base.model
    dmc = {"init_val": base.dmc.init_val, "window": base.dmc.window} if isinstance(base, DMCDecoder) else None
    proposer, tree_plan = None, None
    if "medusa" in proposers:
        heads, tree_plan = _medusa(name, path, base, src, fmt, choices, dmc, progress)
        if tree_plan.tree is not None:
            proposer = MedusaProposer(model, heads, tree_plan.tree)
    if "lookup" in proposers:
        progress("measuring the verify steps of lookup drafts on this device")
        first = proposer.max_nodes if proposer is not None else 1
        costs = step_costs(model, name, cost_sizes(first), dmc=dmc, proposer=f"lookup{first}")
        proposer = LookupProposer(model.device, costs) if proposer is None else \
            LookupBeside(proposer, model.device, costs, tree_plan.expected_tokens_per_step)
    if proposer is not None and proposer.max_nodes >= base.context:
        raise EngineError(f"{decoding}: its trees have up to {proposer.max_nodes} nodes, which do not fit a context "
                          f"of {base.context} tokens with a prompt; choose a smaller tree or a longer --context")
    return SpeculativeDecoder(base, proposer, decoding, tree_plan)


def _medusa(name: str, path: Path, base: Decoder, src: TensorSource, fmt: Fp8Format | None,
            choices: str | None, dmc: dict | None, progress):
    """(heads, plan): the checkpoint's own Medusa heads (in ``src``, FP8 like its layers when
    ``fmt`` says so), else the ones chatapp ships for it, and the tree to verify over ``base``'s
    cache."""
    model = base.model
    cfg = model.cfg
    heads = load_heads(path, cfg.medusa, src, cfg.hidden_size, cfg.vocab_size, model.device, model.dtype, fmt)
    profile = None
    if heads is None:
        heads, profile = shipped_heads(name, cfg, model.device, model.dtype,
                                       "dmc" if isinstance(base, DMCDecoder) else "plain")
    if heads is None:
        raise EngineError(f"{name}: the checkpoint has no Medusa heads (config.json 'medusa' entry or "
                          "medusa_lm_head.safetensors) and chatapp ships none for it")
    progress("choosing the Medusa tree for this device")
    return heads, plan(model, heads, name, choices, profile, dmc)


def _megatron_tokenizer(path: Path, tokenizer: Path | None = None) -> Path:
    """Where a Megatron checkpoint's tokenizer files are (it does not include them): ``tokenizer``
    when given (a tokenizer.model or a folder with tokenizer.json), else its root folder's
    tokenizer.json or SentencePiece tokenizer.model (converted once and cached)."""
    if tokenizer is not None and Path(tokenizer).is_dir():
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            raise EngineError(f"{tokenizer}: no tokenizer.json in this folder")
        return Path(tokenizer)
    root = layout.checkpoint_root(layout.checkpoint_file(path))
    if tokenizer is None and (root / "tokenizer.json").is_file():
        return root
    return sentencepiece_dir(layout.tokenizer_path(path, tokenizer))
