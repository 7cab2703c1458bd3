"""--kv-cache-dtype: a float32 model whose keys and values are kept in bfloat16, float16 or float8 e5m2.

The reference is transformers' own float32 model with every key and value rounded to the
cache's dtype before attention reads them (an attention function registered for the
test), so a difference in tokens can only come from our paging, batching, kernels, or a
rounding that is not the one the cache makes.
"""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine import cpu_kernels
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.loader import resolve_kv_cache_dtype

from greedy_reference import reference_tokens as transformers_tokens, run_ours

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "Q: What is the boiling point of water?\nA:",
    "counting sheep, " * 40,
    "one more time " * 110,
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp8_e5m2": torch.float8_e5m2}


def register_rounded_attention(cache_dtype: str) -> str:
    """An attention implementation for transformers that reads keys and values as a
    `cache_dtype` cache would hold them; returns its name."""
    narrow = DTYPES[cache_dtype]

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key.to(narrow).to(key.dtype), value.to(narrow).to(value.dtype),
                                      attention_mask, **kwargs)

    name = f"sdpa_kv_{cache_dtype}"
    AttentionInterface.register(name, attention)
    return name


def reference_tokens(path, prompts, max_tokens, cache_dtype: str | None) -> list[list[int]]:
    """transformers' tokens with keys and values rounded to `cache_dtype` (None: not rounded)."""
    return transformers_tokens(path, prompts, max_tokens,
                               register_rounded_attention(cache_dtype) if cache_dtype else None)


def rounding_shows(path, prompts, max_tokens, cache_dtype: str) -> list[list[int]]:
    """The rounded reference, checked to differ from the model's own tokens somewhere: else an
    engine that never rounded would pass against it."""
    rounded = reference_tokens(path, prompts, max_tokens, cache_dtype)
    assert rounded != reference_tokens(path, prompts, max_tokens, None), f"{cache_dtype} rounding changed no token"
    return rounded


@pytest.fixture(scope="module")
def rounded_references(tiny_model_path):
    return {cache_dtype: rounding_shows(tiny_model_path, PROMPTS, 24, cache_dtype)
            for cache_dtype in ("bfloat16", "fp8_e5m2")}


@pytest.mark.slow
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "fp8_e5m2"])
@pytest.mark.parametrize("backend", ["cpu-kernel", "torch", "triton"])
def test_tiny_llama_with_a_narrow_cache_matches_transformers_reading_the_same_keys(
        tiny_model_path, rounded_references, backend, cache_dtype):
    if backend == "cpu-kernel" and cpu_kernels.load() is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built")
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it)")
        if torch.cuda.is_available():
            pytest.skip("with CUDA present Triton compiles for the GPU, not for CPU tensors")
    got, llm = run_ours(tiny_model_path, PROMPTS, 24, device="cpu", attention_backend=backend,
                        kv_cache_dtype=cache_dtype)
    assert llm.engine.runner.kv_caches.dtype == DTYPES[cache_dtype]
    assert got == rounded_references[cache_dtype]


@pytest.mark.slow
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "fp8_e5m2"])
def test_narrow_cache_with_chunks_prefix_hits_and_swapped_preemption(tiny_model_path, cache_dtype):
    """The cache's rounding holds across every way a context reaches attention: chunked
    prompts, cached prefixes, and KV swapped out to host memory and back."""
    prompts = PROMPTS + ["counting sheep, " * 40 + "and then"]  # a prefix hit on the fifth prompt
    expected = rounding_shows(tiny_model_path, prompts, 24, cache_dtype)
    got, llm = run_ours(tiny_model_path, prompts, 24, device="cpu", kv_cache_dtype=cache_dtype, num_kv_blocks=40,
                        max_model_len=512, max_num_batched_tokens=64, swap_space=1 << 20)
    scheduler = llm.engine.scheduler
    assert llm.engine.runner.host_kv_caches.dtype == DTYPES[cache_dtype]
    assert scheduler.num_preemptions_by_mode["swap"] > 0 and scheduler.num_blocks_swapped["in"] > 0
    assert llm.engine.kv_cache.stats().prefix_cache_hits > 0
    assert got == expected


@pytest.mark.slow
def test_smollm2_with_a_bfloat16_cache(smollm2_path):
    """The real model (bfloat16 rounding changes none of these tokens: the tiny model's tests are
    the ones that show rounding happens). Not float8: two mantissa bits turn our summation order's
    1e-7 differences into a different float8 key here and there, and one such flip changed a
    token at the sixth step."""
    prompts = PROMPTS[:4]
    assert run_ours(smollm2_path, prompts, 20, kv_cache_dtype="bfloat16", max_model_len=1024)[0] == \
        reference_tokens(smollm2_path, prompts, 20, "bfloat16")


def test_a_narrow_cache_holds_more_tokens_in_the_same_memory(tiny_model_path):
    def engine(kv_cache_dtype: str) -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(tiny_model_path), dtype="float32", device="cpu",
                                      kv_cache_memory=3 << 20, kv_cache_dtype=kv_cache_dtype))

    wide, narrow, fp8 = engine("auto"), engine("bfloat16"), engine("fp8_e5m2")
    assert wide.kv_cache_dtype == torch.float32 and narrow.kv_cache_dtype == torch.bfloat16
    assert narrow.kv_bytes_per_block * 2 == wide.kv_bytes_per_block == fp8.kv_bytes_per_block * 4
    assert narrow.kv_cache.pool.num_blocks == 2 * wide.kv_cache.pool.num_blocks
    assert fp8.kv_cache.pool.num_blocks == 4 * wide.kv_cache.pool.num_blocks
    # The tensor is the pool and the scratch block (engine/cuda_graphs.py), in the narrow dtype.
    assert narrow.runner.kv_caches.nbytes == (narrow.kv_cache.pool.num_blocks + 1) * narrow.kv_bytes_per_block


def test_which_cache_dtypes_a_model_may_have():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32) == torch.float16
    assert resolve_kv_cache_dtype("bfloat16", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    with pytest.raises(ValueError, match="a float16 KV cache needs a float32 or float16 model"):
        resolve_kv_cache_dtype("float16", torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or one of"):
        resolve_kv_cache_dtype("fp8", torch.float32)
