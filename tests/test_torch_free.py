"""The packages the UI process and the command line import must not load PyTorch (seconds to
import, and the chat screen opens at once): the engine process and the headless session import it
when they load a model."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = (
    "engine.events", "engine.errors", "engine.paths", "engine.units",
    "engine.hub.catalog", "engine.hub.layout", "engine.hub.download", "engine.hub.resolve",
    "engine.serving.client", "engine.decoding.speculative.counters", "engine.serving.worker", "engine.serving.remote",
    "chatapp.cli", "chatapp.store.history", "chatapp.store.settings", "chatapp.compare.spec",
    "chatapp.tui.app", "chatapp.tui.picker", "chatapp.server",
)

# Imports them one by one in a fresh interpreter and names the first one that brought torch in.
CODE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "torch" in sys.modules:
        print(name)
        break
"""


def test_the_torch_free_packages_import_no_torch():
    r = subprocess.run([sys.executable, "-c", CODE, *TORCH_FREE], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {r.stdout.strip()} imports torch"
