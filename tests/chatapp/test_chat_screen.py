"""The chat screen driven through Textual's pilot: with the embedded model, and with scripted engines."""

from __future__ import annotations

import re
import threading
from argparse import Namespace

from chatapp.tui.app import ChatApp
from chatapp.tui.widgets import AssistantMessage, ErrorMessage, Note, UserMessage
from engine.serving.client import EngineClient
from engine.events import Generate
from fakes.engine import FakeWorker, wait_for

SIZE = (100, 30)


async def send(pilot, text: str) -> None:
    await pilot.press(*text, "enter")


def replies(app) -> list[AssistantMessage]:
    return list(app.query(AssistantMessage))


def errors(app) -> list[str]:
    return [str(w.content) for w in app.query(ErrorMessage)]


async def test_embedded_model_answers():
    app = ChatApp()
    async with app.run_test(size=SIZE) as pilot:
        assert app.state == "loading"
        assert app.prompt.disabled
        await wait_for(pilot, lambda: app.state != "loading", 120, "the model to load")
        assert app.state == "ready", errors(app)
        assert not app.prompt.disabled

        await send(pilot, "What is the capital of France?")
        await wait_for(pilot, lambda: app.state != "generating", 60, "the reply")
        assert app.state == "ready", errors(app)

        [reply] = replies(app)
        assert "Paris" in reply.source
        assert app.conversation == [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": reply.source},
        ]
        await wait_for(pilot, lambda: "ready" in app.status_bar.text, 2, "the status line")
        status = app.status_bar.text
        assert re.search(r"\d+\.\d tok/s", status), status
        assert re.search(r"\d+\.\d GiB / \d+\.\d GiB", status), status
        assert "SmolLM2-135M-Instruct" in status and "cpu" in status


async def test_escape_cancels_the_reply():
    loaded = threading.Event()
    fake = FakeWorker(load_gate=loaded)
    app = ChatApp(client=EngineClient(worker=fake))
    async with app.run_test(size=SIZE) as pilot:
        # nothing can be sent while the model loads
        assert app.state == "loading" and app.prompt.disabled
        await send(pilot, "too early")
        assert len(app.query(UserMessage)) == 0 and app.conversation == []
        loaded.set()
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await send(pilot, "Tell me a long story")
        await wait_for(pilot, lambda: replies(app) and replies(app)[0].source.count("word") >= 3, 5,
                       "some tokens")
        assert app.state == "generating" and app.prompt.disabled
        await wait_for(pilot, lambda: "generating" in app.status_bar.text, 2, "the status line")
        assert "20.0 tok/s" in app.status_bar.text and "1.5 GiB / 8.0 GiB" in app.status_bar.text

        await pilot.press("escape")
        await wait_for(pilot, lambda: app.state == "cancelled", 2, "the reply to stop")
        reply = replies(app)[0]
        partial = reply.source
        await pilot.pause(0.4)  # several token intervals: nothing more may arrive
        assert reply.source == partial
        assert partial.count("word") < fake.max_tokens
        assert [str(n.content) for n in app.query(Note)] == ["(cancelled)"]
        await wait_for(pilot, lambda: "cancelled" in app.status_bar.text, 2, "the status line")
        assert "19.5 tok/s" in app.status_bar.text  # the final figure from Done
        assert app.conversation == [{"role": "user", "content": "Tell me a long story"},
                                    {"role": "assistant", "content": partial}]

        # the next prompt goes out with the partial reply in the history
        assert not app.prompt.disabled
        await send(pilot, "Go on")
        await wait_for(pilot, lambda: len(replies(app)) == 2 and "word0" in replies(app)[1].source, 5,
                       "the second reply")
        assert fake.requests[-1] == Generate(messages=[
            {"role": "user", "content": "Tell me a long story"},
            {"role": "assistant", "content": partial},
            {"role": "user", "content": "Go on"},
        ])
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.state == "cancelled", 2, "the second reply to stop")
        assert len(app.query(Note)) == 2


async def test_long_reply_keeps_the_view_at_the_bottom():
    fake = FakeWorker(token="paragraph {}\n\n", max_tokens=60, interval=0.01)
    app = ChatApp(client=EngineClient(worker=fake))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await send(pilot, "Write many paragraphs")
        await wait_for(pilot, lambda: app.state == "ready", 10, "the reply")
        chat = app.chat
        await wait_for(pilot, lambda: chat.scroll_y == chat.max_scroll_y, 2, "the view to reach the bottom")
        assert chat.max_scroll_y > 60  # two lines a paragraph: far taller than the view
        assert "paragraph 59" in replies(app)[0].source


async def test_load_error_is_shown_and_input_stays_disabled():
    message = "/no/such/model: model folder not found"
    app = ChatApp(client=EngineClient(worker=FakeWorker(load_error=message)))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "error", 5, "the error")
        assert errors(app) == [message]
        await wait_for(pilot, lambda: message in app.status_bar.text, 2, "the status line")
        assert app.prompt.disabled
        await send(pilot, "hello")
        await pilot.press("escape")
        assert app.is_running and app.state == "error"
        assert len(app.query(UserMessage)) == 0 and app.conversation == []


async def test_generate_error_is_shown_and_input_works_again():
    message = "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    fake = FakeWorker(generate_error=message, max_tokens=5)
    app = ChatApp(client=EngineClient(worker=fake))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        await send(pilot, "first")
        await wait_for(pilot, lambda: app.state == "error", 5, "the error")
        assert errors(app) == [message]
        assert replies(app)[0].source == "word0 word1 word2 "  # the partial reply stays on screen
        await wait_for(pilot, lambda: message in app.status_bar.text, 2, "the status line")
        assert app.conversation == []  # the failed turn is not sent again
        assert not app.prompt.disabled

        await send(pilot, "second")
        await wait_for(pilot, lambda: app.state == "ready", 5, "the second reply")
        assert replies(app)[-1].source == "word0 word1 word2 word3 word4 "
        assert fake.requests[-1] == Generate(messages=[{"role": "user", "content": "second"}])
        assert app.conversation[-1] == {"role": "assistant", "content": "word0 word1 word2 word3 word4 "}


async def test_missing_model_folder_is_reported():
    app = ChatApp(Namespace(model="/nonexistent/model"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state != "loading", 30, "the load to fail")
        assert app.state == "error"
        [shown] = errors(app)
        assert "/nonexistent/model" in shown
        await wait_for(pilot, lambda: "/nonexistent/model" in app.status_bar.text, 2, "the status line")
        assert app.prompt.disabled and app.is_running


async def test_corrupt_checkpoint_is_reported(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    app = ChatApp(Namespace(model=str(tiny_checkpoint)))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state != "loading", 60, "the load to fail")
        assert app.state == "error"
        [shown] = errors(app)
        assert str(f) in shown and "not a valid safetensors file" in shown and "\n" not in shown
        assert app.is_running

