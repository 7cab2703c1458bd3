"""Preemption by swap on the real engine: KV copied to the host pool and back gives exactly the
tokens of a run that never preempted, and both pools are empty at the end."""

import pytest

from engine import LLM
from scheduler import SamplingParams

PROMPTS = [f"Story number {index}: once upon a time there was a" for index in range(6)]
PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def generate(tiny_model_path, **engine_args):
    llm = LLM(str(tiny_model_path), dtype="float32", max_model_len=128, block_size=4, num_threads=1,
              enable_prefix_caching=False, **engine_args)
    outputs = [output.token_ids for output in llm.generate(PROMPTS, PARAMS)]
    return outputs, llm.engine


@pytest.fixture(scope="module")
def unpreempted(tiny_model_path):
    outputs, engine = generate(tiny_model_path, num_kv_blocks=512)
    assert engine.scheduler.num_preemptions == 0
    return outputs


@pytest.mark.parametrize("threshold,mode", [(1, "swap"), (10_000, "recompute")])
def test_preempted_requests_give_the_tokens_of_an_unpreempted_run(tiny_model_path, unpreempted, threshold, mode):
    # 6 requests growing to ~55 tokens (14 blocks each) in 40 blocks: most of them get preempted.
    outputs, engine = generate(tiny_model_path, num_kv_blocks=40, swap_space=64 * 1024 * 1024,
                               swap_threshold_tokens=threshold)
    assert engine.scheduler.num_preemptions_by_mode[mode] > 0
    assert engine.scheduler.num_preemptions_by_mode[{"swap": "recompute", "recompute": "swap"}[mode]] == 0
    assert outputs == unpreempted
    kv_cache = engine.kv_cache
    assert kv_cache.pool.num_free_blocks == kv_cache.pool.num_blocks
    assert kv_cache.num_free_host_blocks == kv_cache.num_host_blocks > 0
