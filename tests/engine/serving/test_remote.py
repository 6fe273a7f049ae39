"""chatapp as a client of a remote OpenAI-compatible server (engine/serving/remote.py): against our own
`chatapp serve` app in this process (same text as the local engine), and a fake server for the
failures (refused key, busy, errors, an error mid-stream, nothing listening)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from engine.serving.client import EngineClient
from engine.errors import EngineError
from engine.events import Done, Error, Generate, LoadModel, Loaded, SamplingParams, Token
from engine.serving.remote import RemoteSession, RemoteWorker
from fakes.serve import KEY, QUESTION, LiveServer, greedy, metric

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server(embedded_session):
    s = LiveServer(embedded_session, api_key=KEY)
    yield s
    s.close()


def run(session, messages, params, cancel=None):
    events = list(session.generate(messages, params, cancel))
    assert isinstance(events[-1], Done)
    return events


def test_remote_session_gives_the_local_engine_text(server, embedded_session):
    reason, local = greedy(embedded_session, QUESTION, 24)
    remote = RemoteSession.connect(server.url + "/v1", KEY)
    assert remote.name == embedded_session.name  # the server's first (only) model
    assert remote.info().device == "remote" and remote.info().context == embedded_session.context
    events = run(remote, QUESTION, SamplingParams(max_new_tokens=24))
    done = events[-1]
    assert done.reason == reason == "eos"
    assert done.stats.text == local.text == "".join(e.text for e in events if isinstance(e, Token))
    assert done.stats.n_generated == local.n_generated and done.stats.n_prompt_tokens == local.n_prompt_tokens
    assert run(remote, QUESTION, SamplingParams(max_new_tokens=3))[-1].reason == "length"


def test_remote_cancel_stops_the_server_side_generation(server, embedded_session):
    remote = RemoteSession.connect(server.url + "/v1", KEY, embedded_session.name)
    before = metric(server.get("/metrics")[2], "chatapp_generations_cancelled_total")
    cancel = threading.Event()
    tokens = 0
    for ev in remote.generate(QUESTION, SamplingParams(max_new_tokens=200, ignore_eos=True), cancel):
        if isinstance(ev, Token):
            tokens += 1
            if tokens == 2:
                cancel.set()
        elif isinstance(ev, Done):
            assert ev.reason == "cancelled" and tokens == 2
    deadline = time.monotonic() + 10
    while metric(server.get("/metrics")[2], "chatapp_generations_cancelled_total") == before:
        assert time.monotonic() < deadline, "the server kept generating"
        time.sleep(0.1)


async def test_remote_worker_through_the_engine_client(server, embedded_session):
    _, local = greedy(embedded_session, QUESTION, 8)
    client = EngineClient(RemoteWorker(server.url + "/v1", KEY))
    try:
        loaded = [ev async for ev in client.load(LoadModel(embedded_session.name))]
        assert isinstance(loaded[-1], Loaded) and loaded[-1].info.name == embedded_session.name
        events = [ev async for ev in client.generate(Generate(QUESTION, SamplingParams(max_new_tokens=8)))]
        assert isinstance(events[-1], Done) and events[-1].stats.text == local.text
        bad = [ev async for ev in client.load(LoadModel("no-such-model"))]
        assert isinstance(bad[-1], Error) and "no model 'no-such-model'" in bad[-1].message
    finally:
        client.close()


@pytest.mark.slow
def test_cli_run_remote(server, embedded_session):
    _, local = greedy(embedded_session, QUESTION, 6)

    def chatapp(*args, key=KEY):
        env = {**os.environ, "CHATAPP_REMOTE_API_KEY": key}
        return subprocess.run([sys.executable, "-m", "chatapp", "run", "--remote", server.url + "/v1", *args],
                              capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)

    r = chatapp("--prompt", QUESTION[0]["content"], "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == local.text and out["device"] == "remote" and out["n_generated"] == 6
    r = chatapp("--prompt", "hi", key="wrong-key")
    assert r.returncode == 1 and "refused the API key" in r.stderr and "wrong-key" not in r.stderr
    r = chatapp("--prompt", "hi", "--device", "cpu")
    assert r.returncode == 1 and "--device apply to the local engine" in r.stderr


# ---- failures, from a fake server ----------------------------------------------------------------
class FakeServer:
    """An OpenAI-like server whose chat endpoint answers what the test sets in ``mode``."""

    def __init__(self):
        self.mode = "ok"
        self.drafts = 0  # vLLM-style speculative-decoding counters, advanced by each chat request
        app = Starlette(routes=[Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat,
                                                                       methods=["POST"]),
                                Route("/metrics", self.metrics)])
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    async def models(self, request: Request):
        if request.headers.get("authorization") != "Bearer fake-key":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: "
                                                      f"{request.headers.get('authorization', '')[7:]}",
                                           "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                         "owned_by": "test"}]})

    async def metrics(self, request: Request):
        if self.mode == "no-metrics":
            return JSONResponse({"detail": "Not Found"}, 404)
        return PlainTextResponse(
            "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.\n"
            "# TYPE vllm:spec_decode_num_drafts_total counter\n"
            f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="fake-model"}} {float(self.drafts)}\n'
            f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="fake-model"}} '
            f"{1.1 * self.drafts}\n"
            'vllm:kv_cache_usage_perc{engine="0",model_name="fake-model"} 0.25\n')

    async def chat(self, request: Request):
        body = await request.json()
        self.drafts += 10
        if self.mode == "busy":
            return JSONResponse({"error": {"message": "queue full", "type": "rate_limit_error"}}, 429,
                                headers={"Retry-After": "7"})
        if self.mode == "crash":
            return JSONResponse({"error": {"message": "CUDA error: an illegal memory access\nat line 3",
                                           "type": "server_error"}}, 500)
        if self.mode == "gone":
            return JSONResponse({"error": {"message": "The model `fake-model` does not exist",
                                           "type": "invalid_request_error", "code": "model_not_found"}}, 404)

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                          "model": body["model"], "choices": [
                                              {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            yield chunk({"content": "Hel"})
            yield chunk({"content": "lo"})
            if self.mode == "midstream":
                yield 'data: {"error": {"message": "the engine stopped", "type": "server_error"}}\n\n'
                return
            yield chunk({}, "length")  # no usage chunk: the client counts the pieces
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake():
    f = FakeServer()
    yield f
    f.close()


def _one_line_error(fn) -> str:
    with pytest.raises(EngineError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_fake_server_success_and_failures(fake):
    s = RemoteSession.connect(fake.url, "fake-key")
    assert s.name == "fake-model" and s.info().context == 0
    events = run(s, QUESTION, SamplingParams(max_new_tokens=5))
    assert events[-1].reason == "length" and events[-1].stats.text == "Hello"
    assert events[-1].stats.n_generated == 2  # no usage from the server: the pieces
    for mode, needle in [("busy", "busy (HTTP 429); retry in 7 s"), ("crash", "HTTP 500: CUDA error"),
                         ("gone", "HTTP 404"), ("midstream", "the server reported an error: the engine stopped")]:
        fake.mode = mode
        msg = _one_line_error(lambda: run(s, QUESTION, SamplingParams(max_new_tokens=5)))
        assert needle in msg and fake.url in msg, (mode, msg)
    fake.mode = "ok"


def test_server_metrics_of_a_vllm_like_server(fake):
    """vLLM publishes speculative-decoding counters and KV-cache usage: one request's tokens per
    step come from the counters' change around it; a server without /metrics gives none."""
    s = RemoteSession.connect(fake.url, "fake-key")
    stats = run(s, QUESTION, SamplingParams(max_new_tokens=5))[-1].stats
    assert stats.server_metrics == {"accepted_per_step": pytest.approx(2.1), "kv_cache_usage": 0.25}
    fake.mode = "no-metrics"
    try:
        assert run(s, QUESTION, SamplingParams(max_new_tokens=5))[-1].stats.server_metrics is None
    finally:
        fake.mode = "ok"
    from chatapp.tui.app import server_figures

    assert server_figures(stats) == "  ·  2.10 tok/step  ·  KV 25%"


def test_prometheus_text_parsing():
    from engine.serving.remote_metrics import metrics_url, parse, summarize

    text = ('# HELP x\nchatapp_last_kv_compression_ratio 3.5\nreq_total{code="200",path="/v1/x"} 2\n'
            'req_total{code="429"} 1\nbad_line\nnan_metric NaN\n')
    assert parse(text) == {"chatapp_last_kv_compression_ratio": 3.5, "req_total": 3.0}
    assert summarize(None, parse(text)) == {"kv_compression": 3.5}
    assert metrics_url("http://h:8000/v1/") == "http://h:8000/metrics"


def test_fake_server_connect_errors(fake):
    msg = _one_line_error(lambda: RemoteSession.connect(fake.url, "sk-secret-value"))
    assert "refused the API key" in msg and "sk-secret-value" not in msg
    msg = _one_line_error(lambda: RemoteSession.connect(fake.url, None))
    assert "none was given" in msg
    msg = _one_line_error(lambda: RemoteSession.connect(fake.url, "fake-key", "other-model"))
    assert "no model 'other-model' (it has: fake-model)" in msg
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    msg = _one_line_error(lambda: RemoteSession.connect(f"http://127.0.0.1:{port}/v1", "k", timeout=5))
    assert "cannot connect" in msg
    assert "not an http(s) URL" in _one_line_error(lambda: RemoteSession.connect("ftp://x/v1"))
    assert "not an http(s) URL" in _one_line_error(lambda: RemoteWorker("localhost:8000"))
