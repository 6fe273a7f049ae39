"""Where chatapp keeps derived files (converted checkpoints) and user data."""

import os
from pathlib import Path

import platformdirs

APP = "chatapp"
ASSETS = Path(__file__).resolve().parent.parent / "assets"  # what chatapp ships: catalog, Medusa heads, DMC retrofits


def cache_dir() -> Path:
    """Derived, re-creatable files. ``CHATAPP_CACHE_DIR`` overrides the platform default."""
    override = os.environ.get("CHATAPP_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    """User data (chat history). ``CHATAPP_DATA_DIR`` overrides the platform default."""
    override = os.environ.get("CHATAPP_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    """User settings (settings.toml). ``CHATAPP_CONFIG_DIR`` overrides the platform default."""
    override = os.environ.get("CHATAPP_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir(APP))
