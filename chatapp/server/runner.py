"""The serving side of ``chatapp serve`` that is not HTTP: the requests run one at a time against
the loaded session (the model is not thread-safe) by the job loop of engine.serving.worker.Worker,
behind a bounded wait queue; stop sequences, and the Prometheus metrics."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.decoding.speculative.counters import Counters
from engine.events import PROPOSERS, Done, GenerationStats, SamplingParams, Token
from engine.serving.worker import Jobs, Worker, describe


class QueueFull(Exception):
    """Every place in the wait queue is taken."""

    def __init__(self, retry_after_s: int):
        super().__init__("the server is busy: the request queue is full")
        self.retry_after_s = retry_after_s


class NotReady(Exception):
    """No model is loaded (yet, or any more)."""


# ---- what the engine thread sends back for one request --------------------------------------
@dataclass
class Chunk:
    text: str  # new text of the reply, with stop sequences already cut


@dataclass
class Finished:
    finish_reason: str  # stop | length | cancelled (the client went away)
    prompt_tokens: int
    completion_tokens: int
    stats: GenerationStats | None = None


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    prompt: list[int]  # token ids
    params: SamplingParams
    emit: Callable[[Chunk | Finished | Failed], None]  # called on the engine thread
    stop: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


class StopMatcher:
    """Cuts the reply at the first stop sequence. Text that could be the start of a stop
    sequence is held back until the next piece decides it, so no part of a stop sequence is
    ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that may be sent now, and whether a stop sequence was reached."""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """What was held back, at the end of the reply (it did not become a stop sequence)."""
        rest, self._held = self._held, ""
        return rest


# ---- metrics -----------------------------------------------------------------------------------
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/health")


def _fmt(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


class Metrics:
    """Counters and gauges, rendered in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generations = 0
        self.cancelled = 0
        self.last_decode_tps = 0.0
        self.last_ttft = 0.0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.medusa_steps = 0
        self.medusa_tokens = 0
        self.last_accepted_per_step = 0.0
        self.last_kv_compression = 1.0
        self.speculation = Counters()  # over the server's life

    def count_request(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def count_generation(self, stats: GenerationStats, cancelled: bool) -> None:
        with self._lock:
            self.generations += 1
            self.cancelled += cancelled
            self.prompt_tokens += stats.n_prompt_tokens
            self.generated_tokens += stats.n_generated
            if stats.n_generated:
                self.last_ttft = stats.time_to_first_token_s
                self.ttft_sum += stats.time_to_first_token_s
                self.ttft_count += 1
                for i, b in enumerate(TTFT_BUCKETS):
                    if stats.time_to_first_token_s <= b:
                        self.ttft_counts[i] += 1
            if stats.n_generated > 1:
                self.last_decode_tps = stats.decode_tokens_per_s
            self.last_kv_compression = getattr(stats, "kv_compression", 1.0)
            if stats.speculation:
                self.speculation.merge(Counters.from_dict(stats.speculation))
            if stats.steps:
                self.medusa_steps += stats.steps
                self.medusa_tokens += stats.n_generated
                self.last_accepted_per_step = stats.n_generated / stats.steps

    def render(self, *, waiting: int, running: int, model: str | None, decoding: str) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_fmt(v)}" for labels, v in samples)

        with self._lock:
            metric("chatapp_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("chatapp_prompt_tokens_total", "counter", "Prompt tokens of the generations run.",
                   [("", self.prompt_tokens)])
            metric("chatapp_generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("chatapp_generations_total", "counter", "Generations run (including cancelled ones).",
                   [("", self.generations)])
            metric("chatapp_generations_cancelled_total", "counter",
                   "Generations stopped because the client went away.", [("", self.cancelled)])
            metric("chatapp_queue_depth", "gauge", "Requests waiting for the engine.", [("", waiting)])
            metric("chatapp_requests_running", "gauge", "Requests the engine is generating for.", [("", running)])
            metric("chatapp_last_decode_tokens_per_second", "gauge",
                   "Decode rate of the last generation (tokens after the first, per second).",
                   [("", self.last_decode_tps)])
            metric("chatapp_last_time_to_first_token_seconds", "gauge",
                   "Time to first token of the last generation (prefill and first step, without queueing).",
                   [("", self.last_ttft)])
            cumulative = []
            for b, n in zip(TTFT_BUCKETS, self.ttft_counts):
                cumulative.append((f'_bucket{{le="{b}"}}', n))
            metric("chatapp_time_to_first_token_seconds", "histogram",
                   "Time to first token (prefill and first step, without queueing).", [])
            lines.extend(f"chatapp_time_to_first_token_seconds{labels} {n}" for labels, n in cumulative)
            lines.append(f'chatapp_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}')
            lines.append(f"chatapp_time_to_first_token_seconds_sum {_fmt(self.ttft_sum)}")
            lines.append(f"chatapp_time_to_first_token_seconds_count {self.ttft_count}")
            if "medusa" in decoding.split("+"):
                metric("chatapp_medusa_accepted_tokens_per_step", "gauge",
                       "Medusa: tokens accepted per verify step, mean over the last generation.",
                       [("", self.last_accepted_per_step)])
                metric("chatapp_medusa_steps_total", "counter", "Medusa verify steps.", [("", self.medusa_steps)])
            if model is not None and any(p in decoding.split("+") for p in PROPOSERS):
                self._speculation(metric, f'model_name="{_label(model)}"')
            if "dmc" in decoding.split("+"):
                metric("chatapp_last_kv_compression_ratio", "gauge",
                       "DMC: K/V bytes a plain cache would hold over the bytes held, at the end of the last "
                       "generation.", [("", self.last_kv_compression)])
            if model is not None:
                metric("chatapp_model_info", "gauge", "The served model.",
                       [(f'{{model="{_label(model)}",decoding="{decoding}"}}', 1)])
        return "\n".join(lines) + "\n"


    def _speculation(self, metric, label: str) -> None:
        """The speculative-decoding counters under vLLM's names (its dashboards and our own
        remote_metrics read them): drafts are steps that verified drafted tokens; a draft is a tree,
        its draft tokens the tree's nodes."""
        c = self.speculation
        metric("vllm:spec_decode_num_drafts_total", "counter", "Steps that verified drafted tokens.",
               [(f"{{{label}}}", c.drafts)])
        metric("vllm:spec_decode_num_draft_tokens_total", "counter", "Draft tokens verified (tree nodes).",
               [(f"{{{label}}}", c.draft_tokens)])
        metric("vllm:spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.",
               [(f"{{{label}}}", c.accepted_tokens)])
        metric("vllm:spec_decode_num_accepted_tokens_per_pos_total", "counter",
               "Draft tokens accepted, by their position in the draft (0: the first drafted token).",
               [(f'{{{label},position="{k}"}}', n) for k, n in enumerate(c.accepted_per_position)])


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---- the engine thread -----------------------------------------------------------------------
class EngineRunner(Jobs):
    """The jobs of engine.serving.worker.Worker for the server: the worker's job loop runs them one
    at a time on its thread, against the attached session. ``max_queue`` jobs may wait behind the
    running one; a job submitted beyond that is refused with ``QueueFull``. A Job's prompt is token
    ids, and its reply goes to ``job.emit`` as Chunk pieces, then Finished or Failed."""

    def __init__(self, max_queue: int, metrics: Metrics | None = None):
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        super().__init__()  # self.session: an engine.session.Session once attached
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.waiting = 0
        self.running = 0
        self._last_job_s = 1.0
        self._lock = threading.Lock()
        self._worker = Worker(self)

    def attach(self, session) -> None:
        self.session = session

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.session is None:
                raise NotReady("the model is not loaded yet")
            if self.waiting + self.running >= 1 + self.max_queue:
                ahead = self.waiting + self.running
                raise QueueFull(max(1, min(60, math.ceil(ahead * self._last_job_s))))
            self.waiting += 1
        self._worker.submit(job, job.emit, job.cancel)

    def stop(self) -> None:
        self._worker.stop()

    def close(self) -> None:
        """The worker stopped: no more jobs (NotReady). The session stays open: it is the attacher's."""
        self.session = None

    def run(self, job: Job, sink, cancel) -> None:
        """One job, on the worker's thread (``sink`` and ``cancel`` are the job's ``emit`` and ``cancel``)."""
        with self._lock:
            self.waiting -= 1
            self.running += 1
        t0 = time.monotonic()
        try:
            if cancel.is_set():  # the client went away while it waited
                final = Finished("cancelled", len(job.prompt), 0)
            else:
                final = self._reply(job, sink, cancel)
        except BaseException as exc:  # noqa: BLE001 - the engine thread must survive anything
            final = Failed(describe(exc))
        with self._lock:  # the engine is free before the client hears that its request is over
            self.running -= 1
            self._last_job_s = max(0.05, time.monotonic() - t0)
        sink(final)

    def _reply(self, job: Job, sink, cancel) -> Finished:
        matcher = StopMatcher(job.stop)
        finish = None
        for ev in self.session.generate_ids(job.prompt, job.params, cancel):
            if isinstance(ev, Token):
                if finish is not None:
                    continue
                text, stopped = matcher.feed(ev.text)
                if text:
                    sink(Chunk(text))
                if stopped:
                    finish = "stop"
                    cancel.set()  # the engine ends after this step
            elif isinstance(ev, Done):
                cancelled = finish is None and ev.reason == "cancelled"
                if finish is None and not cancelled:
                    if rest := matcher.flush():
                        sink(Chunk(rest))
                    finish = "length" if ev.reason == "length" else "stop"
                self.metrics.count_generation(ev.stats, cancelled)
                return Finished("cancelled" if cancelled else finish, ev.stats.n_prompt_tokens,
                                ev.stats.n_generated, ev.stats)
        raise RuntimeError("the generation ended without a Done event")
