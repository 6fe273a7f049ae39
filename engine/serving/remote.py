"""A remote OpenAI-compatible server (vLLM, ``chatapp serve``, OpenAI itself) as the engine.

``RemoteSession`` has the part of ``Session``'s interface the front ends use (``generate`` yields
``Token`` / ``Step`` / ``Done`` events, ``info``, ``close``), so ``chatapp run --remote URL`` works
as with a local model; ``RemoteWorker`` is the worker the chat screen's ``EngineClient`` takes.
Every failure (connection, refused key, unknown model, busy server, an error mid-stream) becomes
a one-line ``EngineError``; the API key never appears in one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

from engine.errors import EngineError
from engine.events import Done, GenerationStats, LoadModel, Loaded, ModelInfo, Progress, SamplingParams, Step, Token
from engine.serving.remote_metrics import metrics_url, scrape, summarize
from engine.serving.worker import Jobs, Worker

DEFAULT_TIMEOUT_S = 60.0


def _check_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EngineError(f"--remote {url!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    return url.rstrip("/")


class RemoteSession:
    def __init__(self, url: str, api_key: str | None, model: str, context: int, client):
        self.url, self.name, self.context = url, model, context
        self._key = api_key
        self._client = client
        self.device = "remote"
        self.decoding = "remote"
        self._metrics_url = metrics_url(url)

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, model: str | None = None, progress=lambda msg: None,
                timeout: float = DEFAULT_TIMEOUT_S) -> "RemoteSession":
        """Check the server and pick the model: ``model``, or the first one the server lists."""
        import openai

        url = _check_url(url)
        client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=timeout)
        progress(f"connecting to {url}")
        try:
            models = {m.id: m for m in client.models.list().data}
        except Exception as exc:  # noqa: BLE001 - every failure is reported in one line
            raise _error(exc, url, api_key, model) from None
        if not models:
            raise EngineError(f"{url}: the server lists no models")
        if model is None:
            model = next(iter(models))
        elif model not in models:
            raise EngineError(f"{url}: the server has no model {model!r} (it has: {', '.join(sorted(models))[:300]})")
        context = getattr(models[model], "max_model_len", None)
        return cls(url, api_key, model, context if isinstance(context, int) else 0, client)

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.url, "remote", "?", 0, 0, self.context, decoding="remote")

    def recommended_params(self) -> SamplingParams:
        return SamplingParams()

    def close(self) -> None:
        self._client.close()

    def _scrape(self) -> dict[str, float] | None:
        return scrape(self._metrics_url)

    def generate(self, messages: list[dict], params: SamplingParams | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Token | Step | Done]:
        params = params or self.recommended_params()
        extra = {}
        if params.top_k:
            extra["top_k"] = params.top_k  # vLLM's (and chatapp serve's) extensions: sent only when used
        if params.ignore_eos:
            extra["ignore_eos"] = True
        t0 = time.perf_counter()
        t_first = t_last = None
        pieces: list[str] = []
        chunks = 0
        finish = usage = None
        reason = None
        before = self._scrape()
        try:
            stream = self._client.chat.completions.create(
                model=self.name, messages=messages, stream=True, stream_options={"include_usage": True},
                max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                seed=params.seed, extra_body=extra or None)
            try:
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    finish = choice.finish_reason or finish
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        t_last = time.perf_counter()
                        if t_first is None:
                            t_first = t_last
                        chunks += 1
                        pieces.append(text)
                        yield Token(text, [], 1)
                        rate = (chunks - 1) / (t_last - t_first) if chunks > 1 and t_last > t_first else 0.0
                        yield Step(1, rate, 0, 0, 0)
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
            finally:
                stream.close()  # the server stops generating when the connection closes
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported in one line
            raise _error(exc, self.url, self._key, self.name) from None
        if reason is None:
            reason = "length" if finish == "length" else "eos"
        n = usage.completion_tokens if usage is not None else chunks
        decode_s = (t_last - t_first) if t_first is not None else 0.0
        stats = GenerationStats(
            text="".join(pieces), token_ids=[], n_prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            n_generated=n, time_to_first_token_s=(t_first - t0) if t_first is not None else 0.0,
            decode_tokens_per_s=(n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0, steps=chunks,
            accepted_per_step=[], peak_memory_bytes=0, device="remote", model=self.name, decoding="remote",
            server_metrics=summarize(before, self._scrape()) or None)
        yield Done(reason, stats)


def _error(exc: Exception, url: str, api_key: str | None, model: str | None) -> EngineError:
    """One line for the user, with the key (should a server echo it) blanked out."""
    import openai

    if isinstance(exc, openai.AuthenticationError):
        msg = f"{url}: the server refused the API key (HTTP 401)" + ("" if api_key else "; none was given")
    elif isinstance(exc, openai.NotFoundError):
        msg = f"{url}: not found (HTTP 404): {_server_message(exc)}"
    elif isinstance(exc, openai.RateLimitError):
        after = exc.response.headers.get("retry-after")
        msg = f"{url}: the server is busy (HTTP 429)" + (f"; retry in {after} s" if after else "")
    elif isinstance(exc, openai.APIStatusError):
        msg = f"{url}: HTTP {exc.status_code}: {_server_message(exc)}"
    elif isinstance(exc, openai.APITimeoutError):
        msg = f"{url}: no answer in time"
    elif isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        msg = f"{url}: cannot connect ({type(cause).__name__}: {cause})"
    elif isinstance(exc, openai.APIError):  # e.g. an error event in the middle of a stream
        msg = f"{url}: the server reported an error: {exc.message}"
    else:
        msg = f"{url}: unexpected answer ({type(exc).__name__}: {exc})"
    if api_key:
        msg = msg.replace(api_key, "***")
    return EngineError(msg[:500])


def _server_message(exc) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return exc.message


class _RemoteJobs(Jobs):
    def __init__(self, url: str, api_key: str | None):
        super().__init__()
        self.url, self.api_key = url, api_key

    def _load(self, request: LoadModel, sink) -> None:
        self.close()
        self.session = RemoteSession.connect(self.url, self.api_key, request.model, lambda m: sink(Progress(m)))
        sink(Loaded(self.session.info()))


class RemoteWorker(Worker):
    """The worker for a remote server: ``LoadModel`` connects (its ``model`` names the remote
    model; None: the server's first), ``Generate`` streams a chat completion."""

    def __init__(self, url: str, api_key: str | None = None):
        _check_url(url)
        super().__init__(_RemoteJobs(url, api_key))
