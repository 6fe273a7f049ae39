"""How sizes, rates and durations are written for people, in one place: binary units for memory,
decimal units for downloads (as the hub and download tools state them)."""

from __future__ import annotations


def _scaled(n: float, units: tuple[tuple[str, float], ...]) -> str:
    """``n`` in the largest of ``units`` (largest first) it reaches, one decimal; else in bytes."""
    for unit, size in units:
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def binary_size(n: float) -> str:
    """Memory: ``1.5 GiB``, ``12.0 KiB``, ``512 B``."""
    return _scaled(n, (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)))


def decimal_size(n: float | None) -> str:
    """Downloads: ``9.6 GB``, ``20.0 MB``; ``?`` when unknown."""
    if n is None:
        return "?"
    return _scaled(n, (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)))


def duration(s: float | None) -> str:
    """A time left: ``02:05``, ``1h04m``; ``--:--`` when unknown."""
    if s is None:
        return "--:--"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def gib(n: float | None) -> str:
    """A memory estimate, always in GiB: ``15.2 GiB``; ``?`` when unknown."""
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def gb(n: float) -> str:
    """A weights' size in GB, whole from 10 GB: ``16 GB``, ``8.5 GB``."""
    return f"{n / 1e9:.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"


def download_size(n: int | None) -> str:
    """A download's size: ``9.6 GB``, ``270 MB``; ``—`` for nothing, ``?`` when unknown."""
    if n is None:
        return "?"
    if n == 0:
        return "—"
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def speed(bytes_per_s: float) -> str:
    """A download rate: ``12.5 MB/s``."""
    return f"{bytes_per_s / 1e6:.1f} MB/s"


def eta(eta_s: float | None) -> str:
    """A download's time left: ``ETA 2:05``; ``ETA ?`` when unknown."""
    if eta_s is None:
        return "ETA ?"
    m, s = divmod(int(eta_s), 60)
    return f"ETA {m}:{s:02d}"
