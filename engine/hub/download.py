"""Downloading models from the Hugging Face hub into its cache (HF_HOME / HF_HUB_CACHE), through
huggingface_hub.snapshot_download, with byte-level progress over all files, cancellation, and
one-line errors.

Only the files the engine loads are fetched (engine.hub.hf_cache.allow_patterns). Files already
in the cache are not fetched again, so a download that was cancelled or cut off continues where it
stopped when it is run again: the finished files stay in the cache, and within a run
huggingface_hub resumes a file whose connection dropped with an HTTP Range request. (A file that
was partly written when the run was cancelled starts over: huggingface_hub writes each file to a
temporary file of its own and drops it when the download fails.)

The hub token: ``token`` when given, else what huggingface_hub finds itself (HF_TOKEN, or the one
``hf auth login`` stored)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.errors import EngineError
from engine.hub.catalog import find
from engine.hub.hf_cache import allow_patterns, hub_offline, inside_its_cache_folder

MAX_EVENTS_PER_S = 10
SPEED_WINDOW_S = 3.0


@dataclass(frozen=True)
class DownloadProgress:
    done_bytes: int
    total_bytes: int  # of the files being fetched in this run (grows as files start; cached files not counted)
    bytes_per_s: float
    eta_s: float | None  # None while the speed is unknown
    files_done: int  # including the files that were already in the cache
    files_total: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.done_bytes / self.total_bytes) if self.total_bytes else 0.0


class DownloadCancelled(EngineError):
    """The download was cancelled (the cancel event, or Ctrl+C); running it again resumes it."""

    def __init__(self, repo_id: str):
        super().__init__(f"download of {repo_id} cancelled; run it again to resume")
        self.repo_id = repo_id


class _Stop(Exception):
    """Raised inside huggingface_hub's download threads to stop them."""


class _Tracker:
    """Sums the bytes of every file being downloaded (several threads) and reports them to
    ``on_progress`` at most MAX_EVENTS_PER_S times a second."""

    def __init__(self, on_progress: Callable[[DownloadProgress], None] | None, cancel: threading.Event):
        self.on_progress = on_progress
        self.cancel = cancel
        self.lock = threading.RLock()
        self.done = self.total = self.files_done = self.files_total = 0
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0

    def check(self) -> None:
        if self.cancel.is_set():
            raise _Stop()

    def add_total(self, n: int) -> None:
        with self.lock:
            self.total += n
            self._emit()

    def add_done(self, n: int) -> None:
        self.check()
        with self.lock:
            self.done += n
            self._emit()

    def add_file(self, n: int = 1) -> None:
        self.check()
        with self.lock:
            self.files_done += n
            self._emit()

    def set_files_total(self, n: int) -> None:
        with self.lock:
            self.files_total = n
            self._emit(force=True)

    def progress(self) -> DownloadProgress:
        now = time.monotonic()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > SPEED_WINDOW_S:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        speed = (self.done - d0) / (now - t0) if now - t0 > 0.05 else 0.0
        left = max(0, self.total - self.done)
        eta = left / speed if speed > 0 else (0.0 if left == 0 and self.total else None)
        return DownloadProgress(self.done, max(self.total, self.done), speed, eta, self.files_done,
                                self.files_total)

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is None or (not force and now - self.last_emit < 1.0 / MAX_EVENTS_PER_S):
            return
        self.last_emit = now
        self.on_progress(self.progress())

    def finish(self) -> None:
        with self.lock:
            self.total = max(self.total, self.done)
            self.files_done = max(self.files_done, self.files_total)
            self._emit(force=True)


def _bar_class(tracker: _Tracker) -> type:
    """A tqdm stand-in for snapshot_download's ``tqdm_class``. snapshot_download makes three bars
    with it: the file count ("Fetching N files", no unit), the bytes written (unit "B"; each file's
    size is added to its ``total`` as the file starts, each chunk to ``update``) and the bytes
    received from the network (the same bytes for plain HTTP downloads; not counted twice)."""

    class Bar:
        def __init__(self, *args, **kwargs):
            self._total = kwargs.get("total") or 0
            self.n = kwargs.get("initial") or 0
            self.desc = kwargs.get("desc") or ""
            bar_format = kwargs.get("bar_format") or ""
            if kwargs.get("unit", "it") != "B":
                self.kind = "files"
                tracker.set_files_total(int(self._total))
            elif bar_format and "total_fmt" not in bar_format:
                self.kind = "transfer"
            else:
                self.kind = "bytes"
                if self._total:
                    tracker.add_total(int(self._total))
                if self.n:
                    tracker.add_done(int(self.n))

        @property
        def total(self):
            return self._total

        @total.setter
        def total(self, value):
            value = value or 0
            if self.kind == "bytes" and value > self._total:
                tracker.add_total(int(value - self._total))
            self._total = value

        def update(self, n=1):
            n = n or 0
            self.n += n
            if self.kind == "bytes":
                tracker.add_done(int(n))
            elif self.kind == "files":
                tracker.add_file(int(n))
            else:
                tracker.check()

        @property
        def format_dict(self):
            return {"rate": None, "n": self.n, "total": self._total}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def refresh(self, *args, **kwargs):
            pass

        def set_description(self, *args, **kwargs):
            pass

        def set_description_str(self, *args, **kwargs):
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

        def set_postfix(self, *args, **kwargs):
            pass

    return Bar


def _error(repo_id: str, e: BaseException) -> EngineError:
    """A one-line EngineError for what snapshot_download raised."""
    import httpx2  # here, as in pull: the hub client's packages load only when a download runs
    from huggingface_hub import errors as hf

    chain, cur = [], e
    while cur is not None and len(chain) < 6:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__

    def first(*types):
        return next((x for x in chain if isinstance(x, types)), None)

    login = "`hf auth login`, or HF_TOKEN=..."
    if first(hf.GatedRepoError):
        return EngineError(f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, "
                           f"then give a token ({login})")
    if first(hf.RevisionNotFoundError):
        return EngineError(f"{repo_id}: the revision asked for does not exist on the Hugging Face hub")
    if first(hf.DisabledRepoError):
        return EngineError(f"{repo_id}: the repository is disabled on the Hugging Face hub")
    if first(hf.RepositoryNotFoundError):
        return EngineError(f"{repo_id}: no such model on the Hugging Face hub (if it is private, give a token: "
                           f"{login})")
    if first(hf.OfflineModeIsEnabled) or hub_offline():
        return EngineError(f"HF_HUB_OFFLINE is set: cannot download {repo_id} (it is not complete in the cache "
                           "either); unset HF_HUB_OFFLINE to download it")
    http = first(hf.HfHubHTTPError)
    if http is not None and getattr(http, "response", None) is not None:
        status = http.response.status_code
        if status in (401, 403):
            return EngineError(f"{repo_id}: the hub refused access (HTTP {status}); check the token ({login})")
        return EngineError(f"downloading {repo_id} failed: HTTP {status} from the hub; run it again to resume")
    net = first(httpx2.TransportError, ConnectionError, TimeoutError)
    if net is not None or isinstance(e, hf.LocalEntryNotFoundError):
        why = f" ({type(net).__name__}: {str(net).splitlines()[0] if str(net) else ''})" if net is not None else ""
        return EngineError(f"cannot reach the Hugging Face hub to download {repo_id}{why}; check the network "
                           "(or HF_ENDPOINT), then run it again to resume")
    if isinstance(e, ValueError) and "Invalid filename" in str(e):  # huggingface_hub's path-traversal check
        name = str(e).split("'")[1] if str(e).count("'") >= 2 else "?"
        return EngineError(f"{repo_id}: the repository lists a file, {name!r}, whose path reaches outside its "
                           "folder; refused (nothing was written outside the cache)")
    if isinstance(e, OSError):
        return EngineError(f"downloading {repo_id}: {type(e).__name__}: {e}")
    return EngineError(f"downloading {repo_id} failed: {type(e).__name__}: {e}")


def pull(repo_id: str, on_progress: Callable[[DownloadProgress], None] | None = None,
         cancel: threading.Event | None = None, token: str | None = None, *, cache_dir: str | Path | None = None,
         revision: str | None = None, max_workers: int = 8) -> Path:
    """Download ``repo_id``'s checkpoint files into the Hugging Face cache and return its snapshot
    folder. ``on_progress`` gets a DownloadProgress at most 10 times a second (from the download
    threads) and once at the end. Setting ``cancel``, or Ctrl+C in the calling thread, stops the
    download threads and raises DownloadCancelled; other failures raise a one-line EngineError."""
    from huggingface_hub import snapshot_download  # here: the UI imports this module, and not the hub client

    entry = find(repo_id)
    if entry is not None and entry.source == "embedded" and repo_id.lower() == entry.id.lower():
        raise EngineError(f"{entry.id} ships with chatapp: there is nothing to download")
    repo = repo_id
    cancel = cancel or threading.Event()
    tracker = _Tracker(on_progress, cancel)
    outcome: dict = {}

    def work():
        try:
            outcome["path"] = snapshot_download(
                repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns(entry and entry.format),
                token=token, max_workers=max_workers, tqdm_class=_bar_class(tracker))
        except BaseException as e:  # handed to the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=work, name=f"pull {repo}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        cancel.set()
        thread.join()
        raise DownloadCancelled(repo) from None
    error = outcome.get("error")
    if error is not None:
        if cancel.is_set():
            raise DownloadCancelled(repo) from None
        raise _error(repo, error) from error
    tracker.finish()
    return inside_its_cache_folder(repo, Path(outcome["path"]))

