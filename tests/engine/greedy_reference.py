"""Greedy tokens from transformers' `generate` and from our engine, for the equivalence tests."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM
from scheduler import SamplingParams


def reference_tokens(path, prompts, max_tokens, attn_implementation: str | None = None) -> list[list[int]]:
    """Each prompt alone (no padding) through transformers in float32; `attn_implementation`
    names a registered attention function, None transformers' default."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Our ignore_eos keeps generating past EOS; min_new_tokens would instead forbid EOS and
    # change the tokens, so the reference is told there is no EOS at all.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    expected = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False)
        expected.append(out[0, len(ids):].tolist())
    return expected


def run_ours(path, prompts, max_tokens, **config) -> tuple[list[list[int]], LLM]:
    # Just enough for one request of SmolLM2's full 8192 positions: the default 2 GiB is slow to allocate.
    config.setdefault("num_kv_blocks", 512)
    llm = LLM(str(path), dtype="float32", **config)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks, "every block is free or cached after the run"
    return [o.token_ids for o in outputs], llm
