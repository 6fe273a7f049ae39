"""The CPU thread count follows the machine's load: measured while decoding, the faster count
is kept (engine/cpu_threads.py)."""

import pytest
import torch

from engine.cpu_threads import ThreadTuner
from engine.errors import EngineError


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def decode(tuner: ThreadTuner, cost: dict[int, float], steps: int) -> list[int]:
    """Steps of a machine where a step with n threads takes cost[n] seconds; the counts used."""
    used = []
    for _ in range(steps):
        n = torch.get_num_threads()
        used.append(n)
        tuner.step(cost[n])
    return used


def test_a_quiet_machine_keeps_every_thread_and_probes_less_and_less(two_threads):
    tuner = ThreadTuner(every=10, probe=3)
    used = decode(tuner, {2: 0.010, 1: 0.016}, 100)
    assert used[-1] == 2 and tuner.switches == 0
    assert used.count(1) == 3 * 3  # probes after 10, 20 and 40 more steps
    used = decode(tuner, {2: 0.010, 1: 0.016}, 400)
    assert used.count(1) <= 3 * 5  # then every 80 (BACKOFF * every) at most


def test_a_busy_machine_drops_to_one_thread_and_comes_back_when_quiet(two_threads):
    tuner = ThreadTuner(every=10, probe=3)
    used = decode(tuner, {2: 0.060, 1: 0.016}, 40)  # another process holds a core: 2 threads stall
    assert tuner.current == 1 and used[-10:].count(1) >= 7  # 2 threads only while probing
    used = decode(tuner, {2: 0.010, 1: 0.016}, 100)  # quiet again: found at the next probe
    assert tuner.current == 2 and used[-10:].count(2) >= 7


def test_chatapp_threads_fixes_the_count(two_threads, monkeypatch):
    monkeypatch.setenv("CHATAPP_THREADS", "1")
    tuner = ThreadTuner(every=5, probe=2)
    assert not tuner.active and torch.get_num_threads() == 1
    assert decode(tuner, {1: 0.05, 2: 0.01}, 20) == [1] * 20
    monkeypatch.setenv("CHATAPP_THREADS", "two")
    with pytest.raises(EngineError, match="CHATAPP_THREADS='two'"):
        ThreadTuner()


def test_a_sudden_slowdown_is_probed_at_once(two_threads):
    tuner = ThreadTuner(every=1000, probe=3)  # no probe on the schedule
    decode(tuner, {2: 0.010, 1: 0.016}, 20)
    assert tuner.current == 2
    used = decode(tuner, {2: 0.060, 1: 0.016}, 10)  # another process took a core
    assert tuner.current == 1 and used[-5:] == [1] * 5
