"""`chatapp serve` against hostile or broken requests: each one gets a 4xx (or a 503 where it may
fit later) in OpenAI's error shape, nothing is logged as a server error, and the server keeps
answering /health within a second, during the request and after it."""

import json
import logging
import socket
import threading
import time

import pytest

from chatapp.server.app import allowed_hosts, host_name
from fakes.serve import QUESTION, LiveServer


@pytest.fixture(scope="module")
def server(embedded_session):
    s = LiveServer(embedded_session, aliases=("/home/someone/models/private-name",))
    yield s
    s.close()


@pytest.fixture
def server_log(caplog):
    """What uvicorn logs at ERROR or above while the test runs (a traceback of the app is logged there)."""
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.ERROR, logger="uvicorn.error")
    yield caplog
    logger.removeHandler(caplog.handler)


def health_s(server) -> float:
    t0 = time.monotonic()
    status, _, _ = server.get("/health")
    assert status == 200
    return time.monotonic() - t0


def assert_responsive(server) -> None:
    assert health_s(server) < 1.0


def five_hundreds(server) -> int:
    text = server.get("/metrics")[2]
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("chatapp_requests_total{") and 'status="5' in line)


def test_a_body_nested_100k_deep_is_400(server, server_log):
    before = five_hundreds(server)
    for body in (b"[" * 100_000, b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        status, _, out = server.post("/v1/chat/completions", body)
        assert status == 400 and "nested too deeply" in out["error"]["message"], out
        assert_responsive(server)
    assert five_hundreds(server) == before and not server_log.records


def test_a_client_that_leaves_mid_body_is_not_a_server_error(server, server_log):
    before = five_hundreds(server)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                         b'{"model": "x", "messages": [{"role": "user", "content": "a')
            time.sleep(0.2)
        assert_responsive(server)
    time.sleep(0.5)
    assert five_hundreds(server) == before
    assert not server_log.records, [r.getMessage() for r in server_log.records]
    assert 'endpoint="/v1/chat/completions",status="499"' in server.get("/metrics")[2]


def test_only_json_bodies_are_accepted(server, embedded_session):
    body = json.dumps({"model": embedded_session.name, "messages": QUESTION, "max_tokens": 1}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        status, _, out = server.post("/v1/chat/completions", body, {"Content-Type": kind})
        assert status == 415 and out["error"]["code"] == "unsupported_media_type", (kind, out)
        assert "application/json" in out["error"]["message"]
    status, _, _ = server.post("/v1/chat/completions", body, {"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200


def test_a_host_the_server_is_not_reached_by_is_refused(server, embedded_session):
    """A page on evil.example that resolves its name to 127.0.0.1 (DNS rebinding) sends Host: evil.example."""
    body = json.dumps({"model": embedded_session.name, "messages": QUESTION, "max_tokens": 1}).encode()
    for host in ("evil.example", "evil.example:%d" % server.port, "127.0.0.1.evil.example"):
        status, _, out = server.post("/v1/chat/completions", body, {"Host": host})
        assert status == 403 and out["error"]["code"] == "host_not_allowed", out
        assert host in out["error"]["message"]
    for host in ("localhost:%d" % server.port, "LOCALHOST", "127.0.0.1:%d" % server.port, "[::1]:%d" % server.port):
        assert server.post("/v1/chat/completions", body, {"Host": host})[0] == 200, host
    assert_responsive(server)


def test_host_names_and_the_hosts_a_bound_address_answers():
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("::1") == "::1" and host_name("example.com") == "example.com"
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert "192.168.1.5" in allowed_hosts("192.168.1.5") and "evil.example" not in allowed_hosts("192.168.1.5")


def test_health_and_metrics_show_the_served_name_not_the_path(server, embedded_session):
    status, _, text = server.get("/health")
    assert status == 200 and json.loads(text)["model"] == embedded_session.name
    server.post("/v1/chat/completions", json.dumps({"model": "/home/someone/models/private-name",
                                                     "messages": QUESTION, "max_tokens": 1}).encode())
    for path in ("/health", "/metrics", "/v1/models"):
        assert "/home/someone" not in server.get(path)[2], path


def test_a_cpu_allocation_failure_is_503(server, embedded_session, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")
        yield

    monkeypatch.setattr(embedded_session, "generate_ids", fail)
    status, headers, out = server.post("/v1/chat/completions", json.dumps(
        {"model": embedded_session.name, "messages": QUESTION, "max_tokens": 4}).encode())
    assert status == 503 and out["error"]["code"] == "overloaded" and {k.lower(): v for k, v in headers.items()}["retry-after"]
    assert out["error"]["message"].startswith("out of memory:")
    assert_responsive(server)


def test_a_template_that_runs_long_does_not_stall_the_server(server, embedded_session, monkeypatch):
    tok = embedded_session.tokenizer
    monkeypatch.setattr(tok, "chat_template", "{% for i in range(999999) %}{% set x = i ** 3 %}{% endfor %}"
                                              "{% for i in range(10) %}{% endfor %}")
    monkeypatch.setattr(tok, "_template", None)
    answer = {}

    def request():
        answer["reply"] = server.post("/v1/chat/completions", json.dumps(
            {"model": embedded_session.name, "messages": QUESTION, "max_tokens": 4}).encode())

    worker = threading.Thread(target=request)
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        slowest = max(slowest, health_s(server))
        time.sleep(0.05)
    status, _, out = answer["reply"]
    # the loop limit trips, or on a busy machine the time limit first: either way a 400 naming the template
    message = out["error"]["message"]
    assert status == 400 and "chat template" in message and ("loops too long" in message or "runs too long" in message), out
    assert slowest < 1.0
    assert_responsive(server)
