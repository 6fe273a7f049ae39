"""A scripted engine for the UI tests: the same interface as engine.serving.worker.Worker, no model."""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib

import pytest

from engine.decoding.base import Accepted
from engine.decoding.speculative.counters import Counters
from engine.events import Done, Error, GenerationStats, Loaded, LoadModel, ModelInfo, Step, Token

INFO = ModelInfo(name="fake-model", path="/fake", device="cpu", dtype="float32", n_params=1000,
                 weight_bytes=4000, context=2048)


class FakeWorker:
    """Same interface as engine.serving.worker.Worker, with scripted events: Loaded (or an error) on LoadModel;
    on Generate ``accepted`` tokens every ``interval`` seconds until cancelled or ``max_tokens`` (or the
    request's max_new_tokens) are out.

    ``per_decoding`` scripts set-ups apart (compare mode): {"medusa": {"accepted": 3, ...}} overrides
    these settings for a LoadModel with that decoding and the Generates after it. Keys: load_error,
    generate_error (sent after three tokens, every time), max_tokens, interval, token, accepted,
    decode_tokens_per_s, load_gate, kv_compression (a plain cache's bytes over the cache's: DMC's),
    proposer (with accepted > 1: the tokens after a step's first are that proposer's accepted drafts,
    from a draft of ``accepted`` tokens)."""

    def __init__(self, load_error: str | None = None, generate_error: str | None = None,
                 max_tokens: int = 400, interval: float = 0.05, load_gate: threading.Event | None = None,
                 token: str = "word{} ", accepted: int = 1, decode_tokens_per_s: float = 19.5,
                 per_decoding: dict[str, dict] | None = None, kv_compression: float = 1.0,
                 proposer: str | None = None):
        self.load_error = load_error
        self.kv_compression = kv_compression
        self.proposer = proposer
        self.load_gate = load_gate  # loading waits for it when given
        self.generate_error = generate_error  # sent after three tokens, by the first Generate only
        self.max_tokens = max_tokens
        self.interval = interval
        self.token = token  # the text of token n
        self.accepted = accepted  # tokens per step
        self.decode_tokens_per_s = decode_tokens_per_s  # the rate Done reports
        self.per_decoding = per_decoding or {}
        self.decoding = "plain"  # of the last LoadModel submitted
        self.requests: list = []
        self._threads: list[threading.Thread] = []

    def make_cancel(self) -> threading.Event:
        return threading.Event()

    def submit(self, request, sink, cancel: threading.Event) -> None:
        self.requests.append(request)
        if isinstance(request, LoadModel):
            self.decoding = request.decoding
        script = self.per_decoding.get(self.decoding, {})
        t = threading.Thread(target=self._run, args=(request, sink, cancel, script, self.decoding), daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def _run(self, request, sink, cancel: threading.Event, script: dict, decoding: str) -> None:
        def setting(name):
            return script.get(name, getattr(self, name))

        if isinstance(request, LoadModel):
            gate = setting("load_gate")
            if gate is not None:
                gate.wait(timeout=10)
            error = setting("load_error")
            sink(Error(error) if error else Loaded(dataclasses.replace(INFO, decoding=decoding)))
            return
        words: list[str] = []
        ids: list[int] = []
        accepted: list[int] = []
        max_tokens, token, k = setting("max_tokens"), setting("token"), setting("accepted")
        proposer, counters = setting("proposer"), Counters()
        if getattr(request, "params", None) is not None:
            max_tokens = min(max_tokens, request.params.max_new_tokens)
        while not cancel.is_set() and len(words) < max_tokens:
            if len(words) >= 3:
                if "generate_error" in script:
                    sink(Error(script["generate_error"]))
                    return
                if self.generate_error:
                    message, self.generate_error = self.generate_error, None
                    sink(Error(message))
                    return
            time.sleep(setting("interval"))
            new = [token.format(len(words) + i) for i in range(min(k, max_tokens - len(words)))]
            new_ids = [zlib.crc32(w.encode()) for w in new]
            words += new
            ids += new_ids
            accepted.append(len(new))
            by = [""] + [proposer or ""] * (len(new) - 1)
            if proposer and k > 1:
                counters.add(Accepted(new_ids, by, draft_nodes=k - 1, draft_depth=k - 1))
            sink(Token("".join(new), new_ids, len(new), sum(len(w) for w, b in zip(new, by) if b), by))
            sink(Step(len(new), 20.0, 3 * 2**29, 8 * 2**30, 1024 * len(words),
                      int(1024 * len(words) * setting("kv_compression"))))
        stats = GenerationStats(
            text="".join(words), token_ids=ids, n_prompt_tokens=5, n_generated=len(words),
            time_to_first_token_s=0.05, decode_tokens_per_s=setting("decode_tokens_per_s"), steps=len(accepted),
            accepted_per_step=accepted, peak_memory_bytes=2**30, device="cpu", model="fake-model",
            decoding=decoding, kv_cache_bytes=1024 * len(words),
            kv_cache_bytes_dense=int(1024 * len(words) * setting("kv_compression")),
            kv_compression=setting("kv_compression"), speculation=counters.to_dict() if counters.drafts else None)
        sink(Done("cancelled" if cancel.is_set() else "length", stats))


async def wait_for(pilot, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.1)


async def send(pilot, text: str) -> None:
    """Type a message into the chat screen's prompt and send it."""
    await pilot.click("#prompt")
    await pilot.press(*text, "enter")


async def ask(pilot, text: str) -> None:
    """Send the first message of a conversation and wait for the whole reply."""
    app = pilot.app
    await send(pilot, text)
    await wait_for(pilot, lambda: app.state == "ready" and len(app.conversation) == 2, 5, "the reply")
