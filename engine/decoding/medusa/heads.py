"""Loading Medusa heads, strictly (a missing or extra head tensor is an error):

- the modelopt / TensorRT-LLM export: heads beside the base model in its safetensors files,
  ``medusa_heads.{h}.{l}.linear.{weight,bias}`` (ResBlocks) and ``medusa_heads.{h}.{L}.weight``
  (each head's lm_head), sizes in config.json ``"medusa": {num_medusa_heads, num_medusa_layers}``;
  FP8 like the base model (``weight_scale`` / ``input_scale``) when the checkpoint is FP8;
- FasterDecoding's ``medusa_lm_head.safetensors`` (or ``.pt``, read with ``weights_only=True``):
  ``{h}.{l}.linear.{weight,bias}`` and, with per-head lm_heads, ``{h}.{L}.weight``; without them
  (Medusa-2) the heads share the base model's lm_head. chatapp's own heads add ``token_ids``
  (the token subset they score), ``{h}.root.weight`` (their input from the root token's
  embedding) and ``{h}.path.{j}.weight`` (from the path's token at depth j = 1..h; see
  MedusaHeads)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from engine.formats.tensor_source import TensorSource
from engine.errors import EngineError
from engine.model.llama import Linear, default_splits
from engine.decoding.medusa.verify import MedusaHeads
from engine.formats.fp8 import Fp8Format
from engine.paths import ASSETS

TOKEN_IDS = "token_ids"  # heads on the shared lm_head that score only these tokens (ours)
_ROOT = re.compile(r"^(\d+)\.root\.weight$")  # a head's input from the root token's embedding (ours)
_PATH = re.compile(r"^(\d+)\.path\.(\d+)\.weight$")  # ... and from its path's tokens (ours)
SHIPPED = ASSETS / "medusa"
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight|weight_scale|input_scale|linear\.weight_scale|"
                  r"linear\.input_scale)$")


def _layout(names: set[str], prefix: str, where) -> tuple[int, int, bool]:
    """(heads, layers, own lm_heads) from the tensor names under ``prefix``; unexpected names are errors."""
    heads, layers, own = set(), set(), set()
    for name in names:
        if not name.startswith(prefix) or name == TOKEN_IDS or _ROOT.match(name[len(prefix):]) or \
                _PATH.match(name[len(prefix):]):
            continue
        m = _KEY.match(name[len(prefix):])
        if m is None:
            raise EngineError(f"{where}: unexpected Medusa tensor {name!r}")
        h, idx, kind = int(m[1]), int(m[2]), m[3]
        heads.add(h)
        (layers if kind.startswith("linear") else own).add((h, idx))
    if not heads:
        raise EngineError(f"{where}: no Medusa head tensors ({prefix}…)")
    n_heads = max(heads) + 1
    n_layers = max(i for _, i in layers) + 1 if layers else 0
    return n_heads, n_layers, bool(own)


def _build(src, prefix: str, n_heads: int, n_layers: int, own: bool, hidden: int, vocab: int, device, dtype,
           fmt: Fp8Format | None) -> MedusaHeads:
    expected = {TOKEN_IDS}

    def linear(name: str, out: int, bias: bool):
        expected.add(name + ".weight")
        if bias:
            expected.add(name + ".bias")
        b = src.get_shaped(name + ".bias", (out,)).to(device, dtype) if bias else None
        if fmt is not None and src.get(name + ".weight").dtype == torch.float8_e4m3fn:
            expected.update({name + ".weight_scale", name + ".input_scale"} & src.names())
            return fmt.load(src, [(name, (out, hidden))], b, device)
        w = src.get_shaped(name + ".weight", (out, hidden))
        return Linear(w.to(device, dtype).t(), b, default_splits(device))

    blocks = [[linear(f"{prefix}{h}.{l}.linear", hidden, True) for l in range(n_layers)] for h in range(n_heads)]
    lm_heads = [linear(f"{prefix}{h}.{n_layers}", vocab, False) for h in range(n_heads)] if own else None
    has_root = any(_ROOT.match(n[len(prefix):]) for n in src.names() if n.startswith(prefix))
    root_proj = [linear(f"{prefix}{h}.root", hidden, False) for h in range(n_heads)] if has_root else None
    path_names = sorted(n for n in src.names() if n.startswith(prefix) and _PATH.match(n[len(prefix):]))
    if path_names and not has_root:
        raise EngineError(f"{src.file_of(path_names[0])}: Medusa tensor {path_names[0]!r} (a path input) needs "
                          f"the heads' root inputs ({prefix}{{h}}.root.weight), which are missing")
    path_proj = [[linear(f"{prefix}{h}.path.{j}", hidden, False) for j in range(1, h + 1)]
                 for h in range(n_heads)] if path_names else None
    extra = sorted(n for n in src.names() if n.startswith(prefix) and n not in expected)
    if extra:
        raise EngineError(f"{src.file_of(extra[0])}: unexpected Medusa tensor {extra[0]!r}")
    token_ids = None
    if TOKEN_IDS in src.names():
        token_ids = src.get(TOKEN_IDS)
        if own or token_ids.dim() != 1 or token_ids.dtype != torch.int64 or not len(token_ids) or \
                int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise EngineError(f"{src.file_of(TOKEN_IDS)}: {TOKEN_IDS!r} must be a non-empty int64 list of token ids "
                              f"below {vocab}, for heads that share the base lm_head")
        token_ids = token_ids.to(device)
    return MedusaHeads(blocks, lm_heads, token_ids, root_proj, path_proj)


def output_rows(lm_head: Linear, token_ids: torch.Tensor) -> torch.Tensor:
    """Rows ``token_ids`` of an output projection, [len(token_ids), hidden]."""
    if not isinstance(lm_head, Linear):
        raise EngineError("Medusa heads that score a token subset need a plain (not quantized) lm_head")
    return lm_head.dense().t()[token_ids.to(lm_head.device)]  # [len(token_ids), hidden]


def shipped_heads(name: str, cfg, device, dtype):
    """The heads chatapp ships for a model (assets/medusa/<name>.safetensors, trained by
    training/medusa.py) and their acceptance profile, or (None, None)."""
    from engine.decoding.medusa.plan import Profile

    path = SHIPPED / f"{name}.safetensors"
    if not path.exists():
        return None, None
    heads = load_fasterdecoding(path, cfg.hidden_size, cfg.vocab_size, device, dtype)
    profile_path = path.with_suffix(".json")
    return heads, (Profile.read(profile_path) if profile_path.exists() else None)


def load_heads(model_dir: Path, medusa: dict | None, src: TensorSource, hidden: int, vocab: int, device, dtype,
               fmt: Fp8Format | None = None) -> MedusaHeads | None:
    """The checkpoint's Medusa heads (``medusa``: config.json's "medusa" entry), or None when it
    has none."""
    model_dir = Path(model_dir)
    if medusa is not None:  # modelopt / TensorRT-LLM export
        try:
            n_heads, n_layers = int(medusa["num_medusa_heads"]), int(medusa["num_medusa_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{model_dir / 'config.json'}: bad 'medusa' entry ({e})") from None
        found = _layout(src.names(), "medusa_heads.", model_dir)
        if found[:2] != (n_heads, n_layers):
            raise EngineError(f"{model_dir}: config.json says {n_heads} Medusa heads of {n_layers} layers, the "
                              f"checkpoint holds {found[0]} heads of {found[1]} layers")
        return _build(src, "medusa_heads.", n_heads, n_layers, found[2], hidden, vocab, device, dtype, fmt)
    for name in ("medusa_lm_head.safetensors", "medusa_lm_head.pt"):
        path = model_dir / name
        if path.exists():
            return load_fasterdecoding(path, hidden, vocab, device, dtype)
    return None


def load_fasterdecoding(path: Path, hidden: int, vocab: int, device, dtype) -> MedusaHeads:
    path = Path(path)
    if path.suffix == ".pt":
        try:  # weights_only: a pickle that would run code is refused
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EngineError(f"{path}: not a plain tensor file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise EngineError(f"{path}: expected a dict of tensors")
        src = TensorSource.from_tensors(tensors, path)
    else:
        src = TensorSource(path.parent, files=[path])
    prefix = "medusa_head." if any(n.startswith("medusa_head.") for n in src.names()) else ""
    n_heads, n_layers, own = _layout(src.names(), prefix, path)
    return _build(src, prefix, n_heads, n_layers, own, hidden, vocab, device, dtype, None)
