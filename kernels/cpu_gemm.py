"""Small-M float32 GEMM for x86 CPUs (cpu_gemm.cpp): y = x @ W (+ bias) (+ residual) with W
packed in 16-column panels, read once per call whatever the number of rows. On our CPUs the
GEMM library's cost grows steeply from M = 1 to M = 2…16 (a Medusa tree's verify pass); this
kernel's barely does.

The C++ source is compiled on first use with PyTorch's extension builder (a C++ compiler is
needed) and cached in PyTorch's extension folder; ``available()`` says whether it could be, and
callers fall back to the GEMM library where not. ``CHATAPP_CPU_GEMM=0`` turns it off."""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path

import torch

PANEL = 16
VERSION = 2  # of the kernel: step costs measured with another version are measured again
_SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _supported_cpu() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:
        return False


def available() -> bool:
    """Whether the kernel is usable here: an AVX2 x86 CPU and a successful (cached) build. The
    first call may take a minute (compiling); the reason it is not usable is in ``why_not()``."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["why"] = _build()
        return bool(_state["ok"])


def why_not() -> str | None:
    available()
    return None if _state["ok"] else str(_state["why"])


def _build() -> tuple[bool, str | None]:
    if os.environ.get("CHATAPP_CPU_GEMM", "1") == "0":
        return False, "turned off (CHATAPP_CPU_GEMM=0)"
    if not _supported_cpu():
        return False, "needs an x86-64 CPU with AVX2"
    try:
        from torch.utils.cpp_extension import load

        load(name="chatapp_cpu_gemm", sources=[str(_SOURCE)], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
        torch.ops.chatapp_cpu.small_gemm  # noqa: B018 (registered by the library just loaded)
        return True, None
    except Exception as e:  # no compiler, no ninja, a failed build: the GEMM library it is
        return False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def pack(weight_t: torch.Tensor) -> torch.Tensor:
    """W [K, N] -> panels [ceil(N / 16), K, 16] (the last one zero-padded), 32-byte aligned."""
    k, n = weight_t.shape
    panels = -(-n // PANEL)
    if n % PANEL:
        weight_t = torch.nn.functional.pad(weight_t, (0, panels * PANEL - n))
    return weight_t.reshape(k, panels, PANEL).transpose(0, 1).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """panels [P, K, 16] -> W [K, n]."""
    return packed.transpose(0, 1).reshape(packed.shape[1], -1)[:, :n]


def gemm(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> [M, n] float32 (``available()`` must be true)."""
    return torch.ops.chatapp_cpu.small_gemm(x, packed, n, bias, residual)


def gemm_reference(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ unpack(packed, n)
    if bias is not None:
        y = y + bias
    return y if residual is None else y + residual
