"""The stats panel: what the running reply costs, live from the engine's Step events.

Accepted tokens per step as a sparkline (1 every step for plain decoding, more with Medusa),
decode speed, time to first token, memory in use against the device's total, the KV cache's
size with its compression against a plain cache (DMC), and, when the decoding speculates, the share
of the tokens that arrived as accepted drafts, per proposer, and the acceptance rate by draft
position. Repainted at most ``FPS`` times a second
whatever the rate of events."""

from __future__ import annotations

import time
from collections import deque

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Label, Sparkline, Static

from engine.units import binary_size

FPS = 8
HISTORY = 64  # steps shown in the sparkline
POSITIONS = 5  # draft positions whose acceptance is shown
BAR = 24  # cells of the memory bar


def bar(used: float, total: float, cells: int = BAR) -> str:
    """A text bar (readable in a terminal capture), e.g. ``█████░░░░░``."""
    filled = round(cells * min(max(used / total, 0.0), 1.0)) if total > 0 else 0
    return "█" * filled + "░" * (cells - filled)


class StatsPanel(Vertical):
    """Live figures of the reply being generated, and the last reply's once it is done."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.accepted: deque[int] = deque(maxlen=HISTORY)
        self.fields: dict[str, str] = {}
        self._dirty = False
        self._timer: Timer | None = None
        self._started = 0.0
        self.tokens = self.from_drafts = 0  # tokens of the running reply, and those that were accepted drafts
        self.drafted: dict[str, int] = {}  # ... by proposer (a token both drafted counts for both)

    def compose(self) -> ComposeResult:
        yield Label("tokens per step", classes="stats-heading")
        yield Sparkline([], summary_function=max, id="accepted")
        yield Static("", id="figures", markup=False)

    def on_mount(self) -> None:
        self.border_title = "stats"
        self._timer = self.set_interval(1 / FPS, self._paint, pause=True)
        self._paint_now()

    # ---- what the chat screen calls ----------------------------------------------------------
    def reply_started(self) -> None:
        self.accepted.clear()
        self._started = time.monotonic()
        self.tokens = self.from_drafts = 0
        self.drafted = {}
        self.fields.update({"speed": "", "ttft": "", "steps": "", "drafted": "", "drafted_by": "", "positions": ""})
        self._changed()

    def token(self, ev) -> None:
        """One engine Token event: which of its tokens were accepted drafts, and whose."""
        self.tokens += len(ev.token_ids)
        for src in ev.drafted_by:
            self.from_drafts += bool(src)
            for name in filter(None, src.split("+")):
                self.drafted[name] = self.drafted.get(name, 0) + 1
        if self.from_drafts:
            self._drafted_fields(self.from_drafts, self.drafted, self.tokens)
            self._changed()

    def _drafted_fields(self, from_drafts: int, by: dict[str, int], tokens: int) -> None:
        self.fields["drafted"] = f"{from_drafts / tokens:.0%} of {tokens} tokens"
        self.fields["drafted_by"] = " · ".join(f"{name} {n / tokens:.0%}" for name, n in sorted(by.items())) \
            if len(by) > 1 else ""

    def first_token(self) -> None:
        if self._started and not self.fields.get("ttft"):
            self.fields["ttft"] = f"{time.monotonic() - self._started:.2f} s"
            self._changed()

    def step(self, ev) -> None:
        """One engine Step event."""
        self.accepted.append(ev.accepted)
        n = len(self.accepted)
        self.fields["speed"] = f"{ev.tok_per_s:.1f} tok/s"
        self.fields["steps"] = f"{sum(self.accepted) / n:.2f} mean of last {n}"
        if ev.vram_total:
            self.fields["memory"] = f"{binary_size(ev.vram_used)} / {binary_size(ev.vram_total)}"
            self.fields["memory_bar"] = bar(ev.vram_used, ev.vram_total)
        if ev.kv_bytes:
            dense = ev.kv_bytes_dense or ev.kv_bytes
            self.fields["kv"] = binary_size(ev.kv_bytes) + (
                f" ({dense / ev.kv_bytes:.1f}x smaller than {binary_size(dense)})" if dense > ev.kv_bytes else "")
        self._changed()

    def finished(self, stats) -> None:
        """The reply's Done: the engine's own figures replace the live ones."""
        self.fields["speed"] = f"{stats.decode_tokens_per_s:.1f} tok/s"
        self.fields["ttft"] = f"{stats.time_to_first_token_s:.2f} s"
        if stats.steps:
            self.fields["steps"] = f"{stats.n_generated / stats.steps:.2f} mean over {stats.steps} steps"
        if stats.kv_cache_bytes:
            self.fields["kv"] = binary_size(stats.kv_cache_bytes) + (
                f" ({stats.kv_compression:.1f}x smaller)" if stats.kv_compression > 1.0 else "")
        self.fields["peak"] = binary_size(stats.peak_memory_bytes)
        spec = getattr(stats, "speculation", None)
        if spec and spec.get("tokens"):
            self._drafted_fields(spec["accepted_tokens"], spec["by_proposer"], spec["tokens"])
            self.fields["positions"] = " ".join(f"{a:.2f}" for a in spec["acceptance_by_position"][:POSITIONS])
        self._paint_now()

    def model_loaded(self, info) -> None:
        self.fields["model"] = info.name
        self.fields["decoding"] = info.decoding + (f" · {info.medusa_tree}" if info.medusa_tree else "") + (
            f" · {info.quantization}" if info.quantization else "")
        self.fields["weights"] = binary_size(info.weight_bytes) if info.weight_bytes else ""
        self._paint_now()

    # ---- painting ------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The figures as last painted."""
        return str(self.query_one("#figures", Static).content)

    def _changed(self) -> None:
        if not self._dirty and self._timer is not None:
            self._dirty = True
            self._timer.resume()

    def _paint(self) -> None:
        if self._timer is not None:
            self._timer.pause()
        self._paint_now()

    def _paint_now(self) -> None:
        self._dirty = False
        if not self.is_mounted:
            return
        self.query_one("#accepted", Sparkline).data = list(self.accepted)
        f = self.fields
        lines = [
            ("decoding", f.get("decoding", "")),
            ("tokens/step", f.get("steps", "")),
            ("drafted", f.get("drafted", "")),
            ("", f.get("drafted_by", "")),
            ("by position", f.get("positions", "")),
            ("speed", f.get("speed", "")),
            ("first token", f.get("ttft", "")),
            ("memory", f.get("memory", "")),
            ("", f.get("memory_bar", "")),
            ("peak", f.get("peak", "")),
            ("KV cache", f.get("kv", "")),
            ("weights", f.get("weights", "")),
        ]
        self.query_one("#figures", Static).update("\n".join(f"{k:<12}{v}" for k, v in lines if v))
