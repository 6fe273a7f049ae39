"""The model picker driven through Textual's pilot, with downloads from a fake hub (the real
huggingface_hub code path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chatapp.tui.app import ChatApp
from chatapp.tui.picker import PickerScreen, decodings, model_spec
from engine.hub.catalog import DeviceMemory
from engine.serving.client import EngineClient
from engine.events import LoadModel
from fakes.engine import FakeWorker, wait_for
from fakes.hub import FakeHub, install

SIZE = (160, 40)
H100 = DeviceMemory("NVIDIA H100 80GB HBM3", 79 * 2**30, 80 * 2**30)
SMALL = DeviceMemory("NVIDIA GeForce RTX 3060", 11 * 2**30, 12 * 2**30)
SPARSE_BASE = "neuralmagic/Sparse-Llama-3.1-8B-gsm8k-2of4"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x01" * 20000,
         "tokenizer.json": b"{}", "README.md": b"not fetched"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    h = FakeHub(chunk_size=256)
    h.add(SPARSE_BASE, dict(FILES))
    h.add("meta-llama/Llama-3.1-8B-Instruct", dict(FILES), gated=True)
    install(h, monkeypatch, tmp_path)
    return h


async def open_picker(pilot, app, device=H100) -> PickerScreen:
    await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
    screen = PickerScreen(app.settings, app.load_request, online=False, device=device)
    app.push_screen(screen, app._picked)
    await wait_for(pilot, lambda: screen.is_mounted and screen.table.row_count > 5, 5, "the rows")
    return screen


def offered(screen: PickerScreen) -> list[str]:
    """The decodings the picker offers for the highlighted row."""
    return [o[0] for o in screen.query_one("#decoding")._options]


def row_of(screen: PickerScreen, model_id: str) -> list[str]:
    return [str(c) for c in screen.table.get_row(model_id)]


async def goto(pilot, screen: PickerScreen, model_id: str) -> None:
    screen.table.move_cursor(row=screen.table.get_row_index(model_id))
    await pilot.pause()


async def test_the_catalog_with_sizes_and_fit(hub):
    app = ChatApp(client=EngineClient(FakeWorker()))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_picker(pilot, app)
        assert "NVIDIA H100 80GB HBM3" in str(screen.query_one("#device").content)
        medusa = row_of(screen, "nvidia/Llama-3.1-8B-Medusa-FP8")
        assert medusa[1] == "fp8-modelopt+medusa" and medusa[2] == "8B" and medusa[3].endswith("GB")
        assert medusa[5] == "✓ fits"
        assert row_of(screen, "nvidia/Llama-3.1-405B-Instruct-FP8")[5] == "✗ won't fit"

        await goto(pilot, screen, "nvidia/Llama-3.1-405B-Instruct-FP8")
        await pilot.press("enter")
        detail = str(screen.query_one("#detail").content)
        assert "--remote" in detail and app.screen is screen  # the way to run it; nothing loaded

        await goto(pilot, screen, "nvidia/Llama-3.1-8B-Medusa-FP8")
        assert offered(screen) == ["plain", "medusa", "lookup", "medusa+lookup"]  # lookup: every model
        await goto(pilot, screen, "SmolLM2-135M-Instruct")  # the heads and the DMC retrofit chatapp ships
        assert offered(screen) == ["plain", "medusa", "lookup", "medusa+lookup", "dmc", "medusa+dmc", "lookup+dmc",
                                   "medusa+lookup+dmc"]
        await goto(pilot, screen, "nvidia/Llama-2-7B-DMC-8x")  # a Megatron DMC checkpoint: DMC only
        assert offered(screen) == ["dmc", "lookup+dmc"] and screen.query_one("#decoding").value == "dmc"


async def test_the_estimate_follows_the_chosen_set_up(hub):
    """A DMC cache divides the KV bytes by the model's compression; FP8 weights take a byte a weight."""
    import re

    app = ChatApp(client=EngineClient(FakeWorker()))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_picker(pilot, app)
        await goto(pilot, screen, "nvidia/Llama-2-7B-DMC-8x")

        def figures():
            text = str(screen.query_one("#detail").content)
            found = re.search(r"weights ([\d.]+) GiB \+ KV cache ([\d.]+) GiB", text)
            return text, float(found[1]), float(found[2])

        text, weights, kv = figures()
        assert text.splitlines()[-1].startswith("dmc: weights")
        screen.query_one("#weights").value = "fp8"
        await wait_for(pilot, lambda: "FP8 weights" in str(screen.query_one("#detail").content), 5, "the FP8 estimate")
        _, fp8_weights, fp8_kv = figures()
        assert fp8_weights == pytest.approx(weights / 2, rel=0.05) and fp8_kv == kv


async def test_a_model_that_wont_fit_asks_before_loading():
    fake = FakeWorker()
    app = ChatApp(client=EngineClient(fake))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_picker(pilot, app, device=SMALL)
        screen.query_one("#context").value = "131072"
        await wait_for(pilot, lambda: "131072" in str(screen.query_one("#device").content), 5, "new estimates")
        row = row_of(screen, "SmolLM2-135M-Instruct")
        assert row[5] == "✓ fits"  # the embedded model fits anywhere
        await goto(pilot, screen, "nvidia/Llama-2-7B-DMC-8x")
        assert "KV cache" in str(screen.query_one("#detail").content)


async def test_picking_the_embedded_model_with_medusa_loads_it():
    fake = FakeWorker()
    app = ChatApp(client=EngineClient(fake))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_picker(pilot, app)
        await goto(pilot, screen, "SmolLM2-135M-Instruct")
        screen.query_one("#decoding").value = "medusa"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen is not screen, 3, "the picker to close")
        await wait_for(pilot, lambda: len([r for r in fake.requests if isinstance(r, LoadModel)]) == 2, 3,
                       "the new load")
        assert fake.requests[-1] == LoadModel(model=None, context=8192, decoding="medusa")


async def test_download_with_progress_then_load(hub):
    fake = FakeWorker()
    app = ChatApp(client=EngineClient(fake))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_picker(pilot, app)
        assert row_of(screen, SPARSE_BASE)[6] == "—"
        labels: list[str] = []
        original = screen._download_progress

        def spy(repo, p):
            original(repo, p)
            labels.append(str(screen.query_one("#download-label").content))
        screen._download_progress = spy
        await goto(pilot, screen, SPARSE_BASE)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen is not screen, 10, "the download and the load")
        assert fake.requests[-1] == LoadModel(model=SPARSE_BASE, context=8192)
        assert labels and "MB/s" in labels[-1] and "ETA" in labels[-1] and "of" in labels[-1]
        assert sum(s.body_bytes for s in hub.log) >= 20000


async def test_a_gated_model_says_how_to_get_access(hub):
    app = ChatApp(client=EngineClient(FakeWorker()))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_picker(pilot, app)
        await goto(pilot, screen, "meta-llama/Llama-3.1-8B-Instruct")
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: "gated" in str(screen.query_one("#detail").content)
                       and "hf auth login" in str(screen.query_one("#detail").content), 10, "the gated message")
        assert app.screen is screen
        await pilot.press("escape")
        assert app.screen is not screen


def _in_hf_cache(checkpoint: Path, cache: Path, repo_id: str) -> None:
    """``checkpoint`` as huggingface_hub lays out a downloaded repository in ``cache``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")


def _with_heads_and_delta(checkpoint: Path, out: Path) -> Path:
    """A copy of ``checkpoint`` with FasterDecoding Medusa heads (medusa_lm_head.safetensors, on the
    base lm_head) and a DMC retrofit delta of its own (dmc/delta.safetensors)."""
    import torch
    from safetensors.torch import save_file

    from engine.config import load_config
    from engine.formats.dmc_delta import delta_metadata
    from engine.hub.layout import LOCAL_DMC_DELTA

    shutil.copytree(checkpoint, out)
    cfg = load_config(out)
    h = cfg.hidden_size
    save_file({f"{k}.0.linear.{p}": torch.zeros(h, h) if p == "weight" else torch.zeros(h)
               for k in range(2) for p in ("weight", "bias")}, str(out / "medusa_lm_head.safetensors"))
    delta = {}
    for li in range(cfg.num_layers):
        delta[f"model.layers.{li}.self_attn.q_proj.decision_rows"] = torch.zeros(cfg.num_heads, h)
        delta[f"model.layers.{li}.self_attn.k_proj.decision_rows"] = torch.zeros(cfg.num_kv_heads, h)
    (out / LOCAL_DMC_DELTA).parent.mkdir()
    save_file(delta, str(out / LOCAL_DMC_DELTA), metadata=delta_metadata(cfg, out.name, 5.0, 12))
    return out


def test_the_decodings_offered_are_the_ones_the_loader_accepts(embedded_session, tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    """For the embedded model (shipped Medusa heads and DMC retrofit) and checkpoints in the
    Hugging Face cache (no heads, no delta: plain only; heads and a delta of their own: all), a
    decoding is offered exactly when Session.load accepts the picker's request for it."""
    from huggingface_hub import constants

    from engine.errors import EngineError
    from engine.events import DECODINGS
    from engine.hub.catalog import list_models
    from engine.session import Session

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _in_hf_cache(tiny_checkpoint, tmp_path / "hub", "someone/tiny-llama")
    _in_hf_cache(_with_heads_and_delta(tiny_checkpoint, tmp_path / "speculating"), tmp_path / "hub",
                 "someone/tiny-speculating")
    entries = {e.id: e for e in list_models()}
    for model_id, expected in (("SmolLM2-135M-Instruct", list(DECODINGS)), ("someone/tiny-llama", ["plain", "lookup"]),
                               ("someone/tiny-speculating", list(DECODINGS))):
        entry = entries[model_id]
        assert entry.downloaded
        choices = decodings(entry)
        assert choices == expected
        for decoding in DECODINGS:
            request = LoadModel(model=model_spec(entry), device="cpu", decoding=decoding, context=64)
            try:
                Session.load(request).close()
                accepted = True
            except EngineError:
                accepted = False
            assert (decoding in choices) == accepted, (model_id, decoding)
