"""What a checkpoint folder holds, read from its files alone (torch-free: the model picker runs
in the UI process): its kind (Hugging Face or legacy Megatron), where its Medusa heads and DMC
retrofit are, and so which decodings it offers. The loader (engine/load.py) loads from exactly
these places, so the decodings offered here are the ones it accepts.

- Medusa: the checkpoint's own heads (config.json ``"medusa"`` entry: the modelopt / TensorRT-LLM
  export; or FasterDecoding's ``medusa_lm_head.safetensors`` / ``.pt``), or the heads chatapp ships
  for the model's name (``assets/medusa/<name>.safetensors``).
- DMC: a legacy Megatron DMC checkpoint (``mp_rank_00/model_optim_rng.pt``), or a Hugging Face
  checkpoint with a retrofit delta: ``dmc/delta.safetensors`` in its folder or the one chatapp
  ships for its name (``assets/dmc/<name>.safetensors``), when its weights are stored in high
  precision. A Megatron DMC checkpoint decodes with DMC only: its attention was trained with the
  compressed cache."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import EngineError
from engine.events import DECODINGS
from engine.paths import ASSETS

SHIPPED_MEDUSA = ASSETS / "medusa"
SHIPPED_DMC = ASSETS / "dmc"
LOCAL_DMC_DELTA = "dmc/delta.safetensors"  # a delta inside the checkpoint folder (a subfolder: not a weights file)
MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")  # FasterDecoding's heads file
MEGATRON_FILE = "model_optim_rng.pt"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
MEGATRON_TOKENIZER = "tokenizer.model"  # Llama 2's SentencePiece model, which Megatron checkpoints lack


# ---- Megatron ---------------------------------------------------------------------------------
def checkpoint_file(path: Path) -> Path:
    """The rank-0 file for a path to it, to its mp_rank_00 folder, or to a checkpoint root
    (the layout of the Hugging Face DMC repos, mp_rank_00/ at the root, or Megatron's own,
    iter_NNNNNNN/mp_rank_00/ or release/mp_rank_00/ named by latest_checkpointed_iteration.txt)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise EngineError(f"{path}: checkpoint not found")
    candidates = [path / MEGATRON_FILE, path / "mp_rank_00" / MEGATRON_FILE]
    tracker = path / MEGATRON_TRACKER
    if tracker.exists():
        tag = tracker.read_text(encoding="utf-8", errors="replace").strip()
        digits = tag.isascii() and tag.isdigit()  # "²" is a digit to str.isdigit, not to int()
        sub = "release" if tag == "release" else (f"iter_{int(tag):07d}" if digits else None)
        if sub:
            candidates.append(path / sub / "mp_rank_00" / MEGATRON_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise EngineError(f"{path}: no Megatron checkpoint file (looked for "
                      f"{', '.join(str(c.relative_to(path)) for c in candidates)})")


def checkpoint_root(file: Path) -> Path:
    """The folder above mp_rank_00 (and above iter_*/release), where the tokenizer goes."""
    root = Path(file).parent
    if root.name.startswith("mp_rank_"):
        root = root.parent
        if root.name.startswith("iter_") or root.name == "release":
            root = root.parent
    return root


def tokenizer_path(checkpoint: Path, tokenizer: Path | None = None) -> Path:
    """The Llama 2 SentencePiece tokenizer.model for a Megatron checkpoint: ``tokenizer`` when
    given, else tokenizer.model in the checkpoint's root folder."""
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise EngineError(f"{tokenizer}: tokenizer file not found")
        return tokenizer
    root = checkpoint_root(checkpoint_file(checkpoint))
    found = root / MEGATRON_TOKENIZER
    if found.is_file():
        return found
    raise EngineError(f"{root}: no {MEGATRON_TOKENIZER}: Megatron checkpoints do not include their tokenizer; put the "
                      f"Llama 2 SentencePiece {MEGATRON_TOKENIZER} (from meta-llama/Llama-2-7b) at {found}, or give "
                      "its path with --tokenizer PATH")


def is_megatron(path: Path) -> bool:
    """A legacy Megatron checkpoint (no config.json, a rank-0 file where Megatron puts it)."""
    path = Path(path)
    if (path / "config.json").exists():
        return False
    try:
        checkpoint_file(path)
    except EngineError:
        return False
    return True


# ---- Medusa heads and DMC deltas ----------------------------------------------------------------
def shipped_medusa(name: str) -> Path | None:
    path = SHIPPED_MEDUSA / f"{name}.safetensors"
    return path if path.is_file() else None


def shipped_dmc(name: str) -> Path | None:
    path = SHIPPED_DMC / f"{name}.safetensors"
    return path if path.is_file() else None


def _config(path: Path) -> dict:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def medusa_config(path: Path) -> dict | None:
    """config.json's ``"medusa"`` entry (the modelopt / TensorRT-LLM export), or None."""
    return _config(path).get("medusa")


def is_quantized(path: Path) -> bool:
    """Stored quantized (config.json's quantization_config, or modelopt's hf_quant_config.json):
    a DMC delta applies to high-precision weights only."""
    return "quantization_config" in _config(path) or (Path(path) / "hf_quant_config.json").is_file()


def has_own_heads(path: Path) -> bool:
    return medusa_config(path) is not None or any((Path(path) / f).is_file() for f in MEDUSA_FILES)


def dmc_delta(name: str, path: Path) -> Path | None:
    """The retrofit delta a Hugging Face checkpoint decodes DMC with: its own, else the shipped one."""
    own = Path(path) / LOCAL_DMC_DELTA
    return own if own.is_file() else shipped_dmc(name)


def decodings(name: str, path: Path | None, catalog_format: str = "") -> list[str]:
    """The decodings (in events.DECODINGS order) the loader accepts for the model ``name``: from
    its folder's files when it is on this machine (``path``), else from what the catalog says
    of its format (e.g. "modelopt-fp8+medusa", "megatron-dmc") and what chatapp ships for it."""
    if path is not None and Path(path).exists():
        if is_megatron(path):
            offered = {"dmc"}
        else:
            offered = {"plain"}
            if has_own_heads(path) or shipped_medusa(name):
                offered.add("medusa")
            if dmc_delta(name, path) and not is_quantized(path):
                offered.add("dmc")
    else:
        fmt = catalog_format.lower()
        offered = {"dmc"} if "megatron" in fmt else {"plain"}
        if "medusa" in fmt or shipped_medusa(name):
            offered.add("medusa")
        if "dmc" in fmt or (shipped_dmc(name) and "fp8" not in fmt):
            offered.add("dmc")
    if "medusa" in offered and "dmc" in offered:  # the heads' proposals verified over the DMC cache
        offered.add("medusa+dmc")
    # lookup drafts from the conversation for any model, alone or beside the heads, over either cache
    offered |= {"lookup" if d == "plain" else d.replace("dmc", "lookup+dmc") if d.startswith("dmc") else
                d.replace("medusa", "medusa+lookup") for d in offered}
    return [d for d in DECODINGS if d in offered]
