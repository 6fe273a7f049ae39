"""The Hugging Face cache (HF_HOME / HF_HUB_CACHE) as the engine sees it: which files of a
checkpoint it loads (allow_patterns: what ``chatapp pull`` downloads), which models the cache
holds, whether one of them is complete, and whether the hub is off (HF_HUB_OFFLINE).

It imports nothing of engine.hub (only engine.errors): catalog, download and resolve import it. huggingface_hub is
imported inside the functions, so that importing this module (the UI process does, to list
models) does not load it."""

from __future__ import annotations

from pathlib import Path

from engine.errors import EngineError

# What the engine reads from a Hugging Face checkpoint folder (engine.formats.tensor_source, engine.config,
# engine.tokenizer, engine.formats.fp8, engine.decoding.medusa.heads).
HF_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model",
    "hf_quant_config.json", "medusa_lm_head.pt", "medusa_config.json",
]
# Legacy Megatron-LM checkpoints (engine.formats.megatron): one model_optim_rng.pt per rank, the
# tracker file that names the iteration folder, and the SentencePiece tokenizer when the repo has it.
MEGATRON_PATTERNS = [
    "*model_optim_rng.pt", "latest_checkpointed_iteration.txt", "tokenizer.model", "*.json",
]


def allow_patterns(catalog_format: str | None = None) -> list[str]:
    """The file patterns the engine loads from a repository, by its catalog format (e.g.
    "megatron-dmc"; None for a repository the catalog does not know)."""
    if catalog_format is not None and catalog_format.startswith("megatron"):
        return list(MEGATRON_PATTERNS)
    return list(HF_PATTERNS)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (read by huggingface_hub when it is imported; tests patch the constant)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def snapshots() -> dict[str, str]:
    """repo id -> newest snapshot folder, for the models in the Hugging Face cache."""
    local: dict[str, str] = {}
    try:
        from huggingface_hub import constants, scan_cache_dir

        for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos:
            if repo.repo_type == "model" and repo.revisions:
                newest = max(repo.revisions, key=lambda r: r.last_modified)
                local[repo.repo_id] = str(newest.snapshot_path)
    except Exception:  # no cache folder yet, or an unreadable one
        pass
    return local


def complete_snapshot(repo_id: str, catalog_format: str | None = None) -> Path | None:
    """The cached snapshot of ``repo_id`` when it holds every file the engine loads
    (allow_patterns(catalog_format), by the tree listing huggingface_hub keeps next to a snapshot;
    any snapshot when there is none to go by), else None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns(catalog_format)))
    except Exception:  # not in the cache, only partly downloaded, or not a valid repo id
        return None


def inside_its_cache_folder(repo_id: str, snapshot: Path) -> Path:
    """``snapshot``, once every file in it is found to resolve inside the repository's own cache
    folder (models--owner--name: the snapshot's links point at its blobs/)."""
    home = snapshot.resolve().parents[1]
    for path in snapshot.rglob("*"):
        if not path.resolve().is_relative_to(home):
            raise EngineError(f"{repo_id}: {path.relative_to(snapshot)} in the downloaded snapshot leads outside "
                              f"its cache folder ({home}); refused")
    return snapshot
