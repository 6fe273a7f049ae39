"""The model picker: the catalog and what is in the Hugging Face cache, each with its format, size,
an estimate of the memory it needs and whether that fits this machine; downloads with a live
progress bar; the remote servers of the settings."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, ProgressBar, Select, Static

from engine.hub import layout
from engine.hub.catalog import (DeviceMemory, ModelEntry, ModelRow, device_memory, estimate_for_device,
                                model_rows)
from engine.hub.hf_cache import hub_offline
from engine.errors import EngineError
from engine.events import DEFAULT_CONTEXT, LoadModel
from engine.units import download_size, eta, gib, speed

from chatapp.store.settings import RemoteServer, Settings

FIT_MARK = {"fits": "✓ fits", "tight": "~ tight", "won't fit": "✗ won't fit"}


def model_spec(entry: ModelEntry) -> str | None:
    """What a row's model is loaded as (LoadModel.model): its id; None for the embedded model."""
    return None if entry.source == "embedded" else entry.id


def decodings(entry: ModelEntry) -> list[str]:
    """The decodings the loader accepts for a row's model (engine.hub.layout.decodings): from its
    folder when it is on this machine, else from its catalog format and what chatapp ships for it."""
    return layout.decodings(entry.id, entry.local_path if entry.downloaded else None, entry.format)


class PickerScreen(Screen):
    """Dismissed with (LoadModel, EngineClient | None, remote: bool), or None."""

    BINDINGS = [
        Binding("escape", "back", "Back / cancel download"),
        Binding("ctrl+d", "download", "Download only"),
    ]
    DEFAULT_CSS = """
    PickerScreen #device { padding: 0 1; height: 1; color: $text-muted; }
    PickerScreen #options { height: 3; padding: 0 1; }
    PickerScreen #options Label { padding: 1 1 0 0; }
    PickerScreen #options Select { width: 24; }
    PickerScreen #options Input { width: 12; }
    PickerScreen DataTable { height: 1fr; }
    PickerScreen #detail { height: auto; min-height: 3; padding: 0 1; border-top: solid $panel; }
    PickerScreen #download { height: auto; padding: 0 1; display: none; }
    PickerScreen #download.active { display: block; }
    """

    def __init__(self, settings: Settings, current: LoadModel | None = None, *, online: bool | None = None,
                 device: DeviceMemory | None = None):
        super().__init__()
        self.settings = settings
        self.current = current or LoadModel()
        self.device = device
        # exact sizes from the hub unless told not to ask it
        self.online = online if online is not None else not hub_offline()
        self.rows: dict[str, ModelRow] = {}
        self.remotes: dict[str, RemoteServer] = {f"remote:{r.name}": r for r in settings.remote}
        self.confirm: str | None = None  # a row the user was warned about; Enter again loads it
        self._offered: list[str] | None = None  # the decodings the decoding selector offers now
        self.cancel_download: threading.Event | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="device", markup=False)
        with Horizontal(id="options"):
            yield Label("decoding")
            yield Select([("plain", "plain")], value="plain", allow_blank=False, id="decoding")
            yield Label("weights")
            yield Select([("as stored", "stored"), ("FP8 on load", "fp8"), ("bf16 on load", "bf16")], value="stored",
                         allow_blank=False, id="weights")
            yield Label("context")
            yield Input(str(self.current.context or self.settings.model.context or DEFAULT_CONTEXT), id="context",
                        restrict=r"[0-9]*", compact=True)
        yield DataTable(cursor_type="row", zebra_stripes=True, id="models")
        with Vertical(id="download"):
            yield Label("", id="download-label")
            yield ProgressBar(total=None, show_eta=False, id="download-bar")
        yield Static("", id="detail", markup=False)
        yield Footer()

    @property
    def table(self) -> DataTable:
        return self.query_one("#models", DataTable)

    def on_mount(self) -> None:
        self.title = "models"
        t = self.table
        t.add_columns("model", "format", "params", "download", "memory (est.)", "fit", "on this machine")
        self.refresh_rows()
        t.focus()

    def context(self) -> int | None:
        value = self.query_one("#context", Input).value
        return int(value) if value.isdigit() and int(value) > 0 else None

    def refresh_rows(self) -> None:
        """The rows from the catalog at once, then with the hub's exact sizes when online."""
        self.load_rows(self.context(), online=False)
        if self.online:
            self.load_rows(self.context(), online=True)

    @work(thread=True, group="picker-rows")
    def load_rows(self, context: int | None, online: bool) -> None:
        device = self.device or device_memory()
        rows = model_rows(context, device, online=online)
        self.app.call_from_thread(self.show_rows, device, rows, context)

    def show_rows(self, device: DeviceMemory, rows: list[ModelRow], context: int | None) -> None:
        if context != self.context():
            return  # the context was changed since: newer rows are on their way
        self.device = device  # read once: the estimates for another context reuse it
        free = f"{gib(device.free_bytes)} free of {gib(device.total_bytes)}" if device.total_bytes else "size unknown"
        kind = "RAM" if device.is_cpu else "GPU memory"
        self.query_one("#device", Static).update(f"this machine: {device.name} · {kind} {free} · estimates at "
                                                 f"a context of {context or 'the default'} tokens")
        t = self.table
        keep = t.cursor_row
        t.clear()
        self.rows = {}
        for row in rows:
            e = row.entry
            where = "embedded" if e.source == "embedded" else (
                "downloaded" if e.downloaded else ("partly downloaded" if e.partial else "—"))
            params = f"{e.params_b:g}B" if e.params_b else "?"
            t.add_row(e.id, e.format, params, download_size(row.download_bytes), gib(row.estimate.total_bytes),
                      FIT_MARK.get(row.estimate.verdict, row.estimate.verdict), where, key=e.id)
            self.rows[e.id] = row
        for key, r in self.remotes.items():
            t.add_row(f"{r.name} ({r.url})", "remote server", "", "", "", "server", r.model or "", key=key)
        if t.row_count:
            t.move_cursor(row=min(keep, t.row_count - 1))
        self.show_detail()

    @on(Input.Changed, "#context")
    def _context_changed(self) -> None:
        """New estimates for the rows shown (no new look at the cache, the hub or the device)."""
        context = self.context()
        if not context:
            return
        if self.rows and self.device is not None:
            rows = [replace(r, estimate=estimate_for_device(r.entry, context, self.device))
                    for r in self.rows.values()]
            self.show_rows(self.device, rows, context)
        else:  # the first rows are still on their way, for the context as it was
            self.load_rows(context, online=False)

    def selected(self) -> str | None:
        t = self.table
        if not t.row_count:
            return None
        return t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value

    @on(DataTable.RowHighlighted)
    def show_detail(self) -> None:
        self.confirm = None
        key = self.selected()
        detail = self.query_one("#detail", Static)
        decoding = self.query_one("#decoding", Select)
        if key in self.remotes:
            r = self.remotes[key]
            detail.update(f"{r.name}: an OpenAI-compatible server at {r.url}"
                          + (f", model {r.model}" if r.model else "")
                          + (f", API key from ${r.api_key_env}" if r.api_key_env else ""))
            decoding.set_options([("plain", "plain")])
            self._offered = ["plain"]
            return
        row = self.rows.get(key)
        if row is None:
            detail.update("")
            return
        options = decodings(row.entry)
        if self._offered != options:  # a new row's decodings (setting them anew would reset the choice)
            self._offered = options
            decoding.set_options([(d, d) for d in options])
            decoding.value = self.current.decoding if self.current.decoding in options else options[0]
        self._show_estimate(row)

    def _show_estimate(self, row: ModelRow) -> None:
        """The highlighted model's estimate for the set-up chosen above the table: a DMC cache's
        compression and FP8 weights applied."""
        setup, weights = str(self.query_one("#decoding", Select).value), self.query_one("#weights", Select).value
        est = row.estimate if self.device is None else estimate_for_device(
            row.entry, self.context(), self.device, setup, self._quantize(weights))
        named = {"fp8": ", FP8 weights", "bf16": ", bf16 weights"}.get(str(weights), "")
        breakdown = (f"{setup}{named}: weights {gib(est.weights_bytes)} + "
                     f"KV cache {gib(est.kv_bytes)} + overhead {gib(est.overhead_bytes)} = {gib(est.total_bytes)}")
        gated = " · gated: needs a Hugging Face token" if row.entry.gated else ""
        self.query_one("#detail", Static).update(f"{row.entry.description}{gated}\n{est.verdict}: {est.reason}\n"
                                                 f"{breakdown}")

    @staticmethod
    def _quantize(weights) -> str | None:
        """The weights selector's value as LoadModel.quantize: None for the stored weights."""
        return None if weights == "stored" else str(weights)

    @on(Select.Changed)
    def _setup_changed(self) -> None:
        row = self.rows.get(self.selected())
        if row is not None:
            self._show_estimate(row)

    # ---- loading and downloading ----------------------------------------------------------------
    def request_for(self, row: ModelRow) -> LoadModel:
        e = row.entry
        weights = self.query_one("#weights", Select).value
        return LoadModel(model=model_spec(e), device=self.current.device,
                         context=self.context(), quantize=self._quantize(weights),
                         decoding=str(self.query_one("#decoding", Select).value))

    @on(DataTable.RowSelected)
    def action_choose(self) -> None:
        """Enter on a row: load it (downloading it first when it is not on this machine)."""
        key = self.selected()
        if key is None or self.cancel_download is not None:
            return
        if key in self.remotes:
            self.connect_remote(self.remotes[key])
            return
        row = self.rows[key]
        est = row.estimate
        detail = self.query_one("#detail", Static)
        if row.entry.multi_gpu:
            detail.update(f"{row.entry.id} does not run on one GPU.\n{est.reason}")
            return
        if est.verdict == "won't fit" and self.confirm != key:
            self.confirm = key
            detail.update(f"won't fit: {est.reason}\nEnter again loads it anyway; Esc goes back.")
            return
        if row.entry.source == "embedded" or row.entry.downloaded:
            self.dismiss((self.request_for(row), None, False))
        else:
            self.download(row, then_load=True)

    def action_download(self) -> None:
        key = self.selected()
        if key in self.rows and self.cancel_download is None:
            row = self.rows[key]
            if row.entry.source != "embedded" and not row.entry.multi_gpu:
                self.download(row, then_load=False)

    def action_back(self) -> None:
        if self.cancel_download is not None:
            self.cancel_download.set()
        else:
            self.dismiss(None)

    @work(thread=True, exclusive=True, group="download")
    def download(self, row: ModelRow, then_load: bool) -> None:
        from engine.hub.download import pull

        cancel = self.cancel_download = threading.Event()
        repo = row.entry.repo_id
        self.app.call_from_thread(self._download_started, repo)
        try:
            pull(repo, lambda p: self.app.call_from_thread(self._download_progress, repo, p), cancel)
        except EngineError as e:
            self.app.call_from_thread(self._download_ended, str(e), None)
            return
        finally:
            self.cancel_download = None
        self.app.call_from_thread(self._download_ended, f"{repo}: downloaded",
                                  self.request_for(row) if then_load else None, True)

    def _download_started(self, repo: str) -> None:
        self.query_one("#download").add_class("active")
        self.query_one("#download-label", Label).update(f"downloading {repo}… (Esc cancels; it resumes later)")
        self.query_one("#download-bar", ProgressBar).update(total=None, progress=0)

    def _download_progress(self, repo: str, p) -> None:
        bar = self.query_one("#download-bar", ProgressBar)
        bar.update(total=max(p.total_bytes, 1), progress=p.done_bytes)
        self.query_one("#download-label", Label).update(
            f"downloading {repo}: {download_size(p.done_bytes)} of {download_size(p.total_bytes)} · "
            f"{speed(p.bytes_per_s)} · {eta(p.eta_s)} · file {p.files_done}/{p.files_total}")

    def _download_ended(self, message: str, load: LoadModel | None, ok: bool = False) -> None:
        self.query_one("#download").remove_class("active")
        if load is not None:
            self.dismiss((load, None, False))
        elif ok:
            self.load_rows(self.context(), online=False)  # the row now says it is on this machine
        self.query_one("#detail", Static).update(message)

    def connect_remote(self, server: RemoteServer) -> None:
        from engine.serving.client import EngineClient
        from engine.serving.remote import RemoteWorker

        key = os.environ.get(server.api_key_env) if server.api_key_env else None
        try:
            client = EngineClient(RemoteWorker(server.url, key))
        except EngineError as e:
            self.query_one("#detail", Static).update(str(e))
            return
        self.dismiss((LoadModel(model=server.model), client, True))
