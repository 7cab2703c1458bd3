"""What this machine can do: its CPU's instruction sets and its CUDA devices, read once.

Every choice that depends on the hardware asks here, never `/proc/cpuinfo` or
`torch.cuda` directly: the model loader (oneDNN-packed bfloat16 linears), the CPU
attention kernel (which of its builds to load), `--dtype auto`, the benchmark and the
tests. Hosts differ from day to day (AVX-512 with bf16 on one, AVX2 alone on the next),
so nothing may assume one.

`ITERSERVE_CPU_DISABLE=avx512f,avx512_bf16` makes features look absent: the engine
then takes the paths of a lesser CPU, which is how the tests prove every fallback on
every host, and how an operator steps around a misbehaving path.
"""

from dataclasses import dataclass
from functools import cache
import os
from pathlib import Path
import platform

import torch

AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
ARM_ARCHES = ("aarch64", "arm64")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    model: str
    flags: frozenset[str]  # as /proc/cpuinfo spells them, less any disabled

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686")

    @property
    def avx2(self) -> bool:
        return {"avx2", "fma", "f16c"} <= self.flags

    @property
    def avx512(self) -> bool:
        """AVX-512 with the BW, VL and DQ extensions, as our kernel and oneDNN's bf16 packing need."""
        return self.avx2 and AVX512 <= self.flags

    @property
    def neon(self) -> bool:
        return self.arch in ARM_ARCHES and ("asimd" in self.flags or not self.flags)

    @property
    def native_bfloat16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX): bfloat16 is then about 2x float32."""
        return self.is_x86 and bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def onednn_packs_bfloat16(self) -> bool:
        # oneDNN's bf16 weight reorder refuses other CPUs: "bf16 path needs the cpu support
        # avx_ne_convert or avx512bw, avx512vl and avx512dq".
        return (self.is_x86 and torch.backends.mkldnn.is_available()
                and (self.avx512 or "avx_ne_convert" in self.flags))

    @property
    def onednn_packs_float32(self) -> bool:
        # Measured on AVX-512 (BENCHMARKS.md, session 12): 1.2-4x F.linear from 4 to 200 rows,
        # even at 512, 5-14% slower at one row. Not yet measured on an AVX2-only host, which
        # keeps F.linear until it is.
        return self.is_x86 and torch.backends.mkldnn.is_available() and self.avx512

    def summary(self) -> dict:
        isa = "avx512" if self.avx512 else "avx2" if self.avx2 else "neon" if self.neon else "baseline"
        return {"arch": self.arch, "model": self.model, "isa": isa,
                "native_bfloat16": self.native_bfloat16, "amx": "amx_bf16" in self.flags}


@dataclass(frozen=True, slots=True)
class CudaInfo:
    name: str
    capability: tuple[int, int]
    count: int
    multiprocessors: int = 0

    @property
    def supports_bfloat16(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and later

    def summary(self) -> dict:
        return {"name": self.name, "capability": ".".join(map(str, self.capability)), "count": self.count,
                "multiprocessors": self.multiprocessors}


@dataclass(frozen=True, slots=True)
class Host:
    cpu: CpuInfo
    cuda: CudaInfo | None

    def summary(self) -> dict:
        return {"cpu": self.cpu.summary(), "cuda": self.cuda.summary() if self.cuda else None}


@cache
def current() -> Host:
    """The host as the engine sees it; `current.cache_clear()` after changing ITERSERVE_CPU_DISABLE."""
    return Host(read_cpu(), read_cuda())


def read_cpu(cpuinfo: str | None = None, arch: str | None = None) -> CpuInfo:
    """Parse `/proc/cpuinfo` (x86 `flags`, Arm `Features`); elsewhere only the architecture is known."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    flags -= set(filter(None, os.environ.get("ITERSERVE_CPU_DISABLE", "").replace(",", " ").split()))
    model = fields.get("model name") or fields.get("cpu part") or platform.processor() or "unknown"
    return CpuInfo(arch=arch or platform.machine(), model=model, flags=frozenset(flags))


def read_cuda() -> CudaInfo | None:
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return CudaInfo(properties.name, (properties.major, properties.minor), torch.cuda.device_count(),
                    properties.multi_processor_count)
