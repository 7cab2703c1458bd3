"""Compile every Triton kernel the engine can launch for a CUDA architecture, on a machine with no GPU.

  python -m engine.kernel_check --arch 90             # H100 / H200
  python -m engine.kernel_check --arch 75 --arch 86   # T4; A10, A40, RTX 3090

Triton's front end and LLVM run on any host, and the ptxas Triton ships assembles their PTX
for the architecture asked, so what the interpreter cannot show (an instruction that needs a
newer GPU, a program over its GPU's shared memory) shows here. Each configuration goes through
the engine's own launchers (engine/triton_attention.py) with CPU tensors shaped as the engine
holds them, under a Triton driver that compiles and never launches: the check compiles the
very tiles, constants and argument specialisations a GPU run would. A kernel fails when it
does not compile, or when its shared memory is over what one block may have on that
architecture (on the GPU its launch would raise OutOfResources).

Runs without TRITON_INTERPRET (the interpreter replaces compilation).
"""

import argparse
from dataclasses import asdict, dataclass
import json
import os
import sys
import time

import torch

from engine.attention import MAX_KV_SPLITS, triton_writes_cache
from engine.loader import DTYPES, KV_CACHE_DTYPES, resolve_kv_cache_dtype

# The most shared memory one block may have, in bytes, by compute capability: the CUDA C++
# Programming Guide's table, as cudaDevAttrMaxSharedMemoryPerBlockOptin reports it.
SHARED_MEMORY_PER_BLOCK = {70: 96 << 10, 75: 64 << 10, 80: 163 << 10, 86: 99 << 10, 87: 163 << 10,
                           89: 99 << 10, 90: 227 << 10, 100: 227 << 10, 120: 99 << 10}
# (query heads, KV heads, head_dim): SmolLM2-135M, Llama-2-7B (no grouping), Llama-3-8B, Llama-3-70B.
SHAPES = ((9, 3, 64), (32, 32, 128), (32, 8, 128), (64, 8, 128))
# Steps that pick different kernels or tiles, as (query tokens, context) per sequence and KV
# splits: decodes alone, a prompt chunk beside a decode, and long decodes split.
STEPS = {"decode": ([(1, 40), (1, 50), (1, 60)], 1),
         "prefill": ([(1, 60), (100, 140)], 1),
         "split": ([(1, 400), (1, 500)], MAX_KV_SPLITS)}
BLOCK_SIZE = 16


@dataclass
class Compiled:
    config: str
    kernel: str
    shared: int  # bytes; 0 where it did not compile
    limit: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared <= self.limit


def cache_dtypes(model_dtype: torch.dtype, capability: tuple[int, int]) -> list[torch.dtype]:
    """The KV caches the engine allows for this model dtype (the loader's rule) on this GPU (the backend's)."""
    allowed = []
    for name in ("auto", *KV_CACHE_DTYPES):
        try:
            dtype = resolve_kv_cache_dtype(name, model_dtype)
        except ValueError:
            continue
        if dtype not in allowed and triton_writes_cache(capability, dtype):
            allowed.append(dtype)
    return allowed


def launch_step(kernels, dtype: torch.dtype, cache_dtype: torch.dtype, shape: tuple[int, int, int], step: str) -> None:
    """One layer's attention of `step` through the launchers, with inputs laid out as the
    engine's: query, key and value are views of one projection's rows."""
    heads, kv_heads, head_dim = shape
    sequences, num_splits = STEPS[step]
    num_tokens = sum(q for q, _ in sequences)
    qkv = torch.zeros(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    query = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    key = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
    max_blocks = max(-(-context // BLOCK_SIZE) for _, context in sequences)
    key_cache = torch.zeros(len(sequences) * max_blocks * BLOCK_SIZE, kv_heads, head_dim, dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    kernels.store_kv(key, value, key_cache, value_cache, torch.arange(num_tokens, dtype=torch.int64))
    block_tables = torch.arange(len(sequences) * max_blocks, dtype=torch.int32).view(len(sequences), max_blocks)
    seq_lens = torch.tensor([context for _, context in sequences], dtype=torch.int32)
    query_start_loc = torch.tensor([0] + [q for q, _ in sequences], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kernels.unified_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                              max(q for q, _ in sequences), BLOCK_SIZE, head_dim ** -0.5, num_splits=num_splits)


def _compile_only_driver(target):
    """A Triton driver that answers as a GPU of `target` would, for one that is not here;
    nothing reaches a launch (`check` answers Triton's compile hook itself)."""
    from triton.backends.driver import DriverBase

    class CompileOnly(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_benchmarker(self):
            raise NotImplementedError

    return CompileOnly()


def check(arch: int) -> list[Compiled]:
    """Every kernel of every configuration the engine may launch on compute capability `arch`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernel check compiles: run it without TRITON_INTERPRET=1")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.driver import driver

    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    results: list[Compiled] = []
    seen: set = set()
    config = ""

    def compile_instead(*, key, fn, compile, **_):
        # Triton asks this hook before it compiles; answering True makes it neither compile nor launch.
        if (fn.name, str(key)) not in seen:
            seen.add((fn.name, str(key)))
            source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
            options = {name: compile[name] for name in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
            try:
                kernel = triton.compile(source, target=target, options=options)
                results.append(Compiled(config, fn.name, kernel.metadata.shared, limit))
            except Exception as error:  # noqa: BLE001 - a failed compile is the finding
                lines = [line for line in str(error).splitlines() if "error" in line.lower()] or [str(error)]
                results.append(Compiled(config, fn.name, 0, limit, lines[-1].strip()[:300]))
        return True

    from engine import triton_attention

    # Each kernel keeps the target it first saw per device: forgotten on the way in and out, so
    # neither another architecture's check nor a real launch afterwards compiles for a stale one.
    kernels = [value for value in vars(triton_attention).values() if isinstance(value, triton.runtime.JITFunction)]
    for kernel in kernels:
        kernel.device_caches.clear()
    driver.set_active(_compile_only_driver(target))
    knobs.runtime.jit_cache_hook = compile_instead
    try:
        for dtype in DTYPES.values():
            for cache_dtype in cache_dtypes(dtype, divmod(arch, 10)):
                for shape in SHAPES:
                    for step in STEPS:
                        config = (f"{str(dtype)[6:]} model, {str(cache_dtype)[6:]} cache, "
                                  f"{shape[0]}/{shape[1]} heads x {shape[2]}, {step}")
                        launch_step(triton_attention, dtype, cache_dtype, shape, step)
    finally:
        knobs.runtime.jit_cache_hook = None
        driver.set_active(None)  # the default driver again, made when next asked for (none where there is no GPU)
        for kernel in kernels:
            kernel.device_caches.clear()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_PER_BLOCK), required=True,
                        help="compute capability without the dot (90 for 9.0); repeat for several")
    parser.add_argument("--json", help="write every compiled kernel here")
    args = parser.parse_args(argv)
    report, failed = {}, 0
    for arch in args.arch:
        start = time.perf_counter()
        results = check(arch)
        report[arch] = [asdict(result) | {"ok": result.ok} for result in results]
        bad = [result for result in results if not result.ok]
        failed += len(bad)
        largest = max(results, key=lambda result: result.shared)
        print(f"sm_{arch}: {len(results)} kernels compiled in {time.perf_counter() - start:.0f} s, {len(bad)} failed; "
              f"most shared memory {largest.shared} of {largest.limit} bytes ({largest.kernel}, {largest.config})")
        for result in bad:
            print(f"  FAILED {result.kernel} ({result.config}): "
                  f"{result.error or f'{result.shared} bytes of shared memory, over {result.limit}'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
