"""``chatapp serve``: the engine behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

    GET  /v1/models               the one loaded model
    POST /v1/chat/completions     chat (the model's chat template), streaming or not
    POST /v1/completions          raw-text continuation (no chat template), streaming or not
    GET  /metrics                 Prometheus text format
    GET  /health                  200 once the model is loaded, 503 before

Requests run one at a time on the engine thread (``runner.EngineRunner``) behind a bounded
wait queue; a full queue answers 429 with Retry-After. A client that goes away stops its
generation within one decoding step. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.decoding.speculative.counters import Counters
from engine.errors import EngineError
from engine.events import SamplingParams

from chatapp.options import load_request
from chatapp.server import DEFAULT_API_KEY_ENV
from chatapp.server.runner import Chunk, EngineRunner, Failed, Finished, Job, Metrics, NotReady, QueueFull

MAX_STOP_SEQUENCES = 16
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass
class ServeOptions:
    model_names: tuple[str, ...] = ()  # names a request may use; the first is the one listed (empty: the session's)
    api_key: str | None = None  # None: no key needed
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1 << 20
    aliases: tuple[str, ...] = ()  # other names a request may use, never shown (--model as given: maybe a path)
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS  # Host headers answered (None: any)


def allowed_hosts(bound: str) -> frozenset[str] | None:
    """The Host headers a server bound to ``bound`` answers: its own address and the loopback names
    (a web page's request to a name that resolves here, DNS rebinding, is refused); any Host when it
    listens on every interface, where the names it is reached by are not known."""
    if bound in WILDCARD_HOSTS:
        return None
    return LOOPBACK_HOSTS | {bound.lower().strip("[]")}


def host_name(header: str) -> str:
    """The name of a Host header, without its port: 'LocalHost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request bodies -------------------------------------------------------------------------
class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class TextPart(_Base):
    type: Literal["text"]
    text: str


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def unsupported(self) -> str | None:
        """The first asked-for feature this server does not have, as an error message."""
        if self.n != 1:
            return "n: only n=1 is supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return f"{name}: not supported by this server (only 0)"
        return None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list | None = None

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "logprobs: not supported by this server"
        if self.tools:
            return "tools: tool calls are not supported by this server"
        return super().unsupported()


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None

    def unsupported(self) -> str | None:
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                return f"{name}: not supported by this server"
        return super().unsupported()


_TYPE_TAGS = {"str", "int", "bool", "float", "list", "dict", "none"}


def _validation_message(err: ValidationError) -> str:
    """One line: where the first problem is and what it is (union members' type tags left out)."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)))
    return f"{where}: {first['msg']}" if where else first["msg"]


def _parse(cls, data: dict):
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, _validation_message(e)) from None
    if problem := req.unsupported():
        raise ApiError(400, problem, param=problem.split(":")[0])
    return req


# ---- the application ------------------------------------------------------------------------
class Server:
    """The HTTP side: routes, checks, and the translation between OpenAI requests and engine jobs."""

    def __init__(self, runner: EngineRunner, options: ServeOptions):
        self.runner = runner
        self.options = options
        self.metrics = runner.metrics
        self.created = int(time.time())

    # -- helpers
    @property
    def session(self):
        return self.runner.session

    def model_id(self) -> str:
        if self.options.model_names:
            return self.options.model_names[0]
        return self.session.name if self.session is not None else "(loading)"

    def _check_key(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY')",
                           "authentication_error", "invalid_api_key")

    def _check_ready(self) -> None:
        if self.session is None:
            raise ApiError(503, "the model is still loading; try again shortly", "service_unavailable",
                           "model_not_loaded", headers={"Retry-After": "5"})

    def _check_model(self, name: str) -> None:
        names = self.options.model_names or (self.session.name,)
        if name not in names and name != self.session.name and name not in self.options.aliases:
            raise ApiError(404, f"the model {name!r} does not exist on this server (it serves {names[0]!r})",
                           "invalid_request_error", "model_not_found", "model")

    async def _read_json(self, request: Request) -> dict:
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json":  # what a web page cannot send to another site without asking (CORS)
            raise ApiError(415, f"Content-Type {kind or '(none)'}: the request body must be application/json",
                           "invalid_request_error", "unsupported_media_type")
        limit = self.options.max_request_bytes
        too_large = ApiError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                             "invalid_request_error", "request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:  # nobody reads the answer; 499 keeps it out of the server errors
            raise ApiError(499, "the client closed the connection before sending the whole body",
                           code="client_closed_request") from None
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def _params(self, req: _Sampling, max_tokens: int | None, n_prompt: int) -> SamplingParams:
        limit = self.options.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} is more than this server allows ({limit})",
                           param="max_tokens")
        context = self.session.context
        if n_prompt >= context:
            raise ApiError(400, f"the prompt has {n_prompt} tokens; the model's context is {context} tokens",
                           code="context_length_exceeded", param="messages")
        room = context - n_prompt
        base = self.runner_defaults
        top_k = base.top_k if req.top_k is None else max(0, req.top_k)
        params = SamplingParams(max_new_tokens=min(max_tokens or limit, room, limit),
                                temperature=base.temperature if req.temperature is None else req.temperature,
                                top_k=top_k, top_p=base.top_p if req.top_p is None else req.top_p,
                                seed=req.seed, ignore_eos=req.ignore_eos)
        try:
            params.check()  # the engine's own check, here where it is the client's error
        except EngineError as e:
            raise ApiError(400, str(e), param=str(e).split()[0]) from None
        return params

    @property
    def runner_defaults(self) -> SamplingParams:
        return self.session.recommended_params()

    @staticmethod
    def _stops(req: _Sampling) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are supported", param="stop")
        return [s for s in stops if s]

    def _submit(self, prompt: list[int], params: SamplingParams, stops: list[str]) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        job = Job(prompt, params, emit, stops)
        try:
            self.runner.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry in {e.retry_after_s} s", "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except NotReady:
            raise ApiError(503, "the model is not loaded", "service_unavailable", "model_not_loaded") from None
        return job, q

    # -- endpoints
    async def models(self, request: Request) -> Response:
        self._check_key(request)
        self._check_ready()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._check_key(request)
        self._check_ready()
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_id(), "object": "model", "created": self.created, "owned_by": "chatapp",
                "max_model_len": self.session.context}

    async def chat(self, request: Request) -> Response:
        self._check_key(request)
        req = _parse(ChatRequest, await self._read_json(request))
        self._check_ready()
        self._check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:  # off the event loop: a long prompt or a slow template must not stall /health
            prompt = await asyncio.to_thread(self.session.encode_chat, messages)
        except EngineError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        params = self._params(req, req.max_completion_tokens or req.max_tokens, len(prompt))
        job, q = self._submit(prompt, params, self._stops(req))
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._chat_chunks(ident, job, q, usage))
        return await self._complete(request, job, q, lambda text, end: {
            "id": ident, "object": "chat.completion", "created": int(time.time()), "model": self.model_id(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": end.finish_reason}],
            "usage": _usage(end), "system_fingerprint": None, **_request_figures(end)})

    async def completions(self, request: Request) -> Response:
        self._check_key(request)
        req = _parse(CompletionRequest, await self._read_json(request))
        self._check_ready()
        self._check_model(req.model)
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request is supported", param="prompt")
            req.prompt = req.prompt[0]
        if isinstance(req.prompt, str):
            try:
                prompt = await asyncio.to_thread(self.session.encode_prompt, req.prompt)
            except EngineError as e:
                raise ApiError(400, f"prompt: {e}", param="prompt") from None
        else:
            vocab = self.session.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise ApiError(400, "prompt: it is empty", param="prompt")
        params = self._params(req, req.max_tokens, len(prompt))
        if req.max_tokens is None:  # OpenAI's default for completions is 16 tokens
            params.max_new_tokens = min(16, params.max_new_tokens)
        job, q = self._submit(prompt, params, self._stops(req))
        ident = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._completion_chunks(ident, job, q, usage))
        return await self._complete(request, job, q, lambda text, end: {
            "id": ident, "object": "text_completion", "created": int(time.time()), "model": self.model_id(),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason}],
            "usage": _usage(end), "system_fingerprint": None, **_request_figures(end)})

    async def metrics_text(self, request: Request) -> Response:
        s = self.session
        text = self.metrics.render(waiting=self.runner.waiting, running=self.runner.running,
                                   model=self.model_id() if s is not None else None,
                                   decoding=s.decoding if s is not None else "plain")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(self, request: Request) -> Response:
        if self.session is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id()})

    # -- results
    async def _complete(self, request: Request, job: Job, q: asyncio.Queue, build) -> Response:
        """Wait for the whole reply; a client that disconnects meanwhile cancels it."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        pieces: list[str] = []
        try:
            while True:
                item = await q.get()
                if isinstance(item, Chunk):
                    pieces.append(item.text)
                elif isinstance(item, Failed):
                    raise _engine_error(item)
                elif item.finish_reason == "cancelled":
                    return Response(status_code=499)  # nobody reads it: the client closed the request
                else:
                    return JSONResponse(build("".join(pieces), item))
        finally:
            watcher.cancel()
            job.cancel.set()

    async def _events(self, job: Job, q: asyncio.Queue):
        try:
            while True:
                item = await q.get()
                yield item
                if isinstance(item, Finished | Failed):
                    return
        finally:  # the stream ended, or the client went away and the response task was cancelled
            job.cancel.set()

    async def _chat_chunks(self, ident: str, job: Job, q: asyncio.Queue, include_usage: bool):
        created, model = int(time.time()), self.model_id()

        def chunk(delta: dict, finish: str | None = None) -> dict:
            out = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            return out

        yield chunk({"role": "assistant", "content": ""})
        async for item in self._events(job, q):
            if isinstance(item, Chunk):
                yield chunk({"content": item.text})
            elif isinstance(item, Failed):
                yield _engine_error(item).body()
            elif item.finish_reason != "cancelled":
                if not include_usage:
                    yield {**chunk({}, item.finish_reason), **_request_figures(item)}
                else:
                    yield chunk({}, item.finish_reason)
                    yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": None, "choices": [], "usage": _usage(item), **_request_figures(item)}

    async def _completion_chunks(self, ident: str, job: Job, q: asyncio.Queue, include_usage: bool):
        created, model = int(time.time()), self.model_id()

        def chunk(text: str, finish: str | None = None) -> dict:
            out = {"id": ident, "object": "text_completion", "created": created, "model": model,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            return out

        async for item in self._events(job, q):
            if isinstance(item, Chunk):
                yield chunk(item.text)
            elif isinstance(item, Failed):
                yield _engine_error(item).body()
            elif item.finish_reason != "cancelled":
                if not include_usage:
                    yield {**chunk("", item.finish_reason), **_request_figures(item)}
                else:
                    yield chunk("", item.finish_reason)
                    yield {"id": ident, "object": "text_completion", "created": created, "model": model,
                           "system_fingerprint": None, "choices": [], "usage": _usage(item), **_request_figures(item)}


def _engine_error(failed: Failed) -> ApiError:
    if failed.message.startswith("out of memory"):  # the request may fit later, or a smaller one now
        return ApiError(503, failed.message, "service_unavailable", "overloaded", headers={"Retry-After": "5"})
    return ApiError(500, failed.message, "server_error", "engine_error")


def _usage(end: Finished) -> dict:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def _request_figures(end: Finished) -> dict:
    """A speculating reply's own figures, for the response or its final chunk: vLLM's per-request
    ``metrics`` object and the draft counts of llama.cpp's server ``timings``. Nothing otherwise."""
    spec = end.stats.speculation if end.stats is not None else None
    if not spec:
        return {}
    counters = Counters.from_dict(spec)
    return {"metrics": counters.vllm_request_metrics(),
            "timings": {"predicted_n": end.completion_tokens, "draft_n": counters.draft_tokens,
                        "draft_n_accepted": counters.accepted_tokens}}


def _sse(chunks) -> StreamingResponse:
    async def body():
        async for c in chunks:
            yield f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """The body is read already, so the next ASGI message can only be the client's disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class _Guard:
    """ASGI middleware: refuses a Host header the server is not reached by (before any route runs),
    and counts every answered request by endpoint and status code."""

    def __init__(self, app, metrics: Metrics, hosts: frozenset[str] | None):
        self.app, self.metrics, self.hosts = app, metrics, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            app = ApiError(403, f"Host {host!r}: this server answers only requests addressed to "
                                f"{', '.join(sorted(self.hosts))}", "invalid_request_error", "host_not_allowed"
                           ).response()
        else:
            app = self.app

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_counted)
        finally:
            self.metrics.count_request(scope["path"], status)


def create_app(runner: EngineRunner, options: ServeOptions | None = None):
    """The ASGI application over a runner (its session may be attached later: 503 until then)."""
    server = Server(runner, options or ServeOptions())

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        "invalid_request_error", kind, headers=exc.headers).response()

    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    async def internal_error(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error").response()

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                      Exception: internal_error})
    app.state.server = server
    return _Guard(app, runner.metrics, server.options.allowed_hosts)


# ---- the command ----------------------------------------------------------------------------
def main(args) -> int:
    import uvicorn

    def fail(message: str) -> int:
        print(f"chatapp: error: {message}", file=sys.stderr)
        return 1

    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            return fail(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    else:
        api_key = os.environ.get(DEFAULT_API_KEY_ENV) or None
    for name in ("max_queue", "max_tokens_limit", "max_request_bytes", "port"):
        value = getattr(args, name)
        if value < (0 if name in ("max_queue", "port") else 1) or (name == "port" and value > 65535):
            return fail(f"--{name.replace('_', '-')} {value}: out of range")
    try:
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                    else socket.AF_INET)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port} ({(e.strerror or str(e)).split(' (while')[0]})")
    host, port = sock.getsockname()[:2]
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chatapp: warning: listening on {args.host} without an API key (set {DEFAULT_API_KEY_ENV} "
              "or use --api-key-env)", file=sys.stderr)

    runner = EngineRunner(args.max_queue)
    options = ServeOptions(model_names=(args.served_model_name,) if args.served_model_name else (),
                           aliases=(args.model,) if args.model else (), api_key=api_key,
                           max_tokens_limit=args.max_tokens_limit, max_request_bytes=args.max_request_bytes,
                           allowed_hosts=allowed_hosts(args.host))
    app = create_app(runner, options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2))
    load_error: list[str] = []

    def load() -> None:
        from engine.session import Session
        from engine.serving.worker import describe

        try:
            session = Session.load(load_request(args), lambda msg: print(msg, file=sys.stderr))
        except BaseException as exc:  # noqa: BLE001 - reported, and the server stops
            load_error.append(describe(exc))
            server.should_exit = True
            return
        runner.attach(session)
        name = options.model_names[0] if options.model_names else session.name
        print(f"serving {name} ({session.device.type}, {session.decoding}) at http://{host}:{port}/v1"
              + (" (API key required)" if api_key else ""), file=sys.stderr)

    threading.Thread(target=load, name="chatapp-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully on Ctrl+C, then passed the signal on
        pass
    finally:
        runner.stop()
    if load_error:
        return fail(load_error[0])
    return 0
