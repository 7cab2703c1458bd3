"""Random workloads, configurations and aborts: every plan keeps the limits, every output is exact.

Prompts use three token ids so prefix-cache hits are common, and pools are often just
big enough for one request at full length, so preemption is common too; the policies that
rank requests differ, preempt (priority) and swap do, since that is where plans interleave.
"""

from hypothesis import event, given, settings, strategies as st
import pytest

from scheduler_sim import assert_pool_free, assert_replay_outputs, make_request, make_scheduler, replay


@st.composite
def configs(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(4, 32))
    chunked = draw(st.booleans())
    # Tiny budgets are where off-by-one errors live, so they are drawn often.
    budgets = st.integers(1, 3) | st.integers(1, 40) if chunked else st.integers(max_model_len, max_model_len + 8)
    budget = draw(budgets)
    swaps = draw(st.booleans())
    return dict(
        max_model_len=max_model_len,
        max_num_seqs=draw(st.integers(1, 5)),
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        # The engine refuses a pool smaller than one request at max_model_len.
        num_blocks=-(-max_model_len // block_size) + draw(st.integers(0, 3)),
        block_size=block_size,
        enable_prefix_caching=draw(st.booleans()),
        policy=draw(st.sampled_from(["fcfs", "priority", "sjf", "fair"])),
        num_host_blocks=draw(st.integers(0, 2 * max_model_len)) if swaps else 0,
        swap_threshold_tokens=draw(st.integers(1, max_model_len)) if swaps else None,
    )


@st.composite
def workloads(draw, max_model_len):
    num_requests = draw(st.integers(2, 6))
    shared_prefix = draw(st.lists(st.integers(0, 2), min_size=max_model_len // 2, max_size=max_model_len))
    requests = []
    for _ in range(num_requests):
        # Most prompts start with much of the shared prefix; a tail makes them differ.
        prefix = shared_prefix[:len(shared_prefix) - draw(st.integers(0, len(shared_prefix)))]
        prompt = (prefix + draw(st.lists(st.integers(0, 2), min_size=1, max_size=4)))[:max_model_len - 1]
        requests.append(dict(prompt=prompt, max_tokens=draw(st.integers(1, 12)), arrival_step=draw(st.integers(0, 6)),
                             priority=draw(st.integers(0, 2)), tenant=draw(st.sampled_from(["a", "b"]))))
    aborts = draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, num_requests - 1)), max_size=2))
    return requests, dict(aborts)


@pytest.mark.parametrize("async_scheduling", [False, True])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_workloads_keep_limits_and_give_exact_outputs(data, async_scheduling):
    """Under async scheduling too: each step is scheduled before the one before it has its
    tokens, and aborts land while a step is in flight."""
    config = data.draw(configs(), label="config")
    specs, aborts = data.draw(workloads(config["max_model_len"]), label="workload")
    scheduler = make_scheduler(**config)
    requests = [make_request(f"r{i}", spec["prompt"], spec["max_tokens"]) for i, spec in enumerate(specs)]
    for request, spec in zip(requests, specs):
        request.priority, request.tenant = spec["priority"], spec["tenant"]
    aborted: set[str] = set()
    for victim, plan in replay(scheduler, requests, specs, aborts, async_scheduling=async_scheduling):
        # step() and async_step() check budget, seats, tables
        if victim is not None:  # aborted in whatever state it was
            aborted.add(victim.request_id)
            assert scheduler.kv_cache.block_ids(victim.request_id) == []
        if plan is not None:
            assert not aborted & {s.request.request_id for s in plan.scheduled}
    assert all(request.num_pending_tokens == 0 for request in requests if not request.is_finished)

    assert_pool_free(scheduler)
    event(f"preempted: {scheduler.num_preemptions > 0}")
    event(f"swapped: {scheduler.num_preemptions_by_mode['swap'] > 0}")
    event(f"prefix hit: {any(r.num_cached_tokens for r in requests)}")
    assert_replay_outputs(requests, specs, aborted, config["max_model_len"])
