"""How sizes and durations are written for people: binary units for memory, decimal units for
downloads (as the hub and download tools state them)."""

from __future__ import annotations


def binary_size(n: float) -> str:
    """Memory: ``1.5 GiB``, ``12.0 KiB``, ``512 B``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def decimal_size(n: float | None) -> str:
    """Downloads: ``9.6 GB``, ``20.0 MB``; ``?`` when unknown."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def duration(s: float | None) -> str:
    """A time left: ``02:05``, ``1h04m``; ``--:--`` when unknown."""
    if s is None:
        return "--:--"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
