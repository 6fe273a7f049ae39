"""A fake Hugging Face hub for tests, served to huggingface_hub through httpx2.MockTransport.

It answers the requests snapshot_download and HfApi.model_info make:

- GET  /api/models/{repo}[/revision/{rev}]         repo info (sha, siblings; sizes with ?blobs=True)
- GET  /api/models/{repo}/tree/{rev}?recursive=... the file listing
- HEAD /{repo}/resolve/{rev}/{file}                 ETag / X-Repo-Commit / Content-Length; LFS files
                                                    answer 302 to a CDN host with X-Linked-Etag /
                                                    X-Linked-Size, as the hub does
- GET  /{repo}/resolve/{rev}/{file} and the CDN URL the body, with Range support (206)

Repositories can be gated (401 with X-Error-Code: GatedRepo), absent (404 RepoNotFound), and a
file can be made to drop its connection once after some bytes (the client then resumes it with a
Range request). Every request is logged, with the bytes of file content served."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

import httpx2

HUB = "https://huggingface.co"
CDN = "https://cdn-lfs.fake-hub.test"


@dataclass
class Served:
    method: str
    url: str
    range: str | None
    status: int
    body_bytes: int  # file content bytes sent (0 for metadata)
    path: str | None = None  # the repo file, for file content


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    lfs_suffixes: tuple = (".safetensors", ".pt")

    def is_lfs(self, name: str) -> bool:
        return name.endswith(self.lfs_suffixes)

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else hashlib.sha1(data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    # called before a file's body is sent: (repo file, Range header or None); for hooks in tests
    on_file: Callable[[str, str | None], None] | None = None
    drop_once: dict[str, int] = field(default_factory=dict)  # file -> bytes after which the connection drops once
    chunk_size: int = 1024
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo_id: str, files: dict[str, bytes], **kw) -> FakeRepo:
        repo = FakeRepo(repo_id, files, **kw)
        self.repos[repo_id] = repo
        return repo

    # ---- wiring ---------------------------------------------------------------------------------
    def client(self) -> httpx2.Client:
        """A client like huggingface_hub's default one (its request hook refuses requests in
        offline mode), with the fake hub behind it."""
        from huggingface_hub.utils._http import hf_request_event_hook

        return httpx2.Client(transport=httpx2.MockTransport(self.handle), follow_redirects=True,
                             event_hooks={"request": [hf_request_event_hook]})

    def file_bytes(self, name: str | None = None) -> int:
        """File content bytes served (of one file, or all)."""
        return sum(s.body_bytes for s in self.log if name is None or s.path == name)

    def range_requests(self) -> list[Served]:
        return [s for s in self.log if s.range and s.method == "GET"]

    def _record(self, request, status, body_bytes=0, path=None):
        with self.lock:
            self.log.append(Served(request.method, str(request.url), request.headers.get("Range"), status,
                                   body_bytes, path))

    # ---- requests -------------------------------------------------------------------------------
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        path = unquote(url.path)
        if f"{url.scheme}://{url.host}" == CDN:
            repo_id, _, name = path.lstrip("/").partition("/-/")
            return self._content(request, self.repos[repo_id], name)
        if path.startswith("/api/models/"):
            return self._api(request, path[len("/api/models/"):])
        if "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            _rev, _, name = rest.partition("/")
            return self._resolve(request, repo_id, name)
        self._record(request, 404)
        return httpx2.Response(404, json={"error": "not found"})

    def _repo_error(self, request, repo_id) -> httpx2.Response | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._record(request, 404)
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound",
                                                 "X-Error-Message": "Repository not found"},
                                   json={"error": "Repository not found"})
        if repo.gated and not request.headers.get("authorization"):
            self._record(request, 401)
            msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return httpx2.Response(401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": msg},
                                   json={"error": msg})
        return None

    def _split_repo(self, rest: str) -> tuple[str, str]:
        """'owner/name/tail...' -> ('owner/name', 'tail...')"""
        parts = rest.split("/")
        return "/".join(parts[:2]), "/".join(parts[2:])

    def _api(self, request, rest) -> httpx2.Response:
        repo_id, tail = self._split_repo(rest)
        error = self._repo_error(request, repo_id)
        if error is not None:
            return error
        repo = self.repos[repo_id]
        if tail == "" or tail.startswith("revision/"):
            blobs = request.url.params.get("blobs") in ("True", "true", "1")
            siblings = []
            for name, data in repo.files.items():
                s = {"rfilename": name}
                if blobs:
                    s.update(size=len(data), blobId=hashlib.sha1(data).hexdigest())
                    if repo.is_lfs(name):
                        s["lfs"] = {"size": len(data), "sha256": repo.etag(name), "pointerSize": 134}
                siblings.append(s)
            self._record(request, 200)
            return httpx2.Response(200, json={"_id": "x", "id": repo_id, "modelId": repo_id, "sha": repo.sha,
                                              "private": False, "gated": "manual" if repo.gated else False,
                                              "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                                              "siblings": siblings})
        if tail.startswith("tree/"):
            entries = []
            for name, data in repo.files.items():
                e = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                if repo.is_lfs(name):
                    e["lfs"] = {"oid": repo.etag(name), "size": len(data), "pointerSize": 134}
                entries.append(e)
            self._record(request, 200)
            return httpx2.Response(200, json=entries)
        self._record(request, 404)
        return httpx2.Response(404, json={"error": "unknown endpoint"})

    def _resolve(self, request, repo_id, name) -> httpx2.Response:
        error = self._repo_error(request, repo_id)
        if error is not None:
            return error
        repo = self.repos[repo_id]
        if name not in repo.files:
            self._record(request, 404)
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "Entry not found"})
        data = repo.files[name]
        common = {"X-Repo-Commit": repo.sha}
        if repo.is_lfs(name):  # LFS: a redirect to the CDN, the metadata on the redirect itself
            self._record(request, 302)
            return httpx2.Response(302, headers={**common, "Location": f"{CDN}/{repo_id}/-/{name}",
                                                 "X-Linked-Etag": f'"{repo.etag(name)}"',
                                                 "X-Linked-Size": str(len(data)), "ETag": '"pointer"',
                                                 "Content-Length": "0"})
        if request.method == "HEAD":
            self._record(request, 200)
            return httpx2.Response(200, headers={**common, "ETag": f'"{repo.etag(name)}"',
                                                 "Content-Length": str(len(data))})
        return self._content(request, repo, name, common)

    def _content(self, request, repo: FakeRepo, name: str, headers=None) -> httpx2.Response:
        data = repo.files[name]
        headers = dict(headers or {})
        rng = request.headers.get("Range")
        if request.method == "HEAD":
            self._record(request, 200)
            return httpx2.Response(200, headers={**headers, "Content-Length": str(len(data))})
        start, status = 0, 200
        if rng and rng.startswith("bytes="):
            first = rng[len("bytes="):].split("-")[0]
            start = int(first or 0)
            if start >= len(data):
                self._record(request, 416)
                return httpx2.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if self.on_file is not None:
            self.on_file(name, rng)
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        headers["ETag"] = f'"{repo.etag(name)}"'
        drop_after = self.drop_once.pop(name, None)
        record = Served(request.method, str(request.url), rng, status, 0, name)
        with self.lock:
            self.log.append(record)
        hub = self

        def chunks():
            sent = 0
            while sent < len(body):
                if drop_after is not None and sent >= drop_after:
                    raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")
                piece = body[sent:sent + hub.chunk_size]
                sent += len(piece)
                with hub.lock:
                    record.body_bytes += len(piece)
                yield piece

        return httpx2.Response(status, headers=headers, content=chunks())


def install(hub: FakeHub, monkeypatch, tmp_path) -> str:
    """Route huggingface_hub's HTTP through ``hub``, with an empty cache and no token under
    tmp_path; returns the cache folder. monkeypatch undoes it all at the end of the test."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    # the shared client is made from the factory on first use: a fresh one from the fake hub now,
    # and the previous factory and client back afterwards
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", hub.client)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    return str(cache)
