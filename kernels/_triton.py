"""Triton, where it is installed (it comes with PyTorch's CUDA builds; CPU-only installs may
lack it), and the dispatch rule: Triton kernels on CUDA tensors, PyTorch references elsewhere.

Tests run the Triton kernels on the CPU by calling the ``*_triton`` functions directly with
TRITON_INTERPRET=1 set before triton is imported."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


# the most shared memory one block may use, per compute capability (CUDA programming guide)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                100: 227 * 1024, 120: 99 * 1024}


def use_triton(x) -> bool:
    return triton is not None and x.is_cuda


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), not compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
