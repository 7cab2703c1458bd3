"""Our engine's greedy output equals transformers' `generate`, token for token.

The reference runs each prompt alone (no padding), so any difference comes from our
batching, paging, chunking, prefix caching or preemption.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from engine import LLM, cpu_kernels
from scheduler import SamplingParams

from greedy_reference import reference_tokens, run_ours

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "List three colors:",
    "Q: What is the boiling point of water?\nA:",
    "1, 2, 3, 4,",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Hello",
    "Translate to French: I would like a cup of coffee, please.",
]
SHARED_PREFIX = "You are a careful assistant. Answer in one short sentence, and never use lists. " * 3


def save_random_model(folder, smollm2_path, config, seed: int, redrawn: dict[str, float]) -> None:
    """A random-weight model of `config` with SmolLM2's tokenizer, saved as a Hugging Face
    folder; parameters whose names end with a key of `redrawn` drawn again, normal with that std."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            std = next((std for suffix, std in redrawn.items() if name.endswith(suffix)), None)
            if std is not None:
                parameter.normal_(std=std)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_path):
    prompts = PROMPTS + [SHARED_PREFIX + q for q in ("Why is the sky blue?", "What is rain?", "Name a planet.")]
    return prompts, reference_tokens(smollm2_path, prompts, 20)


@pytest.mark.parametrize("backend", [b.isa for b in cpu_kernels.BUILDS] + ["torch", "triton"])
def test_tiny_llama_matches_transformers(tiny_model_path, backend, monkeypatch):
    """On the CPU: through each build of the C++ kernels this CPU runs (attention, the fused
    layer ops and the sampler's argmax), the torch reference path (as on a machine without a
    compiler: no kernels at all), and the Triton kernels under Triton's interpreter."""
    runnable = [b.isa for b in cpu_kernels.runnable_builds()]
    config = {"device": "cpu"}
    layer_ops = "C++ kernel, fused" if cpu_kernels.load() is not None else "torch"
    sampling = f"C++ kernel, {runnable[0]} build" if cpu_kernels.load() is not None else "torch, inverse CDF"
    if backend in ("torch", "triton"):
        if backend == "triton":
            pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it)")
            if torch.cuda.is_available():
                pytest.skip("with CUDA present Triton compiles for the GPU, not for CPU tensors")
        else:
            monkeypatch.setattr(cpu_kernels, "load", lambda: None)
            layer_ops, sampling = "torch", "torch, inverse CDF"
        config["attention_backend"] = backend
        expected_path = {"torch": "torch, gathered groups", "triton": "triton, one launch per layer"}[backend]
    elif backend not in runnable:
        pytest.skip(f"this CPU cannot run the {backend} kernel build (it runs {runnable})")
    else:
        build = cpu_kernels.load(backend)
        monkeypatch.setattr(cpu_kernels, "load", lambda: build)
        expected_path = sampling = f"C++ kernel, {backend} build"
    # Contexts from a few tokens to a few hundred: the fallback attends decodes in several length groups.
    prompts = PROMPTS + ["counting sheep, " * 40, "one more time " * 110]
    expected = reference_tokens(tiny_model_path, prompts, 24)
    got, llm = run_ours(tiny_model_path, prompts, 24, **config)
    assert llm.engine.paths["attention"] == expected_path
    assert llm.engine.paths["layer_ops"] == layer_ops
    assert llm.engine.paths["sampling"] == sampling
    assert got == expected


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("isa", [b.isa for b in cpu_kernels.BUILDS])
def test_vector_sized_heads_match_transformers_through_each_build(tmp_path, smollm2_path, isa, head_dim,
                                                                   monkeypatch):
    """Head sizes 64 and 128 take each vector build's unrolled paths, which the tiny Llama's 16
    does not, and a prompt chunk of 2 rows or more its keys packed once per call: a 330-token
    prompt in chunks of 64, each over the chunks before it in the cache."""
    runnable = [b.isa for b in cpu_kernels.runnable_builds()]
    if isa not in runnable:
        pytest.skip(f"this CPU cannot run the {isa} kernel build (it runs {runnable})")
    config = LlamaConfig(vocab_size=49152, hidden_size=4 * head_dim, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    # Random init scores every key alike, which would hide a wrong score.
    save_random_model(tmp_path, smollm2_path, config, seed=11, redrawn={"q_proj.weight": 0.1, "k_proj.weight": 0.1})
    build = cpu_kernels.load(isa)
    monkeypatch.setattr(cpu_kernels, "load", lambda: build)
    prompts = PROMPTS[:3] + ["one more time " * 110]
    got, llm = run_ours(tmp_path, prompts, 16, device="cpu", max_num_batched_tokens=64)
    assert llm.engine.paths["attention"] == f"C++ kernel, {isa} build"
    assert got == reference_tokens(tmp_path, prompts, 16)


@pytest.mark.parametrize("config_class", [Qwen2Config, MistralConfig])
def test_other_llama_family_architectures(tmp_path, smollm2_path, config_class):
    # Qwen2 adds a bias to q/k/v; Mistral is Llama under another name.
    config = config_class(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    # Random init leaves biases at zero, which would hide a missing bias.
    biases = {"q_proj.bias": 0.5, "k_proj.bias": 0.5} if config_class is Qwen2Config else {}
    save_random_model(tmp_path, smollm2_path, config, seed=7, redrawn=biases)
    prompts = PROMPTS[:4]
    assert run_ours(tmp_path, prompts, 12)[0] == reference_tokens(tmp_path, prompts, 12)


def test_smollm2_batched(smollm2_path, smollm2_expected):
    prompts, expected = smollm2_expected
    got, llm = run_ours(smollm2_path, prompts, 20)
    assert got == expected
    stats = llm.engine.kv_cache.stats()
    assert stats.prefix_cache_hits > 0, "the shared-prefix prompts hit the prefix cache"


def test_smollm2_small_chunks(smollm2_path, smollm2_expected):
    prompts, expected = smollm2_expected
    got, _ = run_ours(smollm2_path, prompts, 20, max_num_batched_tokens=16)
    assert got == expected


def test_smollm2_prefix_cache_reused_across_calls(smollm2_path, smollm2_expected):
    prompts, expected = smollm2_expected
    llm = LLM(str(smollm2_path), dtype="float32", num_kv_blocks=512)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[-3:], params)
    hits_before = llm.engine.kv_cache.prefix_cache_hits
    second = llm.generate(prompts[-3:], params)
    assert llm.engine.kv_cache.prefix_cache_hits > hits_before
    assert [o.token_ids for o in second] == expected[-3:]
    assert all(o.num_cached_tokens > 0 for o in second)


# Async scheduling too (the CUDA default): each step queued before the last one's tokens are
# read back, with preemption, prefix hits and chunks in the way.
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_smollm2_preemption_with_tiny_pool(smollm2_path, smollm2_expected, async_scheduling):
    prompts, expected = smollm2_expected
    got, llm = run_ours(smollm2_path, prompts, 20, num_kv_blocks=16, max_model_len=256, block_size=16,
                        async_scheduling=async_scheduling)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was small enough to force preemption"
    assert got == expected
