"""Workers: what owns the model and the device and runs requests in order.

- ``Worker`` runs them on a thread of this process (the CLI's and the tests' choice).
- ``ProcessWorker`` runs them in a child process (the chat screen's choice): the engine does not
  compete with the UI for Python's GIL, and a crash of the engine (a CUDA error, the OOM killer)
  does not take the UI down; the next request starts a fresh process.

Both take ``submit(request, sink, cancel)`` with ``cancel = worker.make_cancel()``. Every
exception becomes an ``Error`` event; nothing raised here reaches the front end."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable

from engine.errors import EngineError
from engine.events import Done, Error, Event, Generate, LoadModel, Loaded, Progress
from engine.paths import cache_dir

Sink = Callable[[Event], None]


def describe(exc: BaseException) -> str:
    """One line for the user."""
    if isinstance(exc, EngineError):
        return str(exc)
    text = str(exc).lower()  # a GPU's "CUDA out of memory", the CPU allocator's "can't allocate memory"
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return f"out of memory: {' '.join(str(exc).split())[:200]}"
    return f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


class Jobs:
    """Runs one request against the loaded session; shared by both workers."""

    def __init__(self):
        self.session = None  # engine.session.Session once a model is loaded

    def run(self, request, sink: Sink, cancel) -> None:
        try:
            if isinstance(request, LoadModel):
                self._load(request, sink)
            elif cancel.is_set():
                sink(Error("cancelled before it started"))
            else:
                self._generate(request, sink, cancel)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            if not isinstance(exc, EngineError):
                traceback.print_exc()
            sink(Error(describe(exc)))

    def _load(self, request: LoadModel, sink: Sink) -> None:
        from engine.session import Session  # torch is imported here, not where the UI imports this module

        self.close()  # free the old model before loading the next one
        self.session = Session.load(request, lambda msg: sink(Progress(msg)))
        sink(Loaded(self.session.info()))

    def _generate(self, request: Generate, sink: Sink, cancel) -> None:
        if self.session is None:
            raise EngineError("no model is loaded")
        for event in self.session.generate(request.messages, request.params, cancel):
            sink(event)
            if isinstance(event, Done):
                return

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class Worker:
    """Requests run in order on one thread of this process, by ``jobs`` (default: a Jobs, the
    local engine); when the worker stops, ``jobs.close()`` frees what they hold."""

    def __init__(self, jobs: Jobs | None = None):
        self.jobs = jobs or Jobs()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="chatapp-engine", daemon=True)
        self._thread.start()

    @property
    def session(self):
        return self.jobs.session

    @session.setter
    def session(self, value) -> None:
        self.jobs.session = value

    def make_cancel(self) -> threading.Event:
        return threading.Event()

    def submit(self, request: LoadModel | Generate, sink: Sink, cancel) -> None:
        self._queue.put((request, sink, cancel))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self.jobs.run(*job)
        self.jobs.close()


# ---- the engine in a child process ----------------------------------------------------------
_SLOTS = 4096  # cancel flags, indexed by job number modulo this


class _Flag:
    """A cancel flag in shared memory, usable from both processes (like threading.Event)."""

    def __init__(self, flags, index: int):
        self._flags, self._index = flags, index % _SLOTS

    def set(self) -> None:
        self._flags[self._index] = 1

    def clear(self) -> None:
        self._flags[self._index] = 0

    def is_set(self) -> bool:
        return bool(self._flags[self._index])


def _serve(requests, events, flags, log_path: str) -> None:
    """The child process: run jobs until told to stop. Its stderr goes to a log file: it shares
    the terminal with the UI, which owns the screen."""
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    jobs = Jobs()
    parent = os.getppid()
    while True:
        try:
            job = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the UI was killed (kill -9): nobody to answer to
                break
            continue
        if job is None:
            break
        job_id, request = job
        jobs.run(request, lambda ev, j=job_id: events.put((j, ev)), _Flag(flags, job_id))
        events.put((job_id, None))  # the job is over
    jobs.close()


class ProcessWorker:
    def __init__(self):
        self._ctx = mp.get_context("spawn")  # never fork a process that holds threads or CUDA state
        self._flags = self._ctx.Array("b", _SLOTS, lock=False)
        self._ids = itertools.count(1)
        self._sinks: dict[int, Sink] = {}
        self._lock = threading.Lock()
        self._proc = None
        self._start()

    def _start(self) -> None:
        self._requests = self._ctx.Queue()
        self._events = self._ctx.Queue()
        log = cache_dir() / "engine.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._proc = self._ctx.Process(target=_serve, args=(self._requests, self._events, self._flags, str(log)),
                                       name="chatapp-engine", daemon=True)
        self._proc.start()
        threading.Thread(target=self._read, args=(self._proc, self._events), daemon=True).start()

    def make_cancel(self) -> _Flag:
        job_id = next(self._ids)
        flag = _Flag(self._flags, job_id)
        flag.clear()
        flag.job_id = job_id
        return flag

    def submit(self, request, sink: Sink, cancel: _Flag) -> None:
        with self._lock:
            if not self._proc.is_alive():
                self._start()
            self._sinks[cancel.job_id] = sink
            self._requests.put((cancel.job_id, request))

    def _read(self, proc, events) -> None:
        while True:
            try:
                job_id, ev = events.get(timeout=0.5)
            except queue.Empty:
                if proc.is_alive():
                    continue
                self._orphaned(f"the engine process stopped (exit code {proc.exitcode})")
                return
            except (EOFError, OSError):
                return
            if ev is None:
                with self._lock:
                    self._sinks.pop(job_id, None)
            elif (sink := self._sinks.get(job_id)) is not None:
                sink(ev)

    def _orphaned(self, message: str) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(Error(message))

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._requests.put(None)
            self._proc.join(timeout=2)
            if self._proc.is_alive():
                self._proc.terminate()
