"""Shared fixtures: the embedded SmolLM2 folder and a tiny random Llama built on the spot."""

import os
from pathlib import Path

import pytest
import torch

# Where there is no GPU, Triton kernels run on CPU tensors under its interpreter. Triton reads
# this when a kernel is defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from engine.embedded_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, smollm2_path) -> Path:
    """A random 2-layer Llama with grouped-query attention and SmolLM2's tokenizer.

    Built with transformers itself, so its folder is exactly what a Hugging Face user
    would hand us; the vocabulary matches the tokenizer so any text round-trips.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return folder



@pytest.fixture()
def cpu_without(monkeypatch):
    """`cpu_without("avx512f", ...)` makes those CPU features look absent (engine/host.py), as on a lesser host."""
    from engine import host

    def disable(*flags: str):
        monkeypatch.setenv("ITERSERVE_CPU_DISABLE", ",".join(flags))
        host.current.cache_clear()
        return host.current()

    yield disable
    host.current.cache_clear()
