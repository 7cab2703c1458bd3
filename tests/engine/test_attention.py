"""Paged attention equals dense causal attention over each request's whole sequence."""

import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels, host
from engine.attention import (
    AttentionMetadata, DecodeGroup, PagedBatch, PrefillSpan, context_slots, narrow, paged_attention,
    select_backend,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def dense_reference(q, k, v):
    """Causal attention of a whole sequence; q [n, heads, d], k/v [n, kv_heads, d]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                         v.transpose(0, 1)[None].float(), is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("backend", ["cpu-kernel", "torch"])
@pytest.mark.parametrize("dtype, cache_dtype, tolerance", [
    (torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 3e-2),
    # --kv-cache-dtype: a float32 model over a 16-bit cache, against attention over the stored values.
    (torch.float32, torch.bfloat16, 1e-5), (torch.float32, torch.float16, 1e-5),
    (torch.float32, torch.float8_e5m2, 1e-5), (torch.bfloat16, torch.float8_e5m2, 3e-2)])
def test_decodes_and_chunks_match_dense_attention(dtype, cache_dtype, tolerance, backend):
    torch.manual_seed(0)
    # Three decodes (contexts 3, 9, 40: two length groups), one chunk of 5 after a 6-token
    # prefix, and a whole prompt of 7, whose keys attention must also read as the cache holds them.
    lengths = {"d3": 3, "d9": 9, "d40": 40, "chunk": 11, "prompt": 7}
    blocks_per_seq = 12
    num_slots = len(lengths) * blocks_per_seq * BLOCK
    key_cache = torch.zeros(num_slots, KV_HEADS, HEAD_DIM, dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    # Scatter each sequence's blocks across the pool in reverse order, as a real pool would.
    tables = {name: list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))[::-1]
              for i, name in enumerate(lengths)}
    full = {name: [torch.randn(n, HEADS, HEAD_DIM, dtype=dtype), torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dtype),
                   torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dtype)] for name, n in lengths.items()}

    def slot(name, position):
        return tables[name][position // BLOCK] * BLOCK + position % BLOCK

    new_tokens = {"d3": 1, "d9": 1, "d40": 1, "chunk": 5, "prompt": 7}
    for name, n in lengths.items():  # history already in the cache
        for p in range(n - new_tokens[name]):
            key_cache[slot(name, p)] = full[name][1][p]
            value_cache[slot(name, p)] = full[name][2][p]

    order = ["d3", "d9", "d40", "chunk", "prompt"]
    q = torch.cat([full[n][0][-new_tokens[n]:] for n in order])
    k = torch.cat([full[n][1][-new_tokens[n]:] for n in order])
    v = torch.cat([full[n][2][-new_tokens[n]:] for n in order])
    slot_mapping = torch.tensor([slot(n, p) for n in order for p in range(lengths[n] - new_tokens[n], lengths[n])])

    def group(start, names):
        width = max(lengths[n] for n in names)
        slots = torch.tensor([[slot(n, min(p, lengths[n] - 1)) for p in range(width)] for n in names])
        mask = torch.tensor([[p < lengths[n] for p in range(width)] for n in names]).view(len(names), 1, 1, width)
        return DecodeGroup(start, start + len(names), slots, mask)

    if backend == "cpu-kernel":  # the whole batch in one call
        query_start_loc = torch.tensor([0, 1, 2, 3, 8, 15], dtype=torch.int32)
        meta = AttentionMetadata(slot_mapping, [], [], paged=PagedBatch(
            query_start_loc, torch.tensor([lengths[n] for n in order], dtype=torch.int32),
            torch.tensor([tables[n] for n in order], dtype=torch.int32), BLOCK, cpu_kernels.load()))
    else:
        chunk_slots = torch.tensor([slot("chunk", p) for p in range(11)])
        chunk_mask = torch.arange(11)[None] <= torch.arange(6, 11)[:, None]
        meta = AttentionMetadata(slot_mapping, [group(0, ["d3", "d9"]), group(2, ["d40"])],
                                 [PrefillSpan(3, 8, 6, chunk_slots, chunk_mask), PrefillSpan(8, 15, 0, None, None)])
    out = paged_attention(q, k, v, key_cache, value_cache, meta, HEAD_DIM ** -0.5)
    assert out.dtype == dtype

    def as_stored(tensor):
        return tensor.to(cache_dtype).to(dtype)

    expected = torch.cat([dense_reference(full[n][0], as_stored(full[n][1]), as_stored(full[n][2]))[-new_tokens[n]:]
                          for n in order])
    assert torch.allclose(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e5m2, torch.bfloat16])
def test_narrowing_holds_values_past_the_range_at_the_largest_finite_one(dtype):
    """As the GPU's conversion does (satfinite): an infinite key would make its softmax NaN."""
    largest = torch.finfo(dtype).max
    values = torch.tensor([1e6, -1e6, 0.3, -2.5])
    narrowed = narrow(values, dtype)
    assert narrowed.dtype == dtype and torch.isfinite(narrowed.float()).all()
    expected = [largest, -largest] if dtype != torch.bfloat16 else [1e6, -1e6]  # bfloat16 spans float32's range
    assert narrowed.float()[:2].tolist() == torch.tensor(expected).to(dtype).float().tolist()
    assert narrowed.float()[2:].tolist() == values[2:].to(dtype).float().tolist()  # to nearest even, as torch


def kernel_build(isa: str):
    """The named build of the C++ kernel, or a skip where this CPU cannot run it."""
    runnable = [b.isa for b in cpu_kernels.runnable_builds()]
    if isa not in runnable:
        pytest.skip(f"this CPU cannot run the {isa} build (it runs {runnable}); test_every_kernel_build_compiles "
                    "still compiles it")
    kernels = cpu_kernels.load(isa)
    assert kernels is not None, "the C++ decode kernel must build wherever the tests run (gcc and ninja)"
    assert kernels.isa() == isa
    return kernels


def test_the_engine_gets_the_best_build_this_cpu_runs():
    assert cpu_kernels.load().isa() == cpu_kernels.runnable_builds()[0].isa


def check_kernel(kernels, query, key_cache, value_cache, tables, seqs, block_size, tolerance):
    """The kernel's output against dense causal attention over each sequence's context, as its
    block table finds it; `seqs` holds each sequence's (query rows, context), the rows being
    the context's last positions (a decode is one row)."""
    head_dim = query.shape[-1]
    query_start_loc = torch.tensor([0] + [rows for rows, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor([context for _, context in seqs], dtype=torch.int32)
    out = kernels.paged_attention(query, key_cache, value_cache, tables, query_start_loc, seq_lens, block_size,
                                  head_dim ** -0.5)
    assert out.dtype == query.dtype and out.shape == query.shape
    for s, (rows, context) in enumerate(seqs):
        slots = context_slots(tables[s].long(), torch.arange(context), block_size)
        first = int(query_start_loc[s])
        visible = torch.arange(context)[None] <= torch.arange(context - rows, context)[:, None]
        expected = F.scaled_dot_product_attention(
            query[first:first + rows].transpose(0, 1).float(), key_cache[slots].transpose(0, 1).float(),
            value_cache[slots].transpose(0, 1).float(), attn_mask=visible, enable_gqa=True).transpose(0, 1)
        assert torch.allclose(out[first:first + rows].float(), expected, atol=tolerance, rtol=tolerance), (rows, context)


def random_tables(lengths, block_size, num_blocks):
    """Each row's blocks scattered over the pool, padded to the longest row with zeros."""
    tables = [torch.randperm(num_blocks)[:-(-n // block_size)] for n in lengths]
    padded = torch.zeros(len(lengths), max(len(t) for t in tables), dtype=torch.int32)
    for row, table in enumerate(tables):
        padded[row, :len(table)] = table
    return padded


# (heads, kv_heads, block_size). The vector builds score a block's keys 8 or 16 at a time and
# up to 8 query heads per pass, and sum values in registers for up to 16 vectors' worth of
# heads: groups of 1, 3, 8 and 12, and blocks narrower and wider than a vector, cross each bound.
# SmolLM2's 9 over 3 gives an odd count of query vectors per item (bfloat16 weights fill half
# a float each in the avx512bf16 build).
KERNEL_SHAPES = [(6, 2, 16), (4, 4, 8), (16, 2, 32), (24, 2, 16), (12, 1, 24), (9, 3, 16)]


def kernel_batch(block_size):
    """(query rows, context) of a flat batch: decodes of a single token, on both sides of a block
    edge, part of a vector and several blocks; a whole prompt; chunks after a prefix, of more rows
    than the kernel takes together (8) and not a multiple of them; and one whose long context
    leaves room in the kernel's scratch for fewer rows at a time. Chunks of 2 rows or more
    have their keys packed once for all their rows in the vector builds: (20, 300) and
    (33, 701) end mid-tile, in the first and in the second tile of a pair of 16 keys, and the
    item of a chunk's first rows sees fewer keys than the chunk's context."""
    decodes = [(1, n) for n in (1, block_size - 1, block_size, block_size + 1, 5, 100, 300)]
    return decodes + [(5, 5), (7, 100), (20, 300), (block_size + 3, block_size + 3), (12, 1000), (33, 701)]


@pytest.mark.parametrize("isa", [b.isa for b in cpu_kernels.BUILDS])
@pytest.mark.parametrize("head_dim", [8, 64, 128])  # 64 and 128 have unrolled vector paths in the kernel
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cpu_kernel_matches_dense_attention(dtype, tolerance, head_dim, isa):
    kernels = kernel_build(isa)
    torch.manual_seed(1)
    for heads, kv_heads, block_size in KERNEL_SHAPES:
        num_blocks = 1536 // block_size
        key_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, dtype=dtype)
        value_cache = torch.randn_like(key_cache)
        seqs = kernel_batch(block_size)
        query = torch.randn(sum(rows for rows, _ in seqs), heads, head_dim, dtype=dtype)
        tables = random_tables([context for _, context in seqs], block_size, num_blocks)
        check_kernel(kernels, query, key_cache, value_cache, tables, seqs, block_size, tolerance)


@pytest.mark.parametrize("isa", [b.isa for b in cpu_kernels.BUILDS])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("dtype, cache_dtype, tolerance", [
    (torch.float32, torch.bfloat16, 1e-5), (torch.float32, torch.float16, 1e-5),
    (torch.float32, torch.float8_e5m2, 1e-5), (torch.bfloat16, torch.float8_e5m2, 2e-2)])
def test_cpu_kernel_reads_a_narrower_cache(dtype, cache_dtype, tolerance, head_dim, isa):
    """--kv-cache-dtype: the kernel widens the stored values exactly, so the query dtype's
    tolerance holds against attention over the same stored values."""
    kernels = kernel_build(isa)
    torch.manual_seed(2)
    for heads, kv_heads, block_size in KERNEL_SHAPES:
        num_blocks = 640 // block_size
        key_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(cache_dtype)
        value_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(cache_dtype)
        seqs = [(1, 1), (1, block_size + 1), (1, 250), (9, 9), (11, 200)]
        query = torch.randn(sum(rows for rows, _ in seqs), heads, head_dim).to(dtype)
        tables = random_tables([context for _, context in seqs], block_size, num_blocks)
        check_kernel(kernels, query, key_cache, value_cache, tables, seqs, block_size, tolerance)
    with pytest.raises(RuntimeError, match="bfloat16 or float16 for a float32 query"):
        kernels.paged_attention(query.to(torch.bfloat16), key_cache.to(torch.float16), value_cache.to(torch.float16),
                                tables, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                                block_size, 1.0)


@pytest.mark.parametrize("isa", [b.isa for b in cpu_kernels.BUILDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_rows_output_is_the_same_in_any_chunk(dtype, isa):
    """A prompt's last rows computed within the whole prompt, or as the chunk left after a
    prefix-cache hit, give the same bits: the packed keys sum a dot product in another order
    than a decode's lane sums, so every chunk of 2 rows or more packs, and a seeded request
    sent again draws the same tokens. (A single row is computed as a decode is.)"""
    kernels = kernel_build(isa)
    torch.manual_seed(3)
    heads, kv_heads, head_dim, block_size, context = 9, 3, 64, 16, 300
    key_cache = torch.randn(32 * block_size, kv_heads, head_dim, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(context, heads, head_dim, dtype=dtype)
    tables = random_tables([context], block_size, 32)
    lens = torch.tensor([context], dtype=torch.int32)

    def attend(rows):
        loc = torch.tensor([0, rows], dtype=torch.int32)
        return kernels.paged_attention(query[context - rows:], key_cache, value_cache, tables, loc, lens, block_size,
                                       head_dim ** -0.5)

    whole = attend(context)
    for rows in (2, 12, 15, 16, 44):
        assert torch.equal(attend(rows), whole[context - rows:]), rows


def test_cpu_kernel_refuses_a_sequence_with_more_query_rows_than_context():
    kernels = cpu_kernels.load()
    cache = torch.zeros(64, 1, 8)
    with pytest.raises(RuntimeError, match=r"query rows \[0, 3\) and 2 tokens of context"):
        kernels.paged_attention(torch.zeros(3, 1, 8), cache, cache, torch.zeros(1, 4, dtype=torch.int32),
                                torch.tensor([0, 3], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 16, 1.0)


@pytest.mark.skipif(not host.current().cpu.is_x86, reason="the avx512 and avx2 builds are x86-64 code")
def test_every_kernel_build_compiles(tmp_path):
    """Builds this CPU cannot run are compiled (not loaded: their code would fault here), so that
    a host without AVX-512 still proves the AVX-512 source compiles."""
    from torch.utils.cpp_extension import include_paths

    runnable = cpu_kernels.runnable_builds()
    for build in [b for b in cpu_kernels.BUILDS if b not in runnable]:
        for source in cpu_kernels.SOURCES:
            command = ["c++", "-std=c++20", "-fPIC", "-c", str(source), "-o", str(tmp_path / f"{build.isa}.o"),
                       *build.compile_flags(torch.backends.openmp.is_available()),
                       *[f"-I{path}" for path in include_paths()]]
            compiled = subprocess.run(command, capture_output=True, text=True)
            assert compiled.returncode == 0, (source.name, compiled.stderr[-3000:])


@pytest.mark.skipif(not torch.backends.openmp.is_available() or not Path("/proc/self/maps").exists(),
                    reason="torch runs its threads on OpenMP here, and Linux shows what a process has mapped")
def test_the_kernel_runs_its_rows_on_torchs_own_threads():
    """Built with OpenMP (ATen's parallel_for, a header template, is serial otherwise: the kernel
    ran on one core of two), bound to the one libgomp torch loaded (a second runtime would
    oversubscribe the cores), and giving the same result on one thread as on all."""
    kernels = cpu_kernels.load()
    mapped = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if ".so" in line]
    kernel_path = next(path for path in mapped if Path(path).name == f"iterserve_cpu_{kernels.isa()}.so")
    linked = subprocess.run(["ldd", kernel_path], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in linked
    assert len({path for path in mapped if "libgomp" in Path(path).name}) == 1

    torch.manual_seed(2)
    block_size, num_blocks, lengths = 16, 256, [300, 7, 160, 1, 45, 290, 64, 33]
    key_cache = torch.randn(num_blocks * block_size, 3, 64)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(num_blocks)[:len(lengths) * 19].view(len(lengths), 19).to(torch.int32)
    # Decodes, then two prompt chunks of 20 and 30 rows.
    query_start_loc = torch.tensor([0, 1, 2, 3, 4, 5, 6, 26, 56], dtype=torch.int32)
    query, lens = torch.randn(56, 9, 64), torch.tensor(lengths, dtype=torch.int32)
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            outputs.append(kernels.paged_attention(query, key_cache, value_cache, tables, query_start_loc, lens,
                                                   block_size, 0.125))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*outputs)


# Loads the portable build where the compiler refuses -fopenmp, and checks one decode of it.
_SERIAL_BUILD_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from engine import cpu_kernels
kernels = cpu_kernels.load("portable")
torch.manual_seed(0)
keys, values = torch.randn(64, 2, 16), torch.randn(64, 2, 16)
query = torch.randn(1, 4, 16)
table, length = torch.randperm(4).to(torch.int32).view(1, 4), 50
out = kernels.paged_attention(query, keys, values, table, torch.tensor([0, 1], dtype=torch.int32),
                              torch.tensor([length], dtype=torch.int32), 16, 0.25)
slots = (table[0].long()[:, None] * 16 + torch.arange(16)).flatten()[:length]
k, v = keys[slots].repeat_interleave(2, dim=1), values[slots].repeat_interleave(2, dim=1)
weights = torch.softmax(torch.einsum("hd,nhd->hn", query[0], k) * 0.25, dim=-1)
assert torch.allclose(out[0], torch.einsum("hn,nhd->hd", weights, v), atol=1e-5)
print("isa:", kernels.isa())
"""


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP builds serially anyway")
def test_a_compiler_without_openmp_gets_the_serial_build(tmp_path):
    """Where `-fopenmp` fails (clang without libomp, say), the kernel is built without it rather
    than not at all: checked in a fresh process with a compiler that refuses the flag."""
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\nfor arg in "$@"; do [ "$arg" = "-fopenmp" ] && exit 1; done\n'
                        f'exec {os.environ.get("CXX", "c++")} "$@"\n')
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler), "ITERSERVE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, "-c", _SERIAL_BUILD_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "isa: portable" in run.stdout
    assert "building them single-threaded" in run.stderr and "the portable build, single-threaded" in run.stderr
    # A second build under the same name in one process is suffixed (_v1) by torch.
    built = list((tmp_path / "cache" / "kernels").glob("*-portable-*/iterserve_cpu_portable*.so"))
    assert len(built) == 1
    assert "libgomp" not in subprocess.run(["ldd", str(built[0])], capture_output=True, text=True, check=True).stdout


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu) == ("cpu-kernel" if cpu_kernels.load() is not None else "torch")
    assert select_backend("auto", torch.device("cuda")) == "torch", "triton becomes auto on CUDA once measured there"
    assert select_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="one of"):
        select_backend("flash", cpu)
    with pytest.raises(ValueError, match="needs a CPU device"):
        select_backend("cpu-kernel", torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|needs the triton package"):
        select_backend("triton", cpu)


def test_the_triton_backend_refuses_a_float8_cache_below_ampere(monkeypatch):
    """Its store's conversion to float8 does not assemble for sm_75 (engine/kernel_check.py)."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it)")
    cuda = torch.device("cuda")

    def gpu(capability):
        info = host.CudaInfo(name="a test GPU", capability=capability, count=1, multiprocessors=40)
        monkeypatch.setattr(host, "current", lambda: host.Host(cpu=host.read_cpu(), cuda=info))

    gpu((7, 5))
    with pytest.raises(ValueError, match="float8 KV cache .* 8.0 and later; this GPU \\(a test GPU\\) is 7.5"):
        select_backend("triton", cuda, torch.float8_e5m2)
    assert select_backend("triton", cuda, torch.float16) == "triton"
    assert select_backend("torch", cuda, torch.float8_e5m2) == "torch", "the torch path narrows with torch's own cast"
    gpu((8, 0))
    assert select_backend("triton", cuda, torch.float8_e5m2) == "triton"
