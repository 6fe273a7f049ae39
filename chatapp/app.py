"""The chat screen: a conversation with the local model, replies streamed in as Markdown."""

from __future__ import annotations

import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.widgets import Footer, Input, Markdown

from engine.client import EngineClient
from engine.embedded import EMBEDDED_ID
from engine.worker import ProcessWorker
from engine.events import Done, Error, Generate, Loaded, LoadModel, ModelInfo, Progress, Step, Token

from .widgets import AssistantMessage, ErrorMessage, Note, StatusBar, UserMessage

REPLY_FPS = 15
STATE_LABELS = {"loading": "loading…", "ready": "ready", "generating": "generating…",
                "cancelled": "cancelled", "error": "error"}


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def server_figures(stats) -> str:
    """A remote server's own figures, where it publishes them (vLLM's speculative decoding and
    KV-cache usage, chatapp serve's Medusa and DMC gauges)."""
    m = getattr(stats, "server_metrics", None) or {}
    parts = []
    if "accepted_per_step" in m:
        parts.append(f"{m['accepted_per_step']:.2f} tok/step")
    if "kv_cache_usage" in m:
        parts.append(f"KV {m['kv_cache_usage'] * 100:.0f}%")
    if "kv_compression" in m:
        parts.append(f"KV {m['kv_compression']:.1f}x smaller")
    return "".join(f"  ·  {p}" for p in parts)


class ChatApp(App):
    CSS_PATH = "chat.tcss"
    TITLE = "chatapp"
    BINDINGS = [
        Binding("escape", "cancel", "Stop reply"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    state: reactive[str] = reactive("loading", bindings=True, init=False)
    """loading, ready, generating, cancelled or error."""

    def __init__(self, model: str | None = None, device: str | None = None, quantize: str | None = None, *,
                 client: EngineClient | None = None):
        super().__init__()
        self.load_request = LoadModel(model, device, quantize=quantize)
        self.client = client or EngineClient(ProcessWorker())
        self.info: ModelInfo | None = None  # set once the model is loaded
        self.conversation: list[dict] = []  # [{"role": ..., "content": ...}], as sent to the engine
        self.error = ""  # the last error message

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="chat")
        yield Input(placeholder="Loading the model…", disabled=True, id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def chat(self) -> VerticalScroll:
        return self.query_one("#chat", VerticalScroll)

    @property
    def prompt(self) -> Input:
        return self.query_one("#prompt", Input)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    def on_mount(self) -> None:
        self.chat.anchor()
        self.status_bar.set(model=self.load_request.model or EMBEDDED_ID, state=STATE_LABELS["loading"])
        self.load_model()

    def on_unmount(self) -> None:
        self.client.close()

    def watch_state(self, state: str) -> None:
        label = f"error: {self.error}" if state == "error" else STATE_LABELS[state]
        self.status_bar.set(state=label)
        prompt = self.prompt
        prompt.disabled = self.info is None or state == "generating"
        if self.info is None:
            prompt.placeholder = "No model loaded" if state == "error" else "Loading the model…"
        else:
            prompt.placeholder = "Message (Enter to send)"
        if not prompt.disabled:
            prompt.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.state == "generating"
        return True

    def action_cancel(self) -> None:
        self.client.cancel()

    async def show_error(self, message: str) -> None:
        self.error = message
        await self.chat.mount(ErrorMessage(message))
        self.chat.anchor()
        self.state = "error"

    @work(group="engine")
    async def load_model(self) -> None:
        async for event in self.client.load(self.load_request):
            if isinstance(event, Progress):
                percent = f" {event.fraction:.0%}" if event.fraction is not None else ""
                self.status_bar.set(state=f"{event.message}{percent}")
            elif isinstance(event, Loaded):
                self.info = event.info
                device = event.info.device + (f" · {event.info.quantization}" if event.info.quantization else "")
                self.status_bar.set(model=event.info.name, device=device)
                self.state = "ready"
            elif isinstance(event, Error):
                await self.show_error(event.message)

    @on(Input.Submitted, "#prompt")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.info is None or self.state == "generating":
            return
        event.input.clear()
        self.conversation.append({"role": "user", "content": text})
        self.state = "generating"
        await self.chat.mount(UserMessage(text))
        self.reply()

    @work(group="engine")
    async def reply(self) -> None:
        reply = AssistantMessage()
        await self.chat.mount(reply)
        self.chat.anchor()
        stream = Markdown.get_stream(reply)
        received: list[str] = []
        pending: list[str] = []  # text not yet handed to the Markdown stream
        flushed_at = 0.0
        end: Done | Error | None = None
        try:
            async for event in self.client.generate(Generate(messages=list(self.conversation))):
                if isinstance(event, Token):
                    received.append(event.text)
                    pending.append(event.text)
                    # Re-render at most REPLY_FPS times a second: rendering competes with the
                    # engine for the CPU, and nobody reads faster than that.
                    if time.monotonic() - flushed_at >= 1 / REPLY_FPS:
                        await stream.write("".join(pending))
                        pending.clear()
                        flushed_at = time.monotonic()
                elif isinstance(event, Step):
                    # a remote engine reports no memory (vram_total 0): no memory field then
                    memory = f"{gib(event.vram_used)} / {gib(event.vram_total)}" if event.vram_total else ""
                    self.status_bar.set(speed=f"{event.tok_per_s:.1f} tok/s", memory=memory)
                elif isinstance(event, (Done, Error)):
                    end = event
        finally:
            if pending:
                await stream.write("".join(pending))
            await stream.stop()

        if isinstance(end, Done):
            self.status_bar.set(speed=f"{end.stats.decode_tokens_per_s:.1f} tok/s" + server_figures(end.stats))
            self.conversation.append({"role": "assistant", "content": "".join(received)})
            if end.reason == "cancelled":
                await self.chat.mount(Note("(cancelled)"))
                self.state = "cancelled"
            else:
                self.state = "ready"
        elif isinstance(end, Error):
            self.conversation.pop()  # the failed turn is left out of what is sent next
            if not received:
                await reply.remove()
            await self.show_error(end.message)
