"""Preemption by swap on the real engine: KV copied to the host pool and back gives exactly the
tokens of a run that never preempted, and both pools are empty at the end."""

import pytest
import torch

from engine import LLM
from engine.model_runner import swap_blocks
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


def test_swap_copies_read_every_source_before_any_copy_writes():
    """One schedule may swap a request in and then another out into the host blocks the first
    gave up (an outranking swapped request is admitted before a running one is preempted), and
    give a swapped-in request the device blocks a swapped-out one gave up: every copy must move
    its block as it was before the step's copies began."""
    block_size = 2
    device = torch.arange(2 * 4 * block_size * 3, dtype=torch.float32).reshape(1, 2, 4 * block_size, 1, 3)
    host = -1 - torch.arange(2 * 3 * block_size * 3, dtype=torch.float32).reshape(1, 2, 3 * block_size, 1, 3)
    device_before, host_before = device.clone(), host.clone()

    def block(cache, index):
        return cache.unflatten(2, (-1, block_size))[:, :, index]

    swap_blocks(device, host, block_size, swap_out=[(1, 0)], swap_in=[(0, 1), (2, 3)])
    assert torch.equal(block(host, 0), block(device_before, 1))  # out into the host block an in gave up
    assert torch.equal(block(device, 1), block(host_before, 0))  # in into the device block that out gave up
    assert torch.equal(block(device, 3), block(host_before, 2))
    for index in (0, 2):
        assert torch.equal(block(device, index), block(device_before, index))
    for index in (1, 2):
        assert torch.equal(block(host, index), block(host_before, index))
