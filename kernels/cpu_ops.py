"""The C++ kernels for x86 CPUs (AVX2 + FMA): one library, ``torch.ops.chatapp_cpu``, of
cpu_gemm.cpp (the small-M GEMM and the FP8 activation quantizer, kernels/cpu_gemm.py),
cpu_layer.cpp (a whole decoder layer for a few tokens, kernels/cpu_layer.py) and cpu_dmc.cpp
(DMC's per-token update, a Medusa tree's DMC slots, and attention over a DMC cache for a decode
step or a tree, kernels/dmc.py); cpu_kernels.h is what they share.

The sources are compiled on first use with PyTorch's extension builder (a C++ compiler is
needed) and cached in PyTorch's extension folder; ``available()`` says whether they could be,
and callers fall back to PyTorch where not. ``CHATAPP_CPU_KERNELS=0`` turns the library off."""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

VERSION = 16  # of the kernels: step costs measured with another version are measured again
_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_gemm.cpp", "cpu_dmc.cpp", "cpu_layer.cpp")]
_HEADER = Path(__file__).with_name("cpu_kernels.h")  # included by the sources
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
    """Whether the library is usable here: an AVX2 x86 CPU and a successful (cached) build. The
    first call may take a minute (compiling); the reason it is not usable is in ``why_not()``."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["why"] = _build()
        return bool(_state["ok"])


def serves(device, dtype) -> bool:
    """Whether the kernels serve tensors of this device and dtype: float32 on a CPU, with the
    library usable."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and available()


def why_not() -> str | None:
    available()
    return None if _state["ok"] else str(_state["why"])


def _build() -> tuple[bool, str | None]:
    if os.environ.get("CHATAPP_CPU_KERNELS", "1") == "0":
        return False, "turned off (CHATAPP_CPU_KERNELS=0)"
    if not _supported_cpu():
        return False, "needs an x86-64 CPU with AVX2"
    try:
        from torch.utils.cpp_extension import load

        # PyTorch rebuilds when a source or a flag changes, not a header: the header's hash is a flag
        header = hashlib.sha256(_HEADER.read_bytes()).hexdigest()[:16]
        load(name="chatapp_cpu", sources=[str(s) for s in _SOURCES], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", f"-DCHATAPP_HEADER={header}"],
             extra_ldflags=["-fopenmp"])
        torch.ops.chatapp_cpu.small_gemm  # noqa: B018 (registered by the library just loaded)
        torch.ops.chatapp_cpu.quantize_e4m3  # noqa: B018
        torch.ops.chatapp_cpu.fp8_quads  # noqa: B018
        torch.ops.chatapp_cpu.decoder_layers  # noqa: B018
        torch.ops.chatapp_cpu.dmc_tree_attention  # noqa: B018
        torch.ops.chatapp_cpu.dmc_tree_slots  # noqa: B018
        torch.ops.chatapp_cpu.dmc_update  # noqa: B018
        return True, None
    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch it is
        return False, f"{type(e).__name__}: {_first_error(str(e))}"


def _first_error(message: str) -> str:
    """A build failure's first compiler error (file:line: error: ...), else the message's start."""
    for line in message.splitlines():
        if " error: " in line or line.startswith("error:"):
            return " ".join(line.split())[:300]
    return " ".join(message.split())[:200]
