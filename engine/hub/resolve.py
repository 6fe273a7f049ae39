"""How a ``--model`` argument (an id or a path) becomes a checkpoint folder. The catalog of known
models and the list of those on this machine are in engine.hub.catalog."""

from __future__ import annotations

from pathlib import Path

from . import embedded
from engine.errors import EngineError

# The catalog and the list of models moved to engine.hub.catalog; kept importable from here.
from engine.hub.catalog import CATALOG, ModelEntry, catalog, list_models  # noqa: E402,F401


def is_embedded(spec: str | None) -> bool:
    return spec is None or spec.lower() in (embedded.EMBEDDED_ID.lower(), "embedded")


def _hf_cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` when it holds every file the engine loads (what
    ``chatapp pull`` downloads: engine.hub.download.allow_patterns), else None."""
    from huggingface_hub import snapshot_download

    from engine.hub.download import allow_patterns

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns(repo_id)))
    except Exception:  # not in the cache, only partly downloaded, or not a valid repo id
        return None


def resolve(spec: str | None, progress=lambda msg: None) -> tuple[str, Path]:
    """(display name, checkpoint folder) for an id or a path."""
    if is_embedded(spec):
        return embedded.EMBEDDED_ID, embedded.ensure_converted(progress)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EngineError(f"{path}: expected a checkpoint folder (config.json + *.safetensors), got a file")
        return path.name, path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        snap = _hf_cached_snapshot(spec)
        if snap is not None:
            return spec, snap
        raise EngineError(f"model {spec!r} is not downloaded to the Hugging Face cache on this machine")
    raise EngineError(f"model {spec!r}: no such folder, and not a model id")
