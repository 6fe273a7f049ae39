"""Memory figures for the stats: device memory on CUDA, process memory on CPU."""

from __future__ import annotations

import os
import resource

import torch

from engine.hub.catalog import ram


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def in_use(device: torch.device) -> tuple[int, int]:
    """(bytes in use, bytes in total) on the device: on CUDA what torch holds and the GPU's size;
    on CPU this process's resident memory and the machine's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return torch.cuda.memory_reserved(device), total
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return rss_pages * _page_size(), os.sysconf("SC_PHYS_PAGES") * _page_size()


def free(device: torch.device) -> int:
    """Bytes that can still be allocated: free GPU memory on CUDA, the machine's available memory
    (MemAvailable) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = ram().free_bytes
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * _page_size()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    """Peak bytes allocated by torch on CUDA since reset_peak; peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
