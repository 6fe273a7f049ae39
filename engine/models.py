"""Which models chatapp knows (assets/catalog.json), which are on this machine, and how a
``--model`` argument (an id or a path) becomes a checkpoint folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import embedded
from .errors import EngineError

CATALOG = Path(__file__).resolve().parent.parent / "assets" / "catalog.json"


@dataclass
class ModelEntry:
    id: str
    format: str
    params_b: float | None
    description: str
    local_path: str | None  # where it is on this machine, if it is


def catalog() -> list[dict]:
    return json.loads(CATALOG.read_text(encoding="utf-8"))["models"]


def is_embedded(spec: str | None) -> bool:
    return spec is None or spec.lower() in (embedded.EMBEDDED_ID.lower(), "embedded")


def _hf_cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache (or not a valid repo id)
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


def list_models() -> list[ModelEntry]:
    """The catalog's models, then any other Llama checkpoints in the Hugging Face cache."""
    local: dict[str, str] = {}
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model" and repo.revisions:
                newest = max(repo.revisions, key=lambda r: r.last_modified)
                local[repo.repo_id] = str(newest.snapshot_path)
    except Exception:  # no cache folder yet
        pass
    out = []
    for m in catalog():
        path = local.pop(m["id"], None)
        if m.get("source") == "embedded":
            path = str(embedded.converted_dir()) if embedded.converted_dir().exists() else "(built on first use)"
        out.append(ModelEntry(m["id"], m["format"], m.get("params_b"), m["description"], path))
    for repo_id, path in sorted(local.items()):
        out.append(ModelEntry(repo_id, "?", None, "in the Hugging Face cache", path))
    return out
