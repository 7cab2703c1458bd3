"""The scheduling policies on a virtual clock with the fake model: priority with preemption,
shortest job first, fair share (VTC), and the aging bound that keeps anyone from starving."""

import zlib

from hypothesis import given, settings, strategies as st
import pytest

from scheduler import Request, RequestStatus, SamplingParams, SchedulerConfig
from scheduler_sim import async_step, make_scheduler, reference_output, run, step


def request(request_id: str, prompt_len: int = 4, max_tokens: int = 8, priority: int = 0, tenant: str = "",
            arrival_time: float = 0.0) -> Request:
    # crc32, not hash(): str hashes change from run to run, and two prompts that happened to
    # share a first block would turn into a prefix-cache hit one run in fifty.
    prompt = [(zlib.crc32(request_id.encode()) + index) % 50 for index in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival_time=arrival_time, priority=priority, tenant=tenant)


def admitted_order(plans) -> list[str]:
    order = []
    for plan in plans:
        for scheduled in plan.scheduled:
            if scheduled.request.request_id not in order:
                order.append(scheduled.request.request_id)
    return order


def test_priority_orders_the_waiting_by_priority_then_arrival():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority", priority_aging_s=None)
    for request_id, priority, arrival in [("late-urgent", 0, 2.0), ("low", 2, 0.0), ("early-urgent", 0, 1.0),
                                          ("middle", 1, 0.5)]:
        scheduler.add_request(request(request_id, priority=priority, arrival_time=arrival))
    assert admitted_order(run(scheduler)) == ["early-urgent", "late-urgent", "middle", "low"]


def test_an_urgent_arrival_preempts_the_lowest_priority_last_admitted_and_it_resumes_intact():
    scheduler = make_scheduler(max_num_seqs=2, policy="priority", priority_aging_s=None)
    low_a, low_b = request("low-a", priority=1, max_tokens=12), request("low-b", priority=1, max_tokens=12)
    scheduler.add_request(low_a)
    scheduler.add_request(low_b)
    step(scheduler)
    step(scheduler)
    urgent = request("urgent", priority=0, arrival_time=scheduler.clock())
    scheduler.add_request(urgent)
    plan = step(scheduler)
    assert plan.preempted_ids == ["low-b"]  # equal priorities: the last admitted gives way
    assert {s.request.request_id for s in plan.scheduled} == {"low-a", "urgent"}
    assert low_b.status is RequestStatus.PREEMPTED
    plans = run(scheduler)
    # low-b waits for the urgent one's seat, then recomputes and ends exactly as it would alone.
    assert urgent.finished_time < low_b.finished_time
    for finished in (low_a, low_b, urgent):
        assert finished.output_token_ids == reference_output(finished.prompt_token_ids, 12 if finished is not urgent
                                                             else 8)
    assert plans  # ran to the end with the pool free (run checks it)


def test_a_running_request_is_not_preempted_by_an_equal_or_lower_priority():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority", priority_aging_s=None)
    scheduler.add_request(request("first", priority=1))
    step(scheduler)
    scheduler.add_request(request("same", priority=1, arrival_time=1.0))
    scheduler.add_request(request("lower", priority=5, arrival_time=1.0))
    assert not step(scheduler).preempted_ids


def test_when_blocks_run_out_the_lowest_priority_running_request_gives_them_up():
    # Room for the prompts but not for every request's growth: someone must be preempted.
    scheduler = make_scheduler(max_num_seqs=3, num_blocks=7, block_size=4, policy="priority", priority_aging_s=None)
    for request_id, priority in [("p0", 0), ("p2", 2), ("p1", 1)]:
        scheduler.add_request(request(request_id, prompt_len=7, max_tokens=10, priority=priority))
    plans = run(scheduler)
    preempted = [request_id for plan in plans for request_id in plan.preempted_ids]
    assert preempted and set(preempted) <= {"p2", "p1"}
    assert preempted[0] == "p2"


@pytest.mark.parametrize("policy", ["priority", "sjf"])
def test_aging_bounds_how_long_a_request_can_be_overtaken(policy):
    """A request three levels worse than a stream of rivals (priority 3 against 0; or 3 x 256
    prompt tokens' worth more work, output tokens weighed by the cost model) is overtaken only
    by rivals that arrive within 3 x aging_s of it."""
    aging_s, levels = 5.0, 3
    scheduler = make_scheduler(max_num_seqs=1, policy=policy, priority_aging_s=aging_s)
    if policy == "priority":
        victim = request("victim", max_tokens=2, priority=levels)
    else:
        output_token_cost = scheduler.waiting.output_token_cost()
        assert output_token_cost > 1  # the prior: a decode costs more than a prompt token on a CPU
        victim = request("victim", max_tokens=2 + round(levels * 256 / output_token_cost))
    scheduler.add_request(victim)
    rivals = []
    while victim.first_scheduled_time is None:
        assert len(rivals) < 200, "the disfavoured request starved"
        rivals.append(request(f"rival-{len(rivals)}", max_tokens=2, arrival_time=scheduler.clock()))
        scheduler.add_request(rivals[-1])
        step(scheduler)  # one rival arrives per step; each takes about three to serve
    ahead = [rival for rival in rivals if rival.first_scheduled_time is not None
             and rival.first_scheduled_time < victim.first_scheduled_time]
    assert ahead and max(rival.arrival_time for rival in ahead) < levels * aging_s
    later = [rival for rival in rivals if rival.arrival_time >= levels * aging_s]
    assert later  # rivals kept coming after the bound, and none of them went first


def test_sjf_runs_the_shortest_remaining_work_first():
    scheduler = make_scheduler(max_num_seqs=1, policy="sjf", priority_aging_s=None, max_model_len=256)
    for request_id, prompt_len, max_tokens in [("long", 40, 100), ("short", 4, 2), ("medium", 10, 20)]:
        scheduler.add_request(request(request_id, prompt_len=prompt_len, max_tokens=max_tokens))
    assert admitted_order(run(scheduler)) == ["short", "medium", "long"]


# -- fair share -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 24), st.integers(1, 16)),
                min_size=30, max_size=80),
       st.sampled_from([(1.0, 1.0), (1.0, 2.0), (3.0, 1.0)]))
def test_vtc_keeps_two_backlogged_tenants_within_the_bound(arrivals, weights):
    """While both tenants have requests waiting, their counters (weighted service per unit of
    weight) differ by at most what the running batch can still be charged plus one request."""
    max_num_seqs, max_prompt, max_output = 4, 24, 16
    scheduler = make_scheduler(max_model_len=64, max_num_seqs=max_num_seqs, max_num_batched_tokens=32,
                               num_blocks=64, block_size=4, policy="fair",
                               tenant_weights={"a": weights[0], "b": weights[1]})
    queue = scheduler.waiting
    for tenant in ("a", "b"):  # both backlogged from the start
        for index in range(4):
            scheduler.add_request(request(f"{tenant}-seed-{index}", prompt_len=8, max_tokens=8, tenant=tenant))
    one_request = queue.prompt_token_weight * max_prompt + queue.output_token_weight * max_output
    bound = (max_num_seqs + 1) * one_request / min(weights)
    for index, (tenant, prompt_len, max_tokens) in enumerate(arrivals):
        scheduler.add_request(request(f"{tenant}-{index}", prompt_len=prompt_len, max_tokens=max_tokens,
                                      tenant=tenant, arrival_time=scheduler.clock()))
        step(scheduler)
        backlogged = {r.tenant for r in scheduler.waiting}
        if backlogged == {"a", "b"}:
            assert abs(queue.counters["a"] - queue.counters["b"]) <= bound
    run(scheduler)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 24), st.integers(1, 16), st.integers(0, 2)),
                min_size=30, max_size=80),
       st.sampled_from([(1.0, 1.0), (1.0, 2.0), (3.0, 1.0)]))
def test_vtc_service_difference_stays_within_the_papers_bound(arrivals, weights):
    """Sheng et al. (OSDI 2024), Theorem 4.2: over any interval in which two clients are both
    backlogged, their service differs by at most 2U, U = max(w_p * L_input, w_q * M), with
    L_input the longest prompt and M the most tokens the KV cache holds. Weighted, as here,
    service is counted per unit of weight and the bound divided by the smaller weight."""
    num_blocks, block_size, max_prompt = 32, 4, 24
    scheduler = make_scheduler(max_model_len=64, max_num_seqs=6, max_num_batched_tokens=32, num_blocks=num_blocks,
                               block_size=block_size, policy="fair", tenant_weights={"a": weights[0], "b": weights[1]})
    queue = scheduler.waiting
    bound = 2 * max(queue.prompt_token_weight * max_prompt,
                    queue.output_token_weight * num_blocks * block_size) / min(weights)
    for tenant in ("a", "b"):
        for index in range(8):  # both backlogged from the start
            scheduler.add_request(request(f"{tenant}-seed-{index}", prompt_len=12, max_tokens=12, tenant=tenant))
    differences: list[float] = []  # counter a - counter b, over the current both-backlogged stretch
    longest = 0
    pending = list(enumerate(arrivals))
    while pending or scheduler.has_unfinished_requests():
        if pending:
            index, (tenant, prompt_len, max_tokens, gap) = pending.pop(0)
            scheduler.add_request(request(f"{tenant}-{index}", prompt_len=prompt_len, max_tokens=max_tokens,
                                          tenant=tenant, arrival_time=scheduler.clock()))
            for _ in range(gap):
                step(scheduler)
        step(scheduler)
        if {r.tenant for r in scheduler.waiting} == {"a", "b"}:
            differences.append(queue.counters["a"] - queue.counters["b"])
            assert max(differences) - min(differences) <= bound
            longest = max(longest, len(differences))
        else:
            differences = []
        assert scheduler.clock() < 5000
    assert longest >= 5  # the bound was put to the test
    assert scheduler.kv_cache.pool.num_free_blocks == num_blocks


def test_vtc_serves_weights_one_and_two_in_the_ratio_one_to_two():
    scheduler = make_scheduler(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_blocks=64,
                               block_size=4, policy="fair", tenant_weights={"light": 1.0, "heavy": 2.0})
    tokens = {"light": 0, "heavy": 0}
    for index in range(60):
        for tenant in tokens:
            scheduler.add_request(request(f"{tenant}-{index}", prompt_len=8, max_tokens=8, tenant=tenant))
    for _ in range(120):  # both stay backlogged throughout
        plan = step(scheduler)
        for scheduled in plan.scheduled:
            tokens[scheduled.request.tenant] += scheduled.num_new_tokens
    assert len({r.tenant for r in scheduler.waiting}) == 2
    assert tokens["heavy"] / tokens["light"] == pytest.approx(2.0, rel=0.15)
    queue = scheduler.waiting
    assert abs(queue.counters["light"] - queue.counters["heavy"]) <= 5 * (8 * 1 + 8 * 2)


def test_a_tenant_that_becomes_active_is_lifted_to_the_least_served_active_one():
    scheduler = make_scheduler(max_num_seqs=2, policy="fair")
    for index in range(6):
        scheduler.add_request(request(f"busy-{index}", tenant="busy", max_tokens=4))
    for _ in range(10):
        step(scheduler)
    served = scheduler.waiting.counters["busy"]
    assert served > 0
    scheduler.add_request(request("newcomer-0", tenant="newcomer"))
    # No credit for having been idle: the newcomer starts level with the active tenant.
    assert scheduler.waiting.counters["newcomer"] == served
    run(scheduler)


def test_fair_share_requests_of_two_tenants_that_need_the_same_blocks_both_finish():
    """Two prompts that cannot both fit: the one with less computed gives way, not the one of
    the tenant with more service. By service they would take turns, each preemption charging
    the other tenant for the recomputation, and neither would ever finish."""
    scheduler = make_scheduler(max_model_len=9, max_num_seqs=2, max_num_batched_tokens=3, num_blocks=9, block_size=1,
                               enable_prefix_caching=False, policy="fair")
    requests = [request(f"a{index}", prompt_len=7, max_tokens=1, tenant="a") for index in range(5)]
    requests.append(request("b0", prompt_len=7, max_tokens=1, tenant="b"))
    for item in requests:
        scheduler.add_request(item)
    run(scheduler, max_steps=100)
    for item in requests:
        assert item.output_token_ids == reference_output(item.prompt_token_ids, 1)


def test_config_rejects_an_unknown_policy_and_bad_weights():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        SchedulerConfig(max_model_len=64, policy="lottery")
    with pytest.raises(ValueError, match="weights"):
        SchedulerConfig(max_model_len=64, policy="fair", tenant_weights={"a": 0.0})


# -- deadlines ------------------------------------------------------------------------------


def test_a_deadline_ends_a_running_request_as_a_timeout_and_frees_its_blocks():
    scheduler = make_scheduler()
    late = request("late", max_tokens=30)
    late.deadline = 5.0
    on_time = request("on-time", max_tokens=3)
    on_time.deadline = 100.0
    scheduler.add_request(late)
    scheduler.add_request(on_time)
    timed_out = []
    while scheduler.has_unfinished_requests():
        timed_out += [r.request_id for r in step(scheduler).timed_out]
    assert timed_out == ["late"]
    assert late.status is RequestStatus.FINISHED_TIMEOUT and late.finished_time == 5.0
    assert on_time.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.kv_cache.pool.num_free_blocks == scheduler.kv_cache.pool.num_blocks


def test_the_queue_timeout_ends_only_requests_never_scheduled():
    scheduler = make_scheduler(max_num_seqs=1, queue_timeout_s=3.0)
    first, second = request("first", max_tokens=10), request("second", max_tokens=2)
    scheduler.add_request(first)
    scheduler.add_request(second)
    plans = run(scheduler)
    assert [r.request_id for plan in plans for r in plan.timed_out] == ["second"]
    assert first.status is RequestStatus.FINISHED_LENGTH  # running longer than the timeout is fine
    assert second.first_scheduled_time is None


@pytest.mark.parametrize("policy", ["priority", "sjf"])
def test_an_outranking_arrival_gets_the_budget_before_running_prompts(policy):
    scheduler = make_scheduler(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=16, num_blocks=256,
                               policy=policy, priority_aging_s=None)
    for index in range(3):
        scheduler.add_request(request(f"batch-{index}", prompt_len=100, max_tokens=50, priority=1))
    step(scheduler)  # a batch prompt is running, mid-prefill, and takes the whole budget
    urgent = request("urgent", prompt_len=12, max_tokens=4, priority=0, arrival_time=scheduler.clock())
    scheduler.add_request(urgent)
    plan = step(scheduler)
    assert plan.scheduled[0].request is urgent and plan.scheduled[0].num_new_tokens == 12
    assert urgent.first_token_time is not None and not plan.preempted_ids


@pytest.mark.parametrize("aging_s, held_back", [(None, True), (3.0, False)])
def test_under_priority_an_urgent_prompts_step_carries_no_lower_priority_prompt_work(aging_s, held_back):
    """Its step is as short as the urgent prompt and the decodes make it; the batch prompt's
    chunk waits a step. With aging, the batch prompt that came 4 s earlier has aged past the
    urgent one (rank 1 against 0 + 4 / 3) and is not held back: nothing starves."""
    scheduler = make_scheduler(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_blocks=256,
                               long_prefill_token_threshold=32, policy="priority", priority_aging_s=aging_s)
    decoding = request("batch-decoding", prompt_len=8, max_tokens=50, priority=1)
    prefilling = request("batch-prefilling", prompt_len=200, max_tokens=50, priority=1)
    scheduler.add_request(decoding)
    step(scheduler)
    scheduler.add_request(prefilling)
    step(scheduler)  # decoding decodes; prefilling takes a chunk
    scheduler.clock.now = 4.0
    scheduler.add_request(request("urgent", prompt_len=12, max_tokens=4, priority=0, arrival_time=4.0))
    plan = step(scheduler)
    scheduled = {s.request.request_id: s.num_new_tokens for s in plan.scheduled}
    assert scheduled["urgent"] == 12 and scheduled["batch-decoding"] == 1
    assert ("batch-prefilling" not in scheduled) == held_back
    # The step after, with the urgent prompt decoding, the batch prompt goes on.
    assert "batch-prefilling" in {s.request.request_id for s in step(scheduler).scheduled}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_under_priority_a_decode_of_lower_priority_is_never_held_back(async_scheduling):
    """Only prompt work waits for an urgent prompt's step. Under async scheduling a decode's
    input token is still in flight when its next step is planned: a decode all the same, so the
    batch request decodes beside the urgent one instead of waiting for it to finish."""
    scheduler = make_scheduler(max_model_len=256, num_blocks=256, policy="priority", priority_aging_s=None)
    urgent = request("urgent", prompt_len=12, max_tokens=20, priority=0)
    batch = request("batch", prompt_len=8, max_tokens=20, priority=1)
    scheduler.add_request(urgent)
    scheduler.add_request(batch)
    plans, in_flight = [], None
    while scheduler.has_unfinished_requests() or in_flight is not None:
        assert len(plans) < 100
        if async_scheduling:
            in_flight = async_step(scheduler, in_flight)
            plans.append(in_flight)
        else:
            plans.append(step(scheduler))
    together = [plan for plan in plans if plan is not None and len(plan.scheduled) == 2]
    assert len(together) >= 19  # every step of the urgent request's but its prompt's
    for item in (urgent, batch):
        assert item.output_token_ids == reference_output(item.prompt_token_ids, 20)


def test_under_fcfs_running_prompts_keep_the_budget():
    scheduler = make_scheduler(max_model_len=256, max_num_batched_tokens=16, num_blocks=256)
    scheduler.add_request(request("first", prompt_len=100, priority=1))
    step(scheduler)
    scheduler.add_request(request("second", prompt_len=12, priority=0, arrival_time=scheduler.clock()))
    assert [s.request.request_id for s in step(scheduler).scheduled] == ["first"]


# -- preemption by swap -----------------------------------------------------------------------


def preempting_workload(scheduler, num_requests: int = 4) -> list[Request]:
    requests = [request(f"r{index}", prompt_len=10, max_tokens=14) for index in range(num_requests)]
    for item in requests:
        scheduler.add_request(item)
    return requests


def test_long_victims_are_swapped_and_resume_without_recompute():
    # Four requests that each grow to 24 tokens (6 blocks) in a pool of 16: some must give way.
    swapping = make_scheduler(num_blocks=16, block_size=4, num_host_blocks=32, swap_threshold_tokens=1)
    requests = preempting_workload(swapping)
    plans = run(swapping)
    assert swapping.num_preemptions_by_mode["swap"] > 0 and swapping.num_preemptions_by_mode["recompute"] == 0
    assert swapping.num_blocks_swapped["in"] == swapping.num_blocks_swapped["out"] > 0
    assert sum(len(plan.swap_out) for plan in plans) == swapping.num_blocks_swapped["out"]
    for item in requests:
        assert item.output_token_ids == reference_output(item.prompt_token_ids, 14)
    assert swapping.kv_cache.num_free_host_blocks == 32

    recomputing = make_scheduler(num_blocks=16, block_size=4)
    preempting_workload(recomputing)
    computed = [sum(plan.num_batched_tokens for plan in plans), sum(p.num_batched_tokens for p in run(recomputing))]
    assert computed[0] < computed[1]  # swapped requests were not computed twice
    assert recomputing.num_preemptions_by_mode["recompute"] > 0


def test_short_victims_and_those_that_do_not_fit_are_recomputed():
    scheduler = make_scheduler(num_blocks=16, block_size=4, num_host_blocks=32, swap_threshold_tokens=10_000)
    preempting_workload(scheduler)
    run(scheduler)
    assert scheduler.num_preemptions_by_mode == {"recompute": scheduler.num_preemptions, "swap": 0}
    tiny_pool = make_scheduler(num_blocks=16, block_size=4, num_host_blocks=1, swap_threshold_tokens=1)
    preempting_workload(tiny_pool)
    run(tiny_pool)
    assert tiny_pool.num_preemptions_by_mode["swap"] == 0 < tiny_pool.num_preemptions


def test_aborting_a_swapped_out_request_frees_its_host_blocks():
    scheduler = make_scheduler(num_blocks=16, block_size=4, num_host_blocks=32, swap_threshold_tokens=1)
    requests = preempting_workload(scheduler)
    while not any(scheduler.kv_cache.is_swapped(item.request_id) for item in requests):
        step(scheduler)
    swapped = next(item for item in requests if scheduler.kv_cache.is_swapped(item.request_id))
    scheduler.abort(swapped.request_id)
    run(scheduler)
    assert scheduler.kv_cache.num_free_host_blocks == 32
