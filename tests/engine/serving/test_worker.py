"""The worker and its asyncio client: streaming, cancel within a step, errors as events."""

import asyncio
import time

from engine.serving.client import EngineClient
from engine.events import Done, Error, Generate, LoadModel, Loaded, SamplingParams, Step, Token


async def collect(aiter):
    return [ev async for ev in aiter]


async def test_load_stream_and_done(tiny_checkpoint):
    client = EngineClient()
    try:
        events = await collect(client.load(LoadModel(model=str(tiny_checkpoint), device="cpu")))
        assert isinstance(events[-1], Loaded) and events[-1].info.device == "cpu"
        events = await collect(client.generate(Generate([{"role": "user", "content": "hi"}],
                                                        SamplingParams(max_new_tokens=12, ignore_eos=True))))
        tokens = [e for e in events if isinstance(e, Token)]
        steps = [e for e in events if isinstance(e, Step)]
        done = events[-1]
        assert isinstance(done, Done) and done.reason == "length"
        assert len(tokens) == len(steps) == 12 == done.stats.n_generated
        assert "".join(t.text for t in tokens) == done.stats.text
        assert steps[-1].vram_total > steps[-1].vram_used > 0 and steps[-1].kv_bytes > 0
    finally:
        client.close()


async def test_cancel_stops_within_a_step(embedded_session):
    from engine.serving.worker import Worker

    worker = Worker()
    worker.session = embedded_session  # already loaded
    client = EngineClient(worker)
    try:
        seen = 0
        t_cancel = None
        async for ev in client.generate(Generate([{"role": "user", "content": "Write a long essay about rivers."}],
                                                 SamplingParams(max_new_tokens=400, ignore_eos=True))):
            if isinstance(ev, Token):
                seen += 1
                if seen == 5:
                    client.cancel()
                    t_cancel = time.perf_counter()
            if isinstance(ev, Done):
                assert ev.reason == "cancelled"
                # at most the step in flight (and its already-queued events) after the cancel
                assert ev.stats.n_generated <= 7
                assert time.perf_counter() - t_cancel < 2.0
        # the engine still answers afterwards
        events = await collect(client.generate(Generate([{"role": "user", "content": "Hi"}],
                                                        SamplingParams(max_new_tokens=3))))
        assert isinstance(events[-1], Done) and events[-1].reason in ("eos", "length")
    finally:
        worker.session = None  # detach the shared session before stopping the thread
        worker.stop()


async def test_engine_exceptions_become_error_events(tiny_checkpoint, monkeypatch):
    client = EngineClient()
    try:
        events = await collect(client.load(LoadModel(model="/no/such/model", device="cpu")))
        assert isinstance(events[-1], Error) and "/no/such/model" in events[-1].message
        events = await collect(client.generate(Generate([{"role": "user", "content": "hi"}])))
        assert isinstance(events[-1], Error) and "no model is loaded" in events[-1].message

        await collect(client.load(LoadModel(model=str(tiny_checkpoint), device="cpu")))
        session = client._worker.session

        def boom(*a, **k):
            raise RuntimeError("simulated failure in the forward pass")

        monkeypatch.setattr(session.model, "forward", boom)
        events = await collect(client.generate(Generate([{"role": "user", "content": "hi"}])))
        assert isinstance(events[-1], Error)
        assert "simulated failure" in events[-1].message and "\n" not in events[-1].message
        monkeypatch.undo()
        events = await collect(client.generate(Generate([{"role": "user", "content": "hi"}],
                                                        SamplingParams(max_new_tokens=2))))
        assert isinstance(events[-1], Done)
    finally:
        client.close()


async def test_event_loop_stays_responsive_during_generation(embedded_session):
    from engine.serving.worker import Worker

    worker = Worker()
    worker.session = embedded_session
    client = EngineClient(worker)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    t = time.perf_counter()
    await collect(client.generate(Generate([{"role": "user", "content": "Count to ten."}],
                                           SamplingParams(max_new_tokens=20, ignore_eos=True))))
    elapsed = time.perf_counter() - t
    task.cancel()
    worker.session = None
    worker.stop()
    assert ticks > 0.3 * elapsed / 0.01  # the loop kept ticking while the worker decoded


async def test_process_worker_streams_cancels_and_survives_a_crash(tiny_checkpoint):
    import os
    import signal

    from engine.serving.worker import ProcessWorker

    worker = ProcessWorker()
    client = EngineClient(worker)
    try:
        events = await collect(client.load(LoadModel(model=str(tiny_checkpoint), device="cpu")))
        assert isinstance(events[-1], Loaded), events[-1]
        events = await collect(client.generate(Generate([{"role": "user", "content": "hi"}],
                                                        SamplingParams(max_new_tokens=6, ignore_eos=True))))
        assert isinstance(events[-1], Done) and events[-1].stats.n_generated == 6
        assert sum(isinstance(e, Token) for e in events) == 6

        # cancel crosses the process boundary
        n = 0
        async for ev in client.generate(Generate([{"role": "user", "content": "hi"}],
                                                 SamplingParams(max_new_tokens=5000, ignore_eos=True))):
            if isinstance(ev, Token):
                n += 1
                if n == 3:
                    client.cancel()
            if isinstance(ev, Done):
                assert ev.reason == "cancelled" and ev.stats.n_generated < 100

        # the engine process dies mid-reply: the UI side gets an Error, the next request works again
        got = []
        async for ev in client.generate(Generate([{"role": "user", "content": "hi"}],
                                                 SamplingParams(max_new_tokens=100000, ignore_eos=True))):
            got.append(ev)
            if len(got) == 4:
                os.kill(worker._proc.pid, signal.SIGKILL)
        assert isinstance(got[-1], Error) and "engine process stopped" in got[-1].message
        events = await collect(client.load(LoadModel(model=str(tiny_checkpoint), device="cpu")))
        assert isinstance(events[-1], Loaded)
    finally:
        client.close()
