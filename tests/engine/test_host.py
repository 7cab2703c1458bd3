"""Host detection, and the choices the engine makes from it, on CPUs other than this one."""

import pytest
import torch

from engine import cpu_kernels, host
from engine.loader import linear_path, resolve_dtype

CPU = torch.device("cpu")
COMMON = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt"
# Abridged /proc/cpuinfo of the hosts these sessions have run on, and of an Arm server.
EPYC_AVX2 = f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {COMMON} avx f16c fma avx2 bmi2\n"
XEON_AVX512_BF16 = (f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: {COMMON} avx f16c fma "
                    "avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile\n")
AVX512_NO_BF16 = f"model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: {COMMON} avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16\nCPU part\t: 0xd40\n"


def test_an_avx2_host_runs_neither_avx512_nor_native_bfloat16():
    cpu = host.read_cpu(EPYC_AVX2, arch="x86_64")
    assert (cpu.model, cpu.avx2, cpu.avx512, cpu.native_bfloat16, cpu.onednn_packs_bfloat16) == (
        "AMD EPYC", True, False, False, False)
    assert [b.isa for b in cpu_kernels.runnable_builds(cpu)] == ["avx2", "portable"]
    assert cpu.summary()["isa"] == "avx2"


def test_an_avx512_bf16_host_gets_every_fast_path():
    cpu = host.read_cpu(XEON_AVX512_BF16, arch="x86_64")
    assert cpu.avx512 and cpu.native_bfloat16
    assert cpu.onednn_packs_bfloat16 == torch.backends.mkldnn.is_available()
    assert [b.isa for b in cpu_kernels.runnable_builds(cpu)] == ["avx512bf16", "avx512", "avx2", "portable"]
    assert cpu.summary() == {"arch": "x86_64", "model": "Intel(R) Xeon(R) Platinum 8481C", "isa": "avx512",
                             "native_bfloat16": True, "amx": True}


def test_avx512_without_bf16_packs_weights_but_computes_bfloat16_emulated():
    cpu = host.read_cpu(AVX512_NO_BF16, arch="x86_64")
    assert cpu.avx512 and not cpu.native_bfloat16
    assert cpu.onednn_packs_bfloat16 == torch.backends.mkldnn.is_available()
    assert [b.isa for b in cpu_kernels.runnable_builds(cpu)] == ["avx512", "avx2", "portable"]


def test_an_arm_host_builds_the_portable_kernel_only():
    cpu = host.read_cpu(GRAVITON, arch="aarch64")
    assert cpu.neon and not cpu.is_x86 and not cpu.avx2
    assert not cpu.native_bfloat16 and not cpu.onednn_packs_bfloat16
    assert [b.isa for b in cpu_kernels.runnable_builds(cpu)] == ["portable"]
    assert host.read_cpu("", arch="arm64").neon, "no /proc/cpuinfo (macOS): every arm64 CPU has NEON"


def test_disabled_features_look_absent(monkeypatch):
    monkeypatch.setenv("ITERSERVE_CPU_DISABLE", "avx512f, amx_bf16")
    cpu = host.read_cpu(XEON_AVX512_BF16, arch="x86_64")
    assert not cpu.avx512 and cpu.avx2
    assert cpu.native_bfloat16, "avx512_bf16 is still there"
    assert [b.isa for b in cpu_kernels.runnable_builds(cpu)] == ["avx2", "portable"]
    monkeypatch.setenv("ITERSERVE_CPU_DISABLE", "avx512_bf16")
    assert [b.isa for b in cpu_kernels.runnable_builds(host.read_cpu(XEON_AVX512_BF16, arch="x86_64"))] == [
        "avx512", "avx2", "portable"]


def test_this_host_is_read(cpu_without):
    machine = host.current()
    assert machine.cpu.arch and machine.cpu.model
    assert (machine.cuda is not None) == torch.cuda.is_available()
    assert cpu_without("avx2").cpu.avx2 is False


def test_dtype_auto_and_linears_follow_the_cpu(cpu_without):
    machine = cpu_without()
    native = machine.cpu.native_bfloat16
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    cpu_without("avx512_bf16", "amx_bf16")
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16, "an explicit dtype is honoured, emulated or not"
    cpu_without("avx512bw", "avx_ne_convert")
    assert linear_path(torch.bfloat16, CPU) == "F.linear"
    assert linear_path(torch.float32, CPU) == "F.linear"
    assert linear_path(torch.bfloat16, torch.device("cuda")) == "F.linear"


def test_float32_linears_are_packed_where_measured_faster(monkeypatch):
    """oneDNN's packed float32 linears on AVX-512, where they were measured faster; F.linear on
    AVX2-only hosts until measured there, on Arm, and on CUDA."""
    onednn = torch.backends.mkldnn.is_available()
    for cpuinfo, arch, packed in ((AVX512_NO_BF16, "x86_64", onednn), (XEON_AVX512_BF16, "x86_64", onednn),
                                  (EPYC_AVX2, "x86_64", False), (GRAVITON, "aarch64", False)):
        cpu = host.read_cpu(cpuinfo, arch=arch)
        monkeypatch.setattr(host, "current", lambda: host.Host(cpu, None))
        assert cpu.onednn_packs_float32 == packed, cpu.model
        assert linear_path(torch.float32, CPU) == ("onednn-packed" if packed else "F.linear"), cpu.model
        assert linear_path(torch.float32, torch.device("cuda")) == "F.linear"


def test_cuda_dtype_auto_follows_the_capability(monkeypatch):
    cpu = host.read_cpu(EPYC_AVX2, arch="x86_64")
    for capability, expected in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(host, "current", lambda: host.Host(cpu, host.CudaInfo("GPU", capability, 1)))
        assert resolve_dtype("auto", torch.device("cuda")) == expected


def test_asking_for_a_build_this_cpu_cannot_run_is_an_error(cpu_without):
    cpu_without("avx2")
    with pytest.raises(ValueError, match="cannot run the 'avx2' kernel build"):
        cpu_kernels.load("avx2")
