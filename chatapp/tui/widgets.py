"""The widgets of the chat screen."""

from __future__ import annotations

import time

from textual.timer import Timer
from textual.widgets import Markdown, Static


class UserMessage(Static):
    """What the user typed, shown as plain text."""

    def __init__(self, text: str):
        super().__init__(text, markup=False)


class AssistantMessage(Markdown):
    """A reply of the model, streamed in as Markdown."""


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
