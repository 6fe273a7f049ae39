"""A scripted engine for the UI tests: the same interface as engine.worker.Worker, no model."""

from __future__ import annotations

import threading
import time

import pytest

from engine.events import Done, Error, GenerationStats, Loaded, LoadModel, ModelInfo, Step, Token

INFO = ModelInfo(name="fake-model", path="/fake", device="cpu", dtype="float32", n_params=1000,
                 weight_bytes=4000, context=2048)


class FakeWorker:
    """Same interface as engine.worker.Worker, with scripted events: Loaded (or an error) on LoadModel;
    on Generate a token every ``interval`` seconds until cancelled or ``max_tokens`` are out."""

    def __init__(self, load_error: str | None = None, generate_error: str | None = None,
                 max_tokens: int = 400, interval: float = 0.05, load_gate: threading.Event | None = None,
                 token: str = "word{} "):
        self.load_error = load_error
        self.load_gate = load_gate  # loading waits for it when given
        self.generate_error = generate_error  # sent after three tokens, by the first Generate only
        self.max_tokens = max_tokens
        self.interval = interval
        self.token = token  # the text of token n
        self.requests: list = []
        self._threads: list[threading.Thread] = []

    def make_cancel(self) -> threading.Event:
        return threading.Event()

    def submit(self, request, sink, cancel: threading.Event) -> None:
        self.requests.append(request)
        t = threading.Thread(target=self._run, args=(request, sink, cancel), daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def _run(self, request, sink, cancel: threading.Event) -> None:
        if isinstance(request, LoadModel):
            if self.load_gate is not None:
                self.load_gate.wait(timeout=10)
            sink(Error(self.load_error) if self.load_error else Loaded(INFO))
            return
        words: list[str] = []
        while not cancel.is_set() and len(words) < self.max_tokens:
            if self.generate_error and len(words) == 3:
                message, self.generate_error = self.generate_error, None
                sink(Error(message))
                return
            time.sleep(self.interval)
            words.append(self.token.format(len(words)))
            sink(Token(words[-1], [len(words)], 1))
            sink(Step(1, 20.0, 3 * 2**29, 8 * 2**30, 1024))
        stats = GenerationStats(
            text="".join(words), token_ids=list(range(len(words))), n_prompt_tokens=5, n_generated=len(words),
            time_to_first_token_s=0.05, decode_tokens_per_s=19.5, steps=len(words),
            accepted_per_step=[1] * len(words), peak_memory_bytes=2**30, device="cpu", model="fake-model",
            decoding="plain")
        sink(Done("cancelled" if cancel.is_set() else "length", stats))


async def wait_for(pilot, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.1)
