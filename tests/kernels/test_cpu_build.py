"""The CPU kernels' library builds wherever it can: the other CPU-kernel tests skip where it is
not usable, so a source that stops compiling must fail here rather than turn them into skips."""

import os
import shutil

import pytest

from kernels import cpu_ops


def test_the_library_builds_on_a_cpu_and_compiler_that_can():
    if os.environ.get("CHATAPP_CPU_KERNELS", "1") == "0":
        pytest.skip("CPU kernels turned off (CHATAPP_CPU_KERNELS=0)")
    if not cpu_ops._supported_cpu():
        pytest.skip("needs an x86-64 CPU with AVX2")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    assert cpu_ops.available(), cpu_ops.why_not()


def test_a_failed_build_is_reported_by_its_first_compiler_error():
    log = ("Error building extension 'chatapp_cpu': [1/2] c++ -MMD -MF cpu_layer.o.d -O3 -c cpu_layer.cpp\n"
           "FAILED: cpu_layer.o\n"
           "/src/kernels/cpu_layer.cpp:280:1: error: expected declaration before '}' token\n"
           "/src/kernels/cpu_layer.cpp:281:1: error: something after it\n")
    assert cpu_ops._first_error(log) == "/src/kernels/cpu_layer.cpp:280:1: error: expected declaration before '}' token"
    assert cpu_ops._first_error("ninja not found") == "ninja not found"
