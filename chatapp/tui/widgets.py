"""The widgets of the chat screen."""

from __future__ import annotations

import time

from rich.text import Text
from textual.timer import Timer
from textual.widgets import Markdown, Static

REPLY_FPS = 15  # how often a streaming reply is rendered, at most, a second
DRAFTED = "bold #9ad07a"  # the style of the characters that arrived as accepted drafts


class UserMessage(Static):
    """What the user typed, shown as plain text."""

    def __init__(self, text: str):
        super().__init__(text, markup=False)


class Drafted:
    """Which characters of a reply arrived as accepted drafts (speculative decoding: tokens a
    proposer drafted and the model verified), as [start, end) spans of its text, from the Token
    events' ``drafted_chars`` (the last characters of each step's text)."""

    def __init__(self, text: str = "", spans=()):
        self._parts = [text]
        self.length = len(text)
        self.spans: list[list[int]] = [[a, b] for a, b in spans if 0 <= a < b <= self.length]

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, text: str, drafted_chars: int) -> None:
        self._parts.append(text)
        self.length += len(text)
        if drafted_chars:
            start = self.length - min(drafted_chars, len(text))
            if self.spans and self.spans[-1][1] == start:
                self.spans[-1][1] = self.length
            else:
                self.spans.append([start, self.length])

    @property
    def share(self) -> float:
        """The share of the characters that arrived as accepted drafts."""
        return sum(b - a for a, b in self.spans) / self.length if self.length else 0.0

    def styled(self) -> Text:
        out = Text(self.text)
        for a, b in self.spans:
            out.stylize(DRAFTED, a, b)
        return out


class AssistantMessage(Markdown):
    """A reply of the model, streamed in as Markdown; ``drafted``: its accepted drafts, which a
    DraftView shows in place of the Markdown while the chat shows drafts."""

    def __init__(self, markdown: str = "", drafted: Drafted | None = None, **kwargs):
        super().__init__(markdown, **kwargs)
        self.drafted = drafted or Drafted(markdown)
        self.draft_view: DraftView | None = None


class DraftView(Static):
    """A reply as plain text with its accepted drafts in the DRAFTED style (F4 toggles it)."""

    def __init__(self, message: AssistantMessage):
        super().__init__("", markup=False)
        self.message = message

    def on_mount(self) -> None:
        self.show()

    def show(self) -> None:
        self.update(self.message.drafted.styled())


class ReplyStream:
    """Text streamed into a Markdown widget, rendered at most ``fps`` times a second: rendering
    competes with the engine for the CPU, and nobody reads faster than that. ``add`` the pieces
    as they come, ``flush`` when ``due``, and ``stop`` at the end (it renders what is left)."""

    def __init__(self, markdown: Markdown, fps: float = REPLY_FPS):
        self._stream = Markdown.get_stream(markdown)
        self._interval = 1 / fps
        self._pending: list[str] = []  # text not yet handed to the Markdown stream
        self._flushed_at = 0.0

    def add(self, text: str) -> None:
        self._pending.append(text)

    @property
    def due(self) -> bool:
        """Whether the last render is 1/fps seconds ago or more."""
        return time.monotonic() - self._flushed_at >= self._interval

    async def flush(self) -> bool:
        """Render the text added since the last flush; whether there was any."""
        self._flushed_at = time.monotonic()
        if not self._pending:
            return False
        text = "".join(self._pending)
        self._pending.clear()
        await self._stream.write(text)
        return True

    async def stop(self) -> None:
        await self.flush()
        await self._stream.stop()


class ErrorMessage(Static):
    """An engine error, shown in the conversation."""

    def __init__(self, message: str):
        super().__init__(message, markup=False)
        self.border_title = "error"


class Note(Static):
    """A dim remark under a message, such as "(cancelled)"."""


class StatusBar(Static):
    """One line: model, device, speed, memory in use and state, repainted at most ~10 times a second."""

    INTERVAL = 0.1
    FIELDS = ("model", "device", "speed", "memory", "state")

    def __init__(self, **kwargs):
        super().__init__("", markup=False, **kwargs)
        self.fields = dict.fromkeys(self.FIELDS, "")
        self._timer: Timer | None = None
        self._painted_at = 0.0

    @property
    def text(self) -> str:
        """The line as last painted."""
        return str(self.content)

    def set(self, **fields: str) -> None:
        """Change some fields; the line is repainted at the next free slot."""
        self.fields.update(fields)
        if self._timer is None:
            wait = self._painted_at + self.INTERVAL - time.monotonic()
            if wait > 0:
                self._timer = self.set_timer(wait, self._paint)
            else:
                self._paint()

    def _paint(self) -> None:
        self._timer = None
        self._painted_at = time.monotonic()
        self.update("  ·  ".join(value for value in self.fields.values() if value))
