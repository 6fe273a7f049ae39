"""The front end's view of the engine: send a request, iterate its events with ``async for``.

    client = EngineClient()
    async for ev in client.load(LoadModel()): ...
    async for ev in client.generate(Generate(messages)): ...   # client.cancel() from elsewhere
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.events import Done, Error, Event, Generate, LoadModel, Loaded
from engine.serving.worker import ProcessWorker, Worker

_FINAL = (Done, Error, Loaded)


class EngineClient:
    def __init__(self, worker: Worker | ProcessWorker | None = None):
        self._worker = worker or Worker()
        self._cancels: set = set()

    async def _events(self, request) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = self._worker.make_cancel()
        self._cancels.add(cancel)

        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ev)

        self._worker.submit(request, sink, cancel)
        try:
            while True:
                ev = await q.get()
                yield ev
                if isinstance(ev, _FINAL):
                    return
        finally:
            # a consumer that stops early (or is cancelled) also stops the work
            cancel.set()
            self._cancels.discard(cancel)

    def load(self, request: LoadModel) -> AsyncIterator[Event]:
        return self._events(request)

    def generate(self, request: Generate) -> AsyncIterator[Event]:
        return self._events(request)

    def cancel(self) -> None:
        """Stop the running and queued generations; each ends within one decoding step."""
        for c in list(self._cancels):
            c.set()

    def close(self) -> None:
        self.cancel()
        self._worker.stop()
