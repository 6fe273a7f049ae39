"""The chat screen's flows with a scripted engine: history across restarts, regenerate, chat settings,
export, the stats panel, the command palette."""

from __future__ import annotations

from textual.command import CommandList

from chatapp.tui.app import ChatApp
from chatapp.store.history import History
from chatapp.tui.widgets import AssistantMessage, Note, UserMessage
from engine.serving.client import EngineClient
from engine.events import Generate, SamplingParams
from fakes.engine import FakeWorker, ask, send, wait_for

SIZE = (140, 36)


def new_app(**fake) -> tuple[ChatApp, FakeWorker]:
    worker = FakeWorker(**fake)
    return ChatApp(client=EngineClient(worker=worker)), worker


async def test_a_conversation_is_kept_and_continues_after_a_restart():
    app, _ = new_app(max_tokens=4, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await send(pilot, "What is the capital of France?")
        await wait_for(pilot, lambda: app.state == "ready" and app.conversation[-1]["role"] == "assistant", 5,
                       "the reply")
        assert [o.prompt for o in app.sidebar.options] == ["What is the capital of France?"]

    history = History()
    [chat] = history.chats()
    assert chat.title == "What is the capital of France?"
    messages = history.messages(chat.id)
    assert [(m.role, m.content, m.complete) for m in messages] == [
        ("user", "What is the capital of France?", True), ("assistant", "word0 word1 word2 word3 ", True)]
    assert messages[1].stats["tokens"] == 4 and messages[1].stats["reason"] == "length"
    history.close()

    app, worker = new_app(max_tokens=2, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        assert not app.query(UserMessage)  # a new chat until one is picked
        app.sidebar.focus()
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: len(app.query(AssistantMessage)) == 1, 2, "the saved chat to open")
        assert app.query_one(AssistantMessage).source == "word0 word1 word2 word3 "
        await send(pilot, "And of Italy?")
        await wait_for(pilot, lambda: app.state == "ready" and len(app.conversation) == 4, 5, "the reply")
        assert worker.requests[-1].messages == [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "word0 word1 word2 word3 "},
            {"role": "user", "content": "And of Italy?"},
        ]
    history = History()
    assert len(history.chats()) == 1 and len(history.messages(chat.id)) == 4


async def test_a_cancelled_reply_is_kept_and_marked():
    app, _ = new_app(max_tokens=400, interval=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await send(pilot, "Tell me a long story")
        await wait_for(pilot, lambda: app.query(AssistantMessage) and "word3" in app.query_one(
            AssistantMessage).source, 5, "some of the reply")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.state == "cancelled", 3, "the reply to stop")
    history = History()
    [chat] = history.chats()
    reply = history.messages(chat.id)[-1]
    assert not reply.complete and reply.content.startswith("word0 word1 word2 word3")
    assert reply.stats["reason"] == "cancelled"

    app, _ = new_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await app.open_chat(chat.id)
        await pilot.pause()
        assert [str(n.content) for n in app.query(Note)] == ["(cancelled)"]


async def test_regenerate_replaces_the_last_reply():
    app, worker = new_app(max_tokens=3, interval=0.01, token="try{} ")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await ask(pilot, "Say something")
        worker.token = "again{} "
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.state == "ready" and "again0" in app.conversation[-1]["content"], 5,
                       "the new reply")
        assert [r.source for r in app.query(AssistantMessage)] == ["again0 again1 again2 "]
        assert worker.requests[-1].messages == [{"role": "user", "content": "Say something"}]
    history = History()
    [chat] = history.chats()
    assert [m.content for m in history.messages(chat.id)] == ["Say something", "again0 again1 again2 "]


async def test_chat_settings_set_the_system_prompt_and_sampling():
    app, worker = new_app(max_tokens=2, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await pilot.press("f3")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#system").text = "You are terse."
        dialog.query_one("#temperature").value = "hot"
        await pilot.click("#save")
        assert app.screen is dialog  # refused, with the reason
        assert "temperature: expected a number" in str(dialog.query_one("#problem").content)
        dialog.query_one("#temperature").value = "0.7"
        dialog.query_one("#seed").value = "5"
        await pilot.pause(0.3)  # a button ignores clicks for 0.2 s after a press
        await pilot.click("#save")
        await pilot.pause()
        assert app.screen is not dialog
        await ask(pilot, "Hi")
        assert worker.requests[-1] == Generate(
            messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
            params=SamplingParams(temperature=0.7, seed=5))


async def test_cancelled_chat_settings_save_no_chat():
    app, _ = new_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert app.chat_record is None
    assert History().chats() == []


async def test_a_bad_settings_file_falls_back_to_the_defaults():
    from chatapp.store.settings import default_path

    path = default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[ui]\ntheme = "no-such-theme"\n')
    app, _ = new_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        assert app.theme == "textual-dark"
        assert "[ui] theme" in app.settings_error and str(path) in app.settings_error


async def test_export_writes_markdown(tmp_path, monkeypatch):
    """A new private file in the data folder's exports/ each time; a symlink planted where the
    file goes is neither followed nor replaced."""
    import os
    import re

    from engine.paths import data_dir

    exports = data_dir() / "exports"
    exports.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    app, _ = new_app(max_tokens=2, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await ask(pilot, "Hello there")
        chat = app.chat_record
        stem = f"chat-{chat.id}-{re.sub(r'[^A-Za-z0-9]+', '-', chat.title).strip('-').lower()}"
        (exports / f"{stem}.md").symlink_to(target)
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
    assert target.read_text() == "mine"
    exported = sorted(p for p in exports.glob("chat-*.md") if not p.is_symlink())
    assert [p.name for p in exported] == [f"{stem}-2.md", f"{stem}-3.md"]
    for p in exported:
        text = p.read_text()
        assert "Hello there" in text and "word0 word1" in text and os.stat(p).st_mode & 0o777 == 0o600


async def test_stats_panel_shows_the_reply_figures():
    app, _ = new_app(max_tokens=6, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        assert "decoding    plain" in app.stats.text
        await ask(pilot, "Hi")
        await wait_for(pilot, lambda: "19.5 tok/s" in app.stats.text, 2, "the final figures")
        text = app.stats.text
        assert "first token 0.05 s" in text and "tokens/step 1.00" in text and "peak        1.0 GiB" in text
        assert "1.5 GiB / 8.0 GiB" in text  # the memory bar's figures, from the Step events
        await pilot.press("ctrl+g")
        assert not app.stats.display


async def test_stats_panel_shows_tokens_per_step_and_kv_compression_side_by_side():
    """Medusa over a DMC cache: the panel shows the set-up, the accepted tokens per step and the
    KV cache's compression, live and at the end of the reply."""
    from engine.events import LoadModel

    app, _ = new_app(max_tokens=12, interval=0.4, accepted=3, kv_compression=2.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        app.switch_model(LoadModel(decoding="medusa+dmc"))
        await wait_for(pilot, lambda: "decoding    medusa+dmc" in app.stats.text, 5, "the set-up")
        await send(pilot, "Hi")
        await wait_for(pilot, lambda: "smaller than" in app.stats.text, 3, "the live figures")
        live = app.stats.text
        assert "tokens/step 3.00 mean of last" in live and "2.5x smaller than" in live
        await wait_for(pilot, lambda: "19.5 tok/s" in app.stats.text, 5, "the final figures")
        text = app.stats.text
        assert "tokens/step 3.00 mean over 4 steps" in text and "KV cache    12.0 KiB (2.5x smaller)" in text


async def test_new_chat_and_the_command_palette():
    app, _ = new_app(max_tokens=2, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await ask(pilot, "First chat")
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not app.query(UserMessage) and app.conversation == []
        await ask(pilot, "Second chat")
        assert [o.prompt for o in app.sidebar.options] == ["Second chat", "First chat"]

        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"export")
        await wait_for(pilot, lambda: any("Export to Markdown" in str(o.prompt)
                                          for o in app.screen.query_one(CommandList).options), 3, "the command")


async def test_a_bad_setting_loses_nothing_when_settings_are_saved():
    """One bad value in settings.toml: the chat uses the others (the system prompt, the remote
    servers), says which value it left out, and a save (Ctrl+G) keeps every other key in the file
    and the user's file whole beside it."""
    from engine.paths import config_dir

    from chatapp.store.settings import load_settings

    path = config_dir() / "settings.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ('[model]\ncontext = "big"\n\n[chat]\nsystem_prompt = "Answer like a pirate."\n\n'
            '[[remote]]\nname = "lab"\nurl = "http://gpu-box:8000/v1"\n')
    path.write_text(text)
    app, _ = new_app(max_tokens=2, interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        assert app.settings.chat.system_prompt == "Answer like a pirate." and app.settings.remote[0].name == "lab"
        said = [n.message for n in app._notifications]
        assert any("[model] context" in m and "left at the default" in m for m in said), said
        await pilot.press("ctrl+g")  # hide the stats panel: a save
        await wait_for(pilot, lambda: not load_settings(path).ui.show_stats, 5, "the save")
        said = [n.message for n in app._notifications]
        assert any("kept as" in m and "settings.toml.bad" in m for m in said), said
    saved = load_settings(path)
    assert saved.chat.system_prompt == "Answer like a pirate." and [r.name for r in saved.remote] == ["lab"]
    assert saved.ui.show_stats is False and saved.model.context is None
    assert path.with_name("settings.toml.bad").read_text() == text
