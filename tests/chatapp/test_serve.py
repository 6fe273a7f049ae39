"""`chatapp serve`: the OpenAI-compatible HTTP API, driven by the official `openai` client against
a server on a loopback port in this process (it reuses the test run's loaded embedded model)."""

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from chatapp.server.runner import StopMatcher
from engine.events import Done, SamplingParams
from fakes.serve import KEY, QUESTION, LiveServer, greedy, metric

TIPS = [{"role": "system", "content": "You are a helpful cook."},
        {"role": "user", "content": "Give me three tips for cooking rice."}]  # a long reply


@pytest.fixture(scope="module")
def server(embedded_session):
    s = LiveServer(embedded_session, api_key=KEY, max_tokens_limit=256)
    yield s
    s.close()


# ---- the API against the engine ----------------------------------------------------------------
def test_models_lists_the_loaded_model(server, embedded_session):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [embedded_session.name]
    assert server.client().models.retrieve(embedded_session.name).id == embedded_session.name


def test_chat_equals_greedy_session_output(server, embedded_session):
    reason, stats = greedy(embedded_session, QUESTION, 24)
    assert reason == "eos"
    r = server.client().chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=24,
                                                temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == stats.text
    assert r.choices[0].finish_reason == "stop"  # the model ended its reply
    assert r.usage.prompt_tokens == stats.n_prompt_tokens and r.usage.completion_tokens == stats.n_generated
    assert r.usage.total_tokens == stats.n_prompt_tokens + stats.n_generated


def test_streaming_chat_equals_greedy_and_reports_usage(server, embedded_session):
    reason, stats = greedy(embedded_session, TIPS, 10)
    assert reason == "length"
    stream = server.client().chat.completions.create(
        model=embedded_session.name, messages=TIPS, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in content if p]) > 2, "the reply came in one piece: not streamed"
    assert "".join(content) == stats.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == stats.n_prompt_tokens


def test_sse_wire_format_ends_with_done(server, embedded_session):
    body = json.dumps({"model": embedded_session.name, "messages": QUESTION, "max_tokens": 3, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert "usage" not in json.loads(e[6:])  # no include_usage: no usage field


def test_stop_sequence_cuts_the_text(server, embedded_session):
    _, stats = greedy(embedded_session, QUESTION, 12)
    full = stats.text
    stop = full.split()[2]  # a word in the middle of the greedy reply
    cut = full[:full.index(stop)]
    client = server.client()
    r = client.chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=12,
                                       temperature=0, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12
    chunks = list(client.chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=12,
                                                 temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_continue_raw_text(server, embedded_session):
    prompt = "The capital of France is"
    ids = embedded_session.encode_prompt(prompt)
    for ev in embedded_session.generate_ids(ids, SamplingParams(max_new_tokens=6)):
        if isinstance(ev, Done):
            expected = ev.stats.text
    assert "Paris" in expected  # a raw continuation, not a chat reply
    client = server.client()
    r = client.completions.create(model=embedded_session.name, prompt=prompt, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model=embedded_session.name, prompt=prompt, max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    r = client.completions.create(model=embedded_session.name, prompt=prompt, max_tokens=6, temperature=0,
                                  stop=" Paris")
    assert r.choices[0].text == expected[:expected.index(" Paris")] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server, embedded_session):
    client = server.client()
    kw = dict(model=embedded_session.name, messages=[{"role": "user", "content": "Tell me a story."}],
              max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == a


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")


def test_bad_or_missing_key_is_401(server, embedded_session):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").chat.completions.create(model=embedded_session.name, messages=QUESTION,
                                                           max_tokens=2)
    assert e.value.body["type"] == "authentication_error" and "wrong" not in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    status, _, body = server.post("/v1/completions", b'{"model": "x", "prompt": "hi"}')
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_bad_requests_are_400_in_openai_shape(server, embedded_session):
    auth = {"Authorization": f"Bearer {KEY}"}
    name = embedded_session.name
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"model": name}).encode(), "messages: Field required"),
        (json.dumps({"model": name, "messages": []}).encode(), "messages"),
        (json.dumps({"model": name, "messages": [{"role": "wizard", "content": "x"}]}).encode(), "role"),
        (json.dumps({"model": name, "messages": QUESTION, "temperature": 5}).encode(), "temperature"),
        (json.dumps({"model": name, "messages": QUESTION, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": name, "messages": QUESTION, "max_tokens": 100000}).encode(), "allows (256)"),
        (json.dumps({"model": name, "messages": QUESTION, "n": 2}).encode(), "only n=1"),
        (json.dumps({"model": name, "messages": QUESTION, "stream": "sometimes"}).encode(), "stream"),
        (json.dumps({"model": name, "messages": QUESTION, "seed": 2**70}).encode(), "seed must be in [0, 2**63)"),
        (json.dumps({"model": name, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
         "messages: the text is not valid Unicode"),
        (json.dumps({"model": name, "prompt": "a \udcff b", "max_tokens": 2}).encode(),
         "prompt: the text is not valid Unicode"),
    ]
    for body, needle in cases:
        path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
        status, _, out = server.post(path, body, auth)
        assert status == 400, (body, out)
        err = out["error"]
        assert set(err) >= {"message", "type", "code"} and err["type"] == "invalid_request_error"
        assert needle in err["message"] and "\n" not in err["message"], (needle, err)
        t0 = time.monotonic()
        assert server.get("/health")[0] == 200 and time.monotonic() - t0 < 1.0  # the server stays up
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=name, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=name, prompt="hi", max_tokens=2, echo=True)
    assert "echo" in e.value.body["message"]


def test_too_large_request_is_413(embedded_session):
    s = LiveServer(embedded_session, max_request_bytes=2000)
    try:
        status, _, out = s.post("/v1/chat/completions", json.dumps(
            {"model": embedded_session.name, "messages": [{"role": "user", "content": "x" * 5000}]}).encode())
        assert status == 413 and out["error"]["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as e:
            s.client().chat.completions.create(model=embedded_session.name, max_tokens=2,
                                               messages=[{"role": "user", "content": "y" * 5000}])
        assert e.value.status_code == 413
    finally:
        s.close()


def test_not_loaded_is_503():
    s = LiveServer(None)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            s.client().chat.completions.create(model="any", messages=QUESTION, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "model_not_loaded"
        assert s.get("/health")[0] == 503
    finally:
        s.close()


# ---- metrics, load, cancellation ---------------------------------------------------------------
def test_metrics(server, embedded_session):
    server.client().chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=4,
                                            temperature=0)
    status, headers, text = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE chatapp_requests_total counter" in text
    assert 'chatapp_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert metric(text, "chatapp_generation_tokens_total") >= 4
    assert metric(text, "chatapp_queue_depth") == 0
    assert metric(text, "chatapp_last_decode_tokens_per_second") > 0
    assert 0 < metric(text, "chatapp_last_time_to_first_token_seconds") < 30
    assert metric(text, "chatapp_time_to_first_token_seconds_count") >= 1
    assert "chatapp_medusa_accepted_tokens_per_step" not in text  # plain decoding
    before = metric(text, "chatapp_generation_tokens_total")
    server.client().completions.create(model=embedded_session.name, prompt="Once upon a time", max_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    after = metric(server.get("/metrics")[2], "chatapp_generation_tokens_total")
    assert after == before + 3


def test_concurrent_streams_complete_or_get_429(server, embedded_session, monkeypatch):
    """Six streaming clients at once against one engine with two waiting places: each one either
    gets its whole reply or a clean 429 with Retry-After; the server answers afterwards."""
    monkeypatch.setattr(server.runner, "max_queue", 2)
    _, stats = greedy(embedded_session, QUESTION, 6)
    results: list = [None] * 6
    barrier = threading.Barrier(6)

    def client(i: int) -> None:
        barrier.wait()
        try:
            stream = server.client().chat.completions.create(model=embedded_session.name, messages=QUESTION,
                                                             max_tokens=6, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except openai.RateLimitError as e:
            results[i] = e
        except Exception as e:  # noqa: BLE001 - anything else fails the test below
            results[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done = [r for r in results if isinstance(r, str)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(done) + len(limited) == 6, results
    assert all(r == stats.text for r in done), results
    assert 1 <= len(done) and len(limited) >= 1
    for e in limited:
        assert e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1
        assert e.body["code"] == "queue_full"
    r = server.client().chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=2)
    assert r.choices[0].message.content
    text = server.get("/metrics")[2]
    assert metric(text, "chatapp_queue_depth") == 0 and metric(text, "chatapp_requests_running") == 0
    assert 'chatapp_requests_total{endpoint="/v1/chat/completions",status="429"}' in text


def test_disconnect_mid_stream_cancels_the_generation(server, embedded_session):
    client = server.client()
    cancelled_before = metric(server.get("/metrics")[2], "chatapp_generations_cancelled_total")
    stream = client.chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=250,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces = 0
    for chunk in stream:
        pieces += 1
        if pieces == 3:
            break
    stream.close()  # the client goes away with ~250 tokens (over 10 s on a CPU) still to generate
    t0 = time.monotonic()
    r = client.chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=3, temperature=0)
    elapsed = time.monotonic() - t0
    assert r.usage.completion_tokens == 3
    assert elapsed < 5, f"the next request waited {elapsed:.1f} s: the abandoned generation went on"
    text = server.get("/metrics")[2]
    assert metric(text, "chatapp_generations_cancelled_total") == cancelled_before + 1


def test_disconnect_while_queued_skips_the_request(server, embedded_session):
    """A client that goes away while its request waits behind another: the engine never runs it."""
    client = server.client()
    before = metric(server.get("/metrics")[2], "chatapp_generations_total")
    first = client.chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=30,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(first)
    next(chunks)
    next(chunks)  # the first request is generating
    waiting = client.chat.completions.create(model=embedded_session.name, messages=QUESTION, max_tokens=30,
                                             temperature=0, stream=True)
    assert next(iter(waiting)).choices[0].delta.role == "assistant"  # its stream is open, its turn not come
    assert metric(server.get("/metrics")[2], "chatapp_queue_depth") == 1
    waiting.close()
    assert sum(1 for _ in chunks) > 0  # the first one goes on to its end
    first.close()
    deadline = time.monotonic() + 10
    while metric(text := server.get("/metrics")[2], "chatapp_requests_running") or \
            metric(text, "chatapp_queue_depth"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(text, "chatapp_generations_total") == before + 1


# ---- pieces --------------------------------------------------------------------------------------
def test_stop_matcher_holds_back_partial_stop_sequences():
    m = StopMatcher(["END", "xyz"])
    assert m.feed("hello E") == ("hello ", False)  # "E" may start "END"
    assert m.feed("N") == ("", False)
    assert m.feed("Dless") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("a EN") == ("a ", False)
    assert m.feed("d b") == ("ENd b", False)
    assert m.feed("E") == ("", False) and m.flush() == "E"
    m = StopMatcher(["</s>"])
    assert m.feed("a</") == ("a", False)
    assert m.feed("s> more") == ("", True)
    assert StopMatcher(["b", "abc"]).feed("xabc") == ("x", True)  # the earliest stop sequence wins


# ---- the command -------------------------------------------------------------------------------
def _start(tmp_path, *args, env=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "chatapp", "serve", "--port", "0", *args], stdout=log,
                            stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[2],
                            env={**os.environ, **(env or {})})
    return proc, tmp_path / "serve.log"


def _wait_for(proc, log, needle: str, timeout=120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if needle in text or proc.poll() is not None:
            return text
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{needle!r} did not appear:\n{log.read_text()}")


@pytest.mark.slow
def test_serve_command(tmp_path, embedded_session):
    import re
    import signal

    proc, log = _start(tmp_path, "--device", "cpu", "--max-tokens-limit", "32", "--served-model-name", "my-model",
                       env={"CHATAPP_API_KEY": "cmd-key"})
    try:
        text = _wait_for(proc, log, "serving ")
        url = re.search(r"serving my-model \(cpu, plain\) at (http://127\.0\.0\.1:\d+/v1) \(API key required\)",
                        text).group(1)
        client = openai.OpenAI(base_url=url, api_key="cmd-key", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["my-model"]
        r = client.completions.create(model="my-model", prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="my-model", prompt="hello", max_tokens=33)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert "cmd-key" not in log.read_text()  # the key is never logged


@pytest.mark.slow
def test_serve_command_on_a_folder_shows_its_name_not_its_path(tmp_path, embedded_session):
    import re
    import signal

    path = str(embedded_session.path)
    proc, log = _start(tmp_path, "--model", path, "--device", "cpu")
    try:
        text = _wait_for(proc, log, "serving ")
        url = re.search(r"serving \S+ \(cpu, plain\) at (http://127\.0\.0\.1:\d+)/v1", text).group(1)
        for route in ("/health", "/metrics", "/v1/models"):
            with urllib.request.urlopen(url + route, timeout=30) as r:
                body = r.read().decode()
            assert embedded_session.path.name in body and path not in body, (route, body)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model=path, prompt="hello", max_tokens=2)  # the path still names it
        assert r.model == embedded_session.path.name
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_serve_command_errors(tmp_path):
    proc, log = _start(tmp_path, "--model", str(tmp_path / "absent"), "--device", "cpu")
    assert proc.wait(timeout=120) == 1
    errors = [line for line in log.read_text().splitlines() if line.startswith("chatapp: error:")]
    assert len(errors) == 1 and "absent" in errors[0], log.read_text()
    proc, log = _start(tmp_path, "--api-key-env", "CHATAPP_TEST_UNSET_VARIABLE")
    assert proc.wait(timeout=60) == 1
    assert "CHATAPP_TEST_UNSET_VARIABLE" in log.read_text()


def test_metrics_render_medusa_and_histogram():
    from chatapp.server.runner import Metrics
    from engine.events import GenerationStats

    def stats(n, steps, ttft):
        return GenerationStats(text="", token_ids=[0] * n, n_prompt_tokens=5, n_generated=n,
                               time_to_first_token_s=ttft, decode_tokens_per_s=40.0, steps=steps,
                               accepted_per_step=[], peak_memory_bytes=0, device="cpu", model="m",
                               decoding="medusa")

    m = Metrics()
    m.count_generation(stats(12, 5, 0.03), cancelled=False)
    m.count_generation(stats(9, 3, 0.2), cancelled=True)
    m.count_request("/v1/chat/completions", 200)
    m.count_request("/v1/models/some/model", 404)
    m.count_request("/secret/path", 404)
    text = m.render(waiting=2, running=1, model='a "quoted" name', decoding="medusa")
    assert metric(text, "chatapp_medusa_accepted_tokens_per_step") == 3.0  # 9 tokens in 3 steps, the last one
    assert metric(text, "chatapp_medusa_steps_total") == 8
    assert metric(text, "chatapp_generation_tokens_total") == 21 and metric(text, "chatapp_prompt_tokens_total") == 10
    assert metric(text, "chatapp_generations_cancelled_total") == 1
    assert metric(text, "chatapp_queue_depth") == 2 and metric(text, "chatapp_requests_running") == 1
    assert 'chatapp_time_to_first_token_seconds_bucket{le="0.05"} 1' in text
    assert 'chatapp_time_to_first_token_seconds_bucket{le="0.25"} 2' in text
    assert 'chatapp_time_to_first_token_seconds_bucket{le="+Inf"} 2' in text
    assert metric(text, "chatapp_time_to_first_token_seconds_count") == 2
    assert 'endpoint="other",status="404"} 1' in text and "/secret/path" not in text
    assert 'endpoint="/v1/models/{id}",status="404"} 1' in text
    assert 'model="a \\"quoted\\" name"' in text
    assert "chatapp_medusa" not in m.render(waiting=0, running=0, model="m", decoding="plain")


def test_speculative_figures_in_vllm_and_llama_cpp_terms(tiny_checkpoint):
    """A lookup-decoding server: /metrics carries vLLM's speculative-decoding counters, and the final
    chunk of a stream (and a whole response) vLLM's per-request ``metrics`` object and llama.cpp's
    draft ``timings``; the counters grow by what the response reports."""
    from engine.events import LoadModel
    from engine.session import Session
    from engine.serving.remote_metrics import parse

    session = Session.load(LoadModel(str(tiny_checkpoint), "cpu", decoding="lookup"))
    s = LiveServer(session, api_key=KEY)
    try:
        def counters() -> dict[str, float]:  # each metric summed over its label sets
            return parse(s.get("/metrics")[2])

        assert counters()["vllm:spec_decode_num_drafts_total"] == 0
        stream = s.client().chat.completions.create(
            model=session.name, messages=QUESTION, max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        last = list(stream)[-1].model_dump()
        spec = last["metrics"]["speculative_decoding"]
        assert spec["num_spec_steps"] > 0 and 0 < spec["num_accepted_draft_tokens"] <= spec["num_draft_tokens"]
        assert sum(spec["acceptance_histogram"]) == spec["num_spec_steps"]
        assert spec["mean_acceptance_length"] == 1 + spec["num_accepted_draft_tokens"] / spec["num_spec_steps"]
        assert last["timings"]["draft_n"] == spec["num_draft_tokens"]
        assert last["timings"]["draft_n_accepted"] == spec["num_accepted_draft_tokens"]
        text = s.get("/metrics")[2]
        c = parse(text)
        assert c["vllm:spec_decode_num_drafts_total"] == spec["num_spec_steps"]
        assert c["vllm:spec_decode_num_draft_tokens_total"] == spec["num_draft_tokens"]
        assert c["vllm:spec_decode_num_accepted_tokens_total"] == spec["num_accepted_draft_tokens"]
        assert c["vllm:spec_decode_num_accepted_tokens_per_pos_total"] == spec["num_accepted_draft_tokens"]
        assert "# TYPE vllm:spec_decode_num_drafts_total counter" in text
        assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="{session.name}",position="0"}}' in text
        whole = s.client().chat.completions.create(model=session.name, messages=QUESTION, max_tokens=20,
                                                   temperature=0, extra_body={"ignore_eos": True}).model_dump()
        assert whole["metrics"]["speculative_decoding"]["num_spec_steps"] > 0
        assert counters()["vllm:spec_decode_num_drafts_total"] == \
            spec["num_spec_steps"] + whole["metrics"]["speculative_decoding"]["num_spec_steps"]
    finally:
        s.close()
        session.close()
