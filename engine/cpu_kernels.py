"""Our C++ CPU kernels (engine/csrc: attention over the paged KV cache, a layer's small ops
fused, the sampler's draws and logprobs), compiled on first use into one extension and cached.

One source builds four ways: `avx512bf16` (AVX-512 with the bfloat16 dot product),
`avx512`, `avx2` and `portable` (plain loops, for x86-64 without AVX2 and for Arm).
`load()` gives the best build that this CPU runs, as engine/host.py reads the CPU;
`load(isa)` a named one, which the tests use to prove every build the host can run. Each
build is compiled with its own ISA flags rather than `-march=native`, into
`$ITERSERVE_CACHE/kernels/<arch>-<isa>-<key>`, the key a hash of the compiler, the flags
and torch's version: a cache on a disk shared between machines never hands one host a
build another made for different hardware, and a build is loaded only where the CPU has
every feature its flags assume. Where nothing can be built (no compiler, no ninja) the
engine falls back to the pure-torch attention path and says so once.

The kernel splits its rows over threads with ATen's `parallel_for`, a header template that
runs serially unless the extension itself is compiled with OpenMP: so where torch runs on
OpenMP the build is compiled and linked with `-fopenmp`. Linked as libgomp.so.1, it binds
to the libgomp torch has already loaded, so the kernel shares torch's threads and follows
`torch.set_num_threads`. A compiler without OpenMP gets the serial build rather than none.
"""

from dataclasses import dataclass
from functools import cache
import hashlib
import logging
import os
from pathlib import Path
import subprocess

import torch

from engine import host
from engine.embedded_model import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("paged_attention.cpp", "layer_ops.cpp", "sampling.cpp"))
COMMON_CFLAGS = ("-O3", "-ffast-math", "-fopenmp-simd")
OPENMP_FLAGS = ("-fopenmp",)


@dataclass(frozen=True, slots=True)
class KernelBuild:
    isa: str
    cflags: tuple[str, ...]

    def runs_on(self, cpu: host.CpuInfo) -> bool:
        if self.isa == "avx512bf16":
            return cpu.is_x86 and cpu.avx512 and "avx512_bf16" in cpu.flags
        if self.isa == "avx512":
            return cpu.is_x86 and cpu.avx512
        if self.isa == "avx2":
            return cpu.is_x86 and cpu.avx2
        return True

    @property
    def namespace(self) -> str:
        return f"iterserve_cpu_{self.isa}"

    def compile_flags(self, openmp: bool) -> list[str]:
        return [*COMMON_CFLAGS, *self.cflags, *(OPENMP_FLAGS if openmp else ()), f"-DITERSERVE_OPS={self.namespace}"]


AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
AVX512_FLAGS = AVX2_FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
BUILDS = (  # best first
    KernelBuild("avx512bf16", AVX512_FLAGS + ("-mavx512bf16",)),
    KernelBuild("avx512", AVX512_FLAGS),
    KernelBuild("avx2", AVX2_FLAGS),
    KernelBuild("portable", ()),
)


def runnable_builds(cpu: host.CpuInfo | None = None) -> list[KernelBuild]:
    """The builds this CPU can run, best first; `portable` always among them."""
    cpu = cpu or host.current().cpu
    return [build for build in BUILDS if build.runs_on(cpu)]


def load(isa: str | None = None):
    """The best build's operators (`torch.ops.iterserve_cpu_<isa>`), or None when it cannot be built.

    `isa` names a build; asking for one this CPU cannot run is a ValueError.
    ITERSERVE_CPU_KERNELS=0 turns the kernel off.
    """
    if os.environ.get("ITERSERVE_CPU_KERNELS", "1") == "0":
        return None
    cpu = host.current().cpu
    runnable = runnable_builds(cpu)
    if isa is None:
        return _load(runnable[0], cpu.arch)
    build = next((b for b in BUILDS if b.isa == isa), None)
    if build not in runnable:
        raise ValueError(f"this CPU ({cpu.arch}) cannot run the {isa!r} kernel build; it runs {[b.isa for b in runnable]}")
    return _load(build, cpu.arch)


@cache
def _load(build: KernelBuild, arch: str):
    threaded = torch.backends.openmp.is_available()
    try:
        try:
            ops = _compile(build, arch, openmp=threaded)
        except Exception as error:  # noqa: BLE001 - a compiler without OpenMP: the serial build, then
            if not threaded:
                raise
            log.warning("CPU kernels: no OpenMP build (%s); building them single-threaded", error)
            threaded, ops = False, _compile(build, arch, openmp=False)
    except Exception as error:  # no compiler, no ninja, an unsupported platform
        log.warning("CPU kernels unavailable (%s); using the slower pure-torch paths", error)
        return None
    log.info("CPU kernels: the %s build%s", build.isa, "" if threaded else ", single-threaded")
    return ops


def _compile(build: KernelBuild, arch: str, openmp: bool):
    from torch.utils.cpp_extension import load as load_extension

    cflags = build.compile_flags(openmp)
    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([arch, version, torch.__version__, *cflags]).encode()).hexdigest()[:12]
    build_dir = cache_dir() / "kernels" / f"{arch}-{build.isa}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    load_extension(name=build.namespace, sources=[str(source) for source in SOURCES], extra_cflags=cflags,
                   extra_ldflags=list(OPENMP_FLAGS if openmp else ()), build_directory=str(build_dir),
                   is_python_module=False, verbose=False)
    ops = getattr(torch.ops, build.namespace)
    assert ops.isa() == build.isa, f"the {build.isa} build compiled as {ops.isa()}"
    return ops
