"""Snapshot tests of the main screens at a fixed size (pytest-textual-snapshot): the chat with a reply
and its stats, the model picker, the chat settings dialog. Update after a reviewed change with
``pytest tests/test_snapshots.py --snapshot-update``."""

from __future__ import annotations

import pytest

from chatapp.tui.app import ChatApp
from chatapp.tui.picker import PickerScreen
from engine.hub.catalog import DeviceMemory
from engine.serving.client import EngineClient
from fakes.engine import FakeWorker, ask, wait_for

SIZE = (140, 36)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


async def steady(pilot) -> None:
    """No blinking cursors: a snapshot must not depend on when it is taken."""
    app = pilot.app
    await wait_for(pilot, lambda: app.focused is not None and app.focused.screen is app.screen, 5,
                   "the focus to settle on the screen shown")
    await pilot.pause(0.2)
    widgets = list(pilot.app.screen.query("Input, TextArea"))
    for widget in widgets:
        widget.cursor_blink = False
    await pilot.pause(0.2)
    # a blink tick queued before the blinking stopped may still have hidden a focused cursor:
    # with blinking off nothing toggles it any more, so showing it now is final
    for widget in widgets:
        if widget.has_focus and not widget._cursor_visible:
            widget._cursor_visible = True
        # a TextArea's line cache does not key on the blink setting: a line cached in a blink's
        # off phase would be drawn again without its cursor
        widget.notify_style_update()
        widget.refresh()
    await pilot.pause(0.1)
    assert all(w._cursor_visible for w in widgets if w.has_focus), "a focused cursor is hidden"


def chat_app() -> ChatApp:
    return ChatApp(client=EngineClient(FakeWorker(max_tokens=12, interval=0.005, token="word{} ")))


async def answered(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
    await ask(pilot, "What is the capital of France?")
    await wait_for(pilot, lambda: "19.5 tok/s" in app.stats.text, 2, "the stats")
    await steady(pilot)


def test_chat_screen(snap_compare):
    assert snap_compare(chat_app(), terminal_size=SIZE, run_before=answered)


def test_model_picker(snap_compare, empty_hf_cache):
    async def open_picker(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        screen = PickerScreen(app.settings, app.load_request, online=False,
                              device=DeviceMemory("NVIDIA H100 80GB HBM3", 79 * 2**30, 80 * 2**30))
        app.push_screen(screen)
        await wait_for(pilot, lambda: screen.is_mounted and screen.table.row_count > 5, 5, "the rows")
        await steady(pilot)

    assert snap_compare(chat_app(), terminal_size=SIZE, run_before=open_picker)


def test_chat_settings_dialog(snap_compare):
    async def open_dialog(pilot) -> None:
        await wait_for(pilot, lambda: pilot.app.state == "ready", 5, "the model to load")
        await pilot.press("f3")
        await pilot.pause(0.3)
        await steady(pilot)

    assert snap_compare(chat_app(), terminal_size=SIZE, run_before=open_dialog)


def test_accepted_drafts_highlighted(snap_compare):
    """F4: the reply as plain text with the tokens that arrived as accepted drafts (here the second and
    third of each step) in their own style; the stats panel's share drafted and acceptance by position."""
    worker = FakeWorker(max_tokens=12, interval=0.005, token="word{} ", accepted=3, proposer="lookup")

    async def drafts_shown(pilot) -> None:
        await answered(pilot)
        await pilot.press("f4")
        await wait_for(pilot, lambda: pilot.app.query("DraftView"), 2, "the drafts view")
        await steady(pilot)

    assert snap_compare(ChatApp(client=EngineClient(worker)), terminal_size=SIZE, run_before=drafts_shown)
