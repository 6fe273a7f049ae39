"""The worker: one thread that owns the model and the device and runs requests in order.

Every exception becomes an ``Error`` event; nothing raised here reaches the front end."""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable

from .errors import EngineError
from .events import Done, Error, Event, Generate, LoadModel, Loaded, Progress
from .session import Session

Sink = Callable[[Event], None]


def describe(exc: BaseException) -> str:
    """One line for the user."""
    if isinstance(exc, EngineError):
        return str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory: {' '.join(str(exc).split())[:200]}"
    return f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


class Worker:
    def __init__(self):
        self.session: Session | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="chatapp-engine", daemon=True)
        self._thread.start()

    def submit(self, request: LoadModel | Generate, sink: Sink, cancel: threading.Event) -> None:
        self._jobs.put((request, sink, cancel))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, sink, cancel = job
            try:
                if isinstance(request, LoadModel):
                    self._load(request, sink)
                elif cancel.is_set():
                    sink(Error("cancelled before it started"))
                else:
                    self._generate(request, sink, cancel)
            except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
                if not isinstance(exc, EngineError):
                    traceback.print_exc()
                sink(Error(describe(exc)))
        if self.session is not None:
            self.session.close()

    def _load(self, request: LoadModel, sink: Sink) -> None:
        if self.session is not None:  # free the old model before loading the next one
            self.session.close()
            self.session = None
        self.session = Session.load(request, lambda msg: sink(Progress(msg)))
        sink(Loaded(self.session.info()))

    def _generate(self, request: Generate, sink: Sink, cancel: threading.Event) -> None:
        if self.session is None:
            raise EngineError("no model is loaded")
        for event in self.session.generate(request.messages, request.params, cancel):
            sink(event)
            if isinstance(event, Done):
                return
