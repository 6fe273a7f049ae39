"""Our Triton kernels compiled for a GPU architecture on a machine without a GPU, launch by
launch, and what the compiled kernel uses (registers, spills, shared memory, its main
instructions): the static checks of the GPU path.

    with CompileOnly("sm_90a") as build:
        fp8_gemm_triton(a, w, sa, sw, config=cfg)   # meta tensors: nothing is allocated
    for launch in build.launches: launch.resources()

Inside ``CompileOnly``, every ``kernel[grid](...)`` of a kernels module compiles the kernel for
the architecture with exactly the arguments the wrapper passes (Triton's own specialization of
them: dtypes, alignment, constants) and launches nothing; the wrappers run on ``meta``
tensors. The compiled kernels are kept for the rest of the process (Triton's compile cache on
disk keeps them between processes). It needs Triton compiled, not interpreted: without
TRITON_INTERPRET=1 in the environment when triton is first imported."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._triton import SHARED_LIMIT, triton

ARCHS = {"sm_90a": 90, "sm_89": 89}  # the architectures checked, and their compute capability
# PTX instructions that say how a kernel computes and loads
INSTRUCTIONS = {"wgmma": r"\bwgmma\.mma_async", "mma": r"\bmma\.sync", "cp_async": r"\bcp\.async\.(?:ca|cg)",
                "tma": r"\bcp\.async\.bulk\.tensor", "ld_global": r"\bld\.global"}


def shared_limit(arch: str) -> int:
    return SHARED_LIMIT[capability(arch)]


def capability(arch: str) -> int:
    return ARCHS[arch]


def _ptxas(arch: str) -> str:
    """The ptxas Triton itself assembles this architecture's PTX with (its wheel bundles two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability(arch)).path


class _TargetDriver:
    """What Triton's JIT asks the active driver while it compiles (a launch would ask more)."""

    def __init__(self, arch: str):
        from triton.backends.compiler import GPUTarget

        self.device = capability(arch)  # JIT caches are per device: one per architecture
        self.target = GPUTarget("cuda", capability(arch), 32)

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@dataclass
class Launch:
    """One kernel launch compiled for ``arch``: the kernel, its constants and options, and
    the compiled artefact."""

    arch: str
    kernel: str
    constants: dict  # the constexpr arguments
    options: dict  # num_warps, num_stages
    dtypes: dict  # of the tensor arguments
    compiled: object = field(repr=False)
    _resources: dict | None = field(default=None, repr=False)

    @property
    def config(self) -> dict:
        return {**self.constants, **self.options}

    def resources(self) -> dict:
        """registers, spill_stores, spill_loads (bytes, from ptxas -v on the PTX), shared (the
        bytes of shared memory the launch asks for), and the count of each of INSTRUCTIONS in the
        PTX."""
        if self._resources is None:
            ptx = self.compiled.asm["ptx"]
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernel.ptx"
                src.write_text(ptx)
                out = subprocess.run([_ptxas(self.arch), "-v", f"--gpu-name={self.arch}", str(src), "-o",
                                      str(src.with_suffix(".cubin"))], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"ptxas on {self.kernel} for {self.arch}: {out.stderr.strip()}")
            info = out.stdout + out.stderr
            regs = re.search(r"Used (\d+) registers", info)
            stores = re.search(r"(\d+) bytes spill stores", info)
            loads = re.search(r"(\d+) bytes spill loads", info)
            static = re.search(r"(\d+) bytes smem", info)
            self._resources = {
                "registers": int(regs.group(1)) if regs else 0,
                "spill_stores": int(stores.group(1)) if stores else 0,
                "spill_loads": int(loads.group(1)) if loads else 0,
                "shared": int(self.compiled.metadata.shared) + (int(static.group(1)) if static else 0),
                **{name: len(re.findall(pattern, ptx)) for name, pattern in INSTRUCTIONS.items()}}
        return self._resources

    def problems(self) -> list[str]:
        """Why this launch cannot run on its architecture (empty: it can)."""
        r, why = self.resources(), []
        if r["shared"] > shared_limit(self.arch):
            why.append(f"{r['shared']} bytes of shared memory, more than the {shared_limit(self.arch)} of {self.arch}")
        if r["spill_stores"] or r["spill_loads"]:
            why.append(f"register spills ({r['spill_stores']} bytes stored, {r['spill_loads']} loaded)")
        return why


class _CompileOnly:
    """Stands for a JIT kernel in its module: ``kernel[grid](*args, **kw)`` compiles it for
    the active target and records the launch."""

    def __init__(self, jit, build: "CompileOnly"):
        self.jit, self.build = jit, build

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.jit.run(*args, grid=grid, warmup=True, **kwargs)
            self.build.record(self.jit, args, kwargs, compiled)
        return launch


class CompileOnly:
    """Within it, the kernels modules' launches compile for ``arch`` and run nothing; each
    distinct compiled kernel is in ``launches`` once."""

    def __init__(self, arch: str):
        if arch not in ARCHS:
            raise ValueError(f"architecture {arch!r}: expected one of {', '.join(ARCHS)}")
        self.arch = arch
        self.launches: list[Launch] = []
        self._seen: set[int] = set()
        self._patched: list[tuple[object, str, object]] = []

    def __enter__(self) -> "CompileOnly":
        import importlib

        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        self._driver = driver._active
        driver.set_active(_TargetDriver(self.arch))
        for name in kernel_modules():
            module = importlib.import_module(f"{__package__}.{name}")
            for attr, value in vars(module).items():
                if isinstance(value, JITFunction) and launched(module, attr):
                    self._patched.append((module, attr, value))
                    setattr(module, attr, _CompileOnly(value, self))
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime.driver import driver

        for module, attr, value in self._patched:
            setattr(module, attr, value)
        self._patched.clear()
        driver._active = self._driver

    def record(self, jit, args, kwargs, compiled) -> None:
        if id(compiled) in self._seen:
            return
        self._seen.add(id(compiled))
        names = jit.arg_names
        constants = {k: v for k, v in kwargs.items() if k in names}  # our wrappers pass constexprs by name
        options = {k: v for k, v in kwargs.items() if k not in names}
        dtypes = {n: str(a.dtype).removeprefix("torch.") for n, a in zip(names, args) if hasattr(a, "dtype")}
        self.launches.append(Launch(self.arch, jit.__name__, constants, options, dtypes, compiled))


def kernel_modules() -> list[str]:
    """The modules of this package that hold Triton kernels."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                  if "@triton.jit" in p.read_text(encoding="utf-8") and p.name != Path(__file__).name)


def launched(module, name: str) -> bool:
    """Whether the module launches the JIT function ``name`` (``name[grid](...)``), rather than
    calling it from another kernel."""
    source = Path(module.__file__).read_text(encoding="utf-8")
    return f"{name}[" in source

