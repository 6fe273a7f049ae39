"""How a ``--model`` argument (an id or a path) becomes a checkpoint folder. The catalog of known
models and the list of those on this machine are in engine.hub.catalog; the Hugging Face cache in
engine.hub.hf_cache."""

from __future__ import annotations

from pathlib import Path

from engine.errors import EngineError
from engine.hub import embedded, hf_cache
from engine.hub.catalog import find


def is_embedded(spec: str | None) -> bool:
    return spec is None or spec.lower() in (embedded.EMBEDDED_ID.lower(), "embedded")


def resolve(spec: str | None, progress=lambda msg: None) -> tuple[str, Path]:
    """(display name, checkpoint folder) for an id or a path."""
    if is_embedded(spec):
        return embedded.EMBEDDED_ID, embedded.ensure_converted(progress)
    if not spec.strip():
        raise EngineError("model '': give a model id or a checkpoint folder (left out: the embedded model)")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EngineError(f"{path}: expected a checkpoint folder (config.json + *.safetensors), got a file")
        return path.name, path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        entry = find(spec)
        snap = hf_cache.complete_snapshot(spec, entry and entry.format)
        if snap is not None:
            return spec, hf_cache.inside_its_cache_folder(spec, snap)
        raise EngineError(f"model {spec!r} is not downloaded to the Hugging Face cache on this machine")
    raise EngineError(f"model {spec!r}: no such folder, and not a model id")
