"""`chatapp pull` / engine.hub.download.pull against a fake Hugging Face hub: progress, the cache
layout resolve() reads, cancel and resume, Range resumes, gated / absent repos, offline mode."""

import _thread
import signal
import threading
from pathlib import Path

import pytest

from engine.hub import download
from engine.hub.download import DownloadCancelled, DownloadProgress, pull
from engine.errors import EngineError

from fakes.hub import FakeHub, install  # noqa: E402

REPO = "acme/tiny-llama"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b'{"eos_token_id": 2}',
    "model-00001-of-00002.safetensors": bytes(range(256)) * 24,  # 6144 bytes
    "model-00002-of-00002.safetensors": b"\x07" * 9000,
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
    "README.md": b"# not fetched\n" * 50,
    "original/consolidated.00.pth": b"\0" * 5000,  # not fetched
}
WANTED = [n for n in FILES if n not in ("README.md", "original/consolidated.00.pth")]
WANTED_BYTES = sum(len(FILES[n]) for n in WANTED)
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    h = FakeHub(chunk_size=512)
    h.add(REPO, dict(FILES))
    h.cache = install(h, monkeypatch, tmp_path)
    return h


def _content_gets(hub, since=0):
    return [s for s in hub.log[since:] if s.path is not None]


def test_pull_downloads_the_engine_files_with_progress(hub, monkeypatch):
    monkeypatch.setattr(download, "MAX_EVENTS_PER_S", 1e9)  # every chunk reported, to check the sums
    events: list[DownloadProgress] = []
    threads = set()

    def on_progress(p):
        events.append(p)
        threads.add(threading.get_ident())

    path = pull(REPO, on_progress)
    assert path.is_dir() and Path(hub.cache) in path.parents
    assert sorted(p.name for p in path.iterdir()) == sorted(WANTED)
    for name in WANTED:
        assert (path / name).read_bytes() == FILES[name]
    # progress: monotone, ends at the total, counts the files
    done = [e.done_bytes for e in events]
    assert done == sorted(done) and len(events) > 10
    last = events[-1]
    assert last.done_bytes == last.total_bytes == WANTED_BYTES
    assert (last.files_done, last.files_total) == (len(WANTED), len(WANTED))
    assert all(e.done_bytes <= WANTED_BYTES for e in events)
    # only what the engine loads came from the hub
    assert sorted({s.path for s in _content_gets(hub)}) == sorted(WANTED)
    assert hub.file_bytes() == WANTED_BYTES
    # resolve() finds it by id, and the model list shows where it is
    from engine.hub import catalog
    from engine.hub.resolve import resolve

    assert resolve(REPO) == (REPO, path)
    listed = {m.id: m for m in catalog.list_models()}[REPO]
    assert listed.downloaded and listed.local_path == str(path)
    # a second pull fetches nothing
    n = len(hub.log)
    assert pull(REPO) == path
    assert _content_gets(hub, n) == []


def test_progress_events_are_rate_limited(hub, monkeypatch):
    events = []
    pull(REPO, events.append)
    # ~10 a second: this download takes well under a second, so the first and the final event
    # and not many in between
    assert 1 <= len(events) <= 5
    assert events[-1].done_bytes == events[-1].total_bytes == WANTED_BYTES


def test_cancel_then_resume_fetches_only_what_is_missing(hub):
    cancel = threading.Event()
    order = []

    def on_file(name, rng):
        order.append(name)
        if name == SHARD2:
            cancel.set()

    hub.on_file = on_file
    events = []
    with pytest.raises(DownloadCancelled) as err:
        pull(REPO, events.append, cancel=cancel, max_workers=1)
    assert str(err.value) == f"download of {REPO} cancelled; run it again to resume"
    assert isinstance(err.value, EngineError)
    snapshot = Path(hub.cache) / "models--acme--tiny-llama" / "snapshots" / hub.repos[REPO].sha
    done_before = {n for n in WANTED if (snapshot / n).exists()}
    assert done_before and SHARD2 in order and SHARD2 not in done_before
    assert not list((Path(hub.cache) / "models--acme--tiny-llama" / "blobs").glob("*.incomplete"))
    # the model is not usable yet, and the list says it is incomplete
    from engine.hub import catalog
    from engine.hub.resolve import resolve

    with pytest.raises(EngineError, match="not downloaded"):
        resolve(REPO)
    assert {m.id: m for m in catalog.list_models()}[REPO].partial
    # run it again: the finished files are not fetched again
    hub.on_file = None
    n = len(hub.log)
    events = []
    path = pull(REPO, events.append, max_workers=1)
    again = {s.path for s in _content_gets(hub, n)}
    assert again == set(WANTED) - done_before
    second_run_bytes = sum(s.body_bytes for s in _content_gets(hub, n))
    assert second_run_bytes == sum(len(FILES[name]) for name in again) < WANTED_BYTES
    for name in WANTED:
        assert (path / name).read_bytes() == FILES[name]
    assert events[-1].done_bytes == events[-1].total_bytes == second_run_bytes
    assert resolve(REPO)[1] == path


def test_a_dropped_connection_resumes_with_a_range_request(hub, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)  # huggingface_hub waits 1 s before it retries
    # huggingface_hub writes in chunks of DOWNLOAD_CHUNK_SIZE (10 MB): small ones for kB files
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1024)
    hub.drop_once[SHARD2] = 4000
    path = pull(REPO, max_workers=2)
    assert (path / SHARD2).read_bytes() == FILES[SHARD2]
    ranges = [s for s in hub.range_requests() if s.path == SHARD2]
    assert len(ranges) == 1
    start = int(ranges[0].range.split("=")[1].split("-")[0])
    assert 4000 <= start < len(FILES[SHARD2]) and ranges[0].status == 206
    # the bytes before the drop were not sent again
    assert hub.file_bytes(SHARD2) == len(FILES[SHARD2])


def test_gated_repo_needs_the_license_and_a_token(hub):
    hub.add("meta-llama/Llama-3.1-8B-Instruct", {"config.json": b"{}", "model.safetensors": b"x" * 100},
            gated=True)
    with pytest.raises(EngineError) as err:
        pull("meta-llama/Llama-3.1-8B-Instruct")
    msg = str(err.value)
    assert msg.startswith("meta-llama/Llama-3.1-8B-Instruct is gated: accept its license at "
                          "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct")
    assert "hf auth login" in msg and "HF_TOKEN" in msg and "\n" not in msg
    # with a token (the fake hub lets any token in) it downloads
    path = pull("meta-llama/Llama-3.1-8B-Instruct", token="hf_test")
    assert (path / "model.safetensors").stat().st_size == 100


def test_hf_token_from_the_environment(hub, monkeypatch):
    hub.add("org/gated", {"config.json": b"{}"}, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert (pull("org/gated") / "config.json").exists()
    assert any(s.status == 200 for s in hub.log)


def test_absent_repo(hub):
    with pytest.raises(EngineError, match=r"nobody/nothing: no such model on the Hugging Face hub"):
        pull("nobody/nothing")


def test_offline_mode(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    n = len(hub.log)
    with pytest.raises(EngineError, match=r"^HF_HUB_OFFLINE is set: cannot download acme/tiny-llama"):
        pull(REPO)
    assert len(hub.log) == n


def test_network_down(hub, monkeypatch):
    import httpx2
    from huggingface_hub.utils import _http

    def down(request):
        raise httpx2.ConnectError("connection refused", request=request)

    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", lambda: httpx2.Client(transport=httpx2.MockTransport(down)))
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    with pytest.raises(EngineError, match=r"cannot reach the Hugging Face hub to download acme/tiny-llama"):
        pull(REPO)


def test_embedded_model_needs_no_download():
    with pytest.raises(EngineError, match="ships with chatapp"):
        pull("SmolLM2-135M-Instruct")


def test_megatron_patterns_fetch_the_pt_checkpoint(hub):
    dmc = "nvidia/Llama-2-7B-DMC-8x"
    hub.add(dmc, {"mp_rank_00/model_optim_rng.pt": b"\x80" * 3000, "latest_checkpointed_iteration.txt": b"release",
                  "README.md": b"readme", "optimizer.bin": b"\0" * 100})
    path = pull(dmc)
    assert (path / "mp_rank_00" / "model_optim_rng.pt").stat().st_size == 3000
    assert not (path / "README.md").exists() and not (path / "optimizer.bin").exists()


# ---- `chatapp pull` ----------------------------------------------------------------------------
@pytest.fixture
def sigint_raises():
    """Python's own Ctrl+C handler (KeyboardInterrupt) for the test, also where SIGINT is ignored
    (tests run as a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_chatapp_pull_draws_progress_and_prints_the_path(hub, capsys):
    from chatapp.cli import main

    assert main(["pull", REPO]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path.is_dir() and (path / "config.json").exists()
    assert err.startswith("\r[") and err.endswith("\n")
    final = err.rstrip("\n").split("\r")[-1]
    assert "100%" in final and "ETA" in final and "/s" in final and f"{len(WANTED)}/{len(WANTED)} files" in final


def test_chatapp_pull_ctrl_c_cancels_cleanly(hub, capsys, sigint_raises):
    from chatapp.cli import main

    def on_file(name, rng):
        if name == SHARD2:
            _thread.interrupt_main()  # what Ctrl+C does

    hub.on_file = on_file
    assert main(["pull", REPO]) == 130
    err = capsys.readouterr().err
    assert f"download of {REPO} cancelled; run it again to resume" in err
    # no download thread is left running (a joined thread may stay listed a moment while it exits)
    assert not [t for t in threading.enumerate() if t.name.startswith("pull ") and t.is_alive()]
    hub.on_file = None
    assert main(["pull", REPO]) == 0


def test_chatapp_pull_errors_are_one_line(hub, capsys):
    from chatapp.cli import main

    assert main(["pull", "nobody/nothing"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatapp: error: nobody/nothing: no such model")


def test_a_repository_file_that_reaches_outside_its_folder_is_refused(hub, tmp_path):
    for name in ("tokenizer/../../../../escaped.json", "tokenizer.json/../../../../../escaped.json"):
        repo = f"evil/repo{len(hub.repos)}"
        hub.add(repo, {"config.json": b"{}", name: b"planted", "model.safetensors": b"\0" * 10})
        with pytest.raises(EngineError) as info:
            pull(repo)
        assert str(info.value) == (f"{repo}: the repository lists a file, {name!r}, whose path reaches outside its "
                                   "folder; refused (nothing was written outside the cache)")
    assert not list(tmp_path.parent.rglob("escaped.json"))


def test_a_snapshot_with_a_link_out_of_its_cache_folder_is_refused(hub, tmp_path):
    path = pull(REPO)
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (path / "tokenizer_config.json").unlink()
    (path / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(EngineError, match=r"tokenizer_config.json in the downloaded snapshot leads outside its cache"):
        pull(REPO)
