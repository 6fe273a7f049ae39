"""`chatapp serve`'s app on a loopback port in this process, over a loaded session, and what its
tests share (tests/chatapp/test_serve.py; tests/engine/serving/test_remote.py uses it as the remote
server)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import uvicorn

from chatapp.server.app import ServeOptions, create_app
from chatapp.server.runner import EngineRunner
from engine.events import Done, SamplingParams

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]  # a short reply that ends (EOS)


class LiveServer:
    def __init__(self, session, max_queue=8, **options):
        self.runner = EngineRunner(max_queue)
        if session is not None:
            self.runner.attach(session)
        self.app = create_app(self.runner, ServeOptions(**options))
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key=KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def get(self, path: str) -> tuple[int, dict, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def post(self, path: str, body: bytes, headers=None) -> tuple[int, dict, dict]:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.runner.stop()


def greedy(session, messages, max_tokens):
    """(finish reason, stats) of the session's own greedy reply."""
    for ev in session.generate(messages, SamplingParams(max_new_tokens=max_tokens)):
        if isinstance(ev, Done):
            return ev.reason, ev.stats


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in the Prometheus text ``text``."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in the metrics")
