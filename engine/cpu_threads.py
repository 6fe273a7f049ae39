"""How many threads CPU decoding uses, following the machine's load.

Decoding on a CPU is bound by reading the weights, and every layer's operations end in a
barrier of all threads. On a quiet machine all cores are ours and 2 threads beat 1; when another
process competes for the cores, a thread that loses its core holds up every barrier until it
runs again, and the step can cost more than with one thread (llama.cpp's spinning threads fall
to a fraction of their speed that way). So the count is measured while decoding: each
``every`` steps, ``probe`` steps run with the other candidate count, which is kept when its
median step time beats the current count's (over its last ``every`` steps) by ``margin``: a
busy machine's collapse is several-fold, a quiet machine's noise a few tens of percent. A probe
that loses doubles the wait before the next (up to BACKOFF times ``every``: on a quiet machine
the slower probes cost a few percent, not one step in eight); a switch, or a step that takes JUMP
times the recent median (another process just started), brings it back to ``every``, and the
latter starts a probe at once. ``CHATAPP_THREADS`` fixes the count instead (and turns this off)."""

from __future__ import annotations

import os
import statistics

import torch

from engine.errors import EngineError

ENV = "CHATAPP_THREADS"
JUMP = 2.0  # a step this many times the recent median: probe the other count now
BACKOFF = 8  # the longest wait between probes, in units of ``every``


def fixed_threads() -> int | None:
    """The count the user fixed with CHATAPP_THREADS, or None."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise EngineError(f"{ENV}={value!r}: expected a whole number of threads") from None
    if n < 1:
        raise EngineError(f"{ENV}={value!r}: expected at least 1 thread")
    return n


class ThreadTuner:
    """``step(seconds)`` after each decoding step: switches ``torch.set_num_threads`` between the
    candidate counts (all the process's threads, and half of them) as described above."""

    def __init__(self, every: int = 32, probe: int = 4, margin: float = 0.15):
        self.every, self.probe, self.margin = every, probe, margin
        fixed = fixed_threads()
        if fixed is not None:
            torch.set_num_threads(fixed)
        self.most = torch.get_num_threads()
        self.candidates = [] if fixed is not None or self.most < 2 else [self.most, max(1, self.most // 2)]
        self.current = self.most
        self.times: dict[int, list[float]] = {n: [] for n in self.candidates}
        self.steps = 0
        self.wait = every  # steps between the last probe and the next
        self.next_probe = every  # the step count at which the next probe starts
        self.probing: int | None = None  # the count being tried, for ``probe`` steps
        self.switches = 0

    @property
    def active(self) -> bool:
        return bool(self.candidates)

    def step(self, seconds: float) -> None:
        if not self.active:
            return
        n = torch.get_num_threads()
        self.times[n] = (self.times.get(n, []) + [seconds])[-self.every:]
        if self.probing is not None:
            if len(self.times[self.probing]) >= self.probe:
                self._decide()
            return
        self.steps += 1
        recent = self.times[n][:-1]
        jumped = len(recent) >= self.probe and seconds > JUMP * statistics.median(recent)  # contention began
        if jumped:
            self.times[n] = [seconds]  # the machine changed: compare with what the current count does now
        if self.steps >= self.next_probe or jumped:
            self.wait = self.every if jumped else self.wait
            other = next(c for c in self.candidates if c != self.current)
            self.probing = other
            self.times[other] = []
            torch.set_num_threads(other)

    def _decide(self) -> None:
        tried, kept = self.probing, self.current
        recent = self.times[kept]
        if recent and statistics.median(self.times[tried]) < (1 - self.margin) * statistics.median(recent):
            self.current = tried
            self.switches += 1
            self.wait = self.every
        else:
            self.wait = min(2 * self.wait, BACKOFF * self.every)
        self.next_probe = self.steps + self.wait
        self.probing = None
        torch.set_num_threads(self.current)

    def finish(self) -> None:
        """Back to the count in use (a probe interrupted by the end of a reply is dropped)."""
        if self.active and self.probing is not None:
            self.probing = None
            torch.set_num_threads(self.current)
