"""Static and dynamic batching under a virtual clock: launch on a full batch or a timeout, run to
completion admitting nothing meanwhile, buckets by prompt length, and padding counted by hand."""

from hypothesis import given, settings, strategies as st
import pytest

from scheduler import SchedulerConfig
from scheduler_sim import assert_pool_free, assert_replay_outputs, make_request, make_scheduler, reference_output, replay, run, step
from test_scheduler_random import configs, workloads


def prompt(length: int, seed: int = 0) -> list[int]:
    return [(seed * 13 + position * 7 + 3) % 50 for position in range(length)]


def scheduled_ids(plan) -> list[str]:
    return [s.request.request_id for s in plan.scheduled]


def add(scheduler, request_id: str, length: int, max_tokens: int = 4):
    request = make_request(request_id, prompt(length, seed=len(scheduler.requests)), max_tokens=max_tokens)
    scheduler.add_request(request)
    return request


# -- static: launch ---------------------------------------------------------------------------


def test_static_batch_waits_to_fill_and_launches_once_full():
    scheduler = make_scheduler(batching="static", static_batch_size=3, batch_timeout_s=100.0)
    add(scheduler, "a", 5)
    add(scheduler, "b", 5)
    assert step(scheduler).is_empty  # two of three: keep waiting
    assert scheduler.seconds_until_launch() == 99.0
    add(scheduler, "c", 5)
    assert scheduler.seconds_until_launch() == 0.0
    assert scheduled_ids(step(scheduler)) == ["a", "b", "c"]


def test_static_batch_launches_part_full_when_the_oldest_times_out():
    scheduler = make_scheduler(batching="static", static_batch_size=4, batch_timeout_s=2.5)
    first = add(scheduler, "a", 5)
    scheduler.clock.now = 1.0
    add(scheduler, "b", 5)
    assert scheduler.seconds_until_launch() == 1.5  # the oldest, not the newest, sets the deadline
    assert step(scheduler).is_empty  # t=1
    assert scheduler.seconds_until_launch() == 0.5
    assert step(scheduler).is_empty  # t=2
    assert scheduled_ids(step(scheduler)) == ["a", "b"]  # t=3: a has waited 3 >= 2.5
    assert first.first_scheduled_time == 3.0
    assert scheduler.seconds_until_launch() == 0.0  # a batch runs: nothing to wait for
    run(scheduler)


def test_a_zero_timeout_launches_whatever_waits():
    scheduler = make_scheduler(batching="static", static_batch_size=4, batch_timeout_s=0.0)
    add(scheduler, "a", 5)
    assert scheduled_ids(step(scheduler)) == ["a"]


# -- static: run to completion ----------------------------------------------------------------


def test_a_static_batch_runs_to_completion_and_admits_nothing_meanwhile():
    scheduler = make_scheduler(batching="static", static_batch_size=2, batch_timeout_s=0.0)
    short = add(scheduler, "short", 5, max_tokens=2)
    add(scheduler, "long", 5, max_tokens=6)
    plans = [step(scheduler)]
    later = [add(scheduler, name, 5, max_tokens=2) for name in ("c", "d")]
    while not short.is_finished:
        plans.append(step(scheduler))
    # The short one's blocks are free, but its seat is held until the long one ends.
    assert scheduler.kv_cache.block_ids("short") == []
    assert scheduler.num_running == 1 and scheduler.num_waiting == 2
    plans += run(scheduler)
    first_step = {rid: min(i for i, plan in enumerate(plans) if rid in scheduled_ids(plan)) for rid in ("c", "d")}
    last_long_step = max(i for i, plan in enumerate(plans) if "long" in scheduled_ids(plan))
    assert first_step == {"c": last_long_step + 1, "d": last_long_step + 1}
    assert all(set(scheduled_ids(plan)) <= {"short", "long"} for plan in plans[:last_long_step + 1])
    assert all(r.output_token_ids == reference_output(r.prompt_token_ids, 2) for r in later)


def test_padding_is_counted_on_a_hand_computed_batch():
    # Prompts 4, 6, 8 padded to 8: 4 + 2 + 0 = 6 prompt tokens of padding. Outputs 2, 3 and 5
    # tokens take five steps; a finished row is padded every step after its last:
    # step 1 (prefill) 0, step 2: 0, step 3: 1 (a), step 4: 2 (a, b), step 5: 2. 6 + 5 = 11.
    scheduler = make_scheduler(batching="static", static_batch_size=3, batch_timeout_s=0.0)
    add(scheduler, "a", 4, max_tokens=2)
    add(scheduler, "b", 6, max_tokens=3)
    add(scheduler, "c", 8, max_tokens=5)
    step(scheduler)
    assert scheduler.padding_tokens == 6
    plans = [step(scheduler) for _ in range(4)]
    assert [len(plan.scheduled) for plan in plans] == [3, 2, 1, 1]
    assert scheduler.padding_tokens == 11
    assert not scheduler.has_unfinished_requests()
    assert_pool_free(scheduler)


def test_continuous_batching_pads_nothing():
    scheduler = make_scheduler()
    add(scheduler, "a", 4, max_tokens=2)
    add(scheduler, "b", 8, max_tokens=5)
    run(scheduler)
    assert scheduler.padding_tokens == 0


def test_an_aborted_member_holds_its_row_until_the_batch_ends():
    scheduler = make_scheduler(batching="static", static_batch_size=2, batch_timeout_s=0.0)
    add(scheduler, "a", 4, max_tokens=4)
    add(scheduler, "b", 4, max_tokens=4)
    step(scheduler)
    scheduler.abort("a")
    add(scheduler, "c", 4, max_tokens=1)
    plans = run(scheduler)
    assert [scheduled_ids(plan) for plan in plans] == [["b"], ["b"], ["b"], ["c"]]
    assert scheduler.padding_tokens == 3  # a's row, for each of b's three remaining steps


def test_aborting_a_held_request_ends_the_wait():
    scheduler = make_scheduler(batching="static", static_batch_size=2, batch_timeout_s=10.0)
    add(scheduler, "a", 4)
    assert scheduler.seconds_until_launch() == 10.0
    scheduler.abort("a")
    assert scheduler.seconds_until_launch() == 0.0
    assert not scheduler.has_unfinished_requests()


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_members_preempted_for_blocks_stay_in_the_batch(enable_prefix_caching):
    # 8 blocks of 4 tokens: three requests growing to 20 tokens each cannot all fit.
    scheduler = make_scheduler(batching="static", static_batch_size=3, batch_timeout_s=0.0, num_blocks=8,
                               max_model_len=24, enable_prefix_caching=enable_prefix_caching)
    batch = [add(scheduler, name, 8, max_tokens=12) for name in "abc"]
    step(scheduler)
    late = add(scheduler, "late", 4, max_tokens=2)
    plans = run(scheduler)
    assert scheduler.num_preemptions > 0
    late_first = min(i for i, plan in enumerate(plans) if "late" in scheduled_ids(plan))
    assert all("late" not in scheduled_ids(plan) for plan in plans[:late_first])
    assert all(r.finished_time <= late.first_scheduled_time for r in batch)
    assert all(r.output_token_ids == reference_output(r.prompt_token_ids, 12) for r in batch)


def test_a_batch_larger_than_the_token_budget_is_prefilled_in_chunks():
    scheduler = make_scheduler(batching="static", static_batch_size=3, batch_timeout_s=0.0,
                               max_num_batched_tokens=8)
    batch = [add(scheduler, name, 6, max_tokens=3) for name in "abc"]
    add(scheduler, "late", 2, max_tokens=1)
    plans = run(scheduler)
    assert [scheduled_ids(plan) for plan in plans][-1] == ["late"]
    assert all(r.output_token_ids == reference_output(r.prompt_token_ids, 3) for r in batch)


# -- dynamic ----------------------------------------------------------------------------------


def test_dynamic_launches_a_full_bucket_and_holds_the_others_until_their_timeout():
    scheduler = make_scheduler(batching="dynamic", static_batch_size=2, batch_timeout_s=5.0)
    add(scheduler, "a", 3, max_tokens=2)  # bucket 4
    lone = add(scheduler, "b", 10, max_tokens=2)  # bucket 16
    add(scheduler, "c", 4, max_tokens=2)  # bucket 4: now full
    plans = [step(scheduler), step(scheduler)]  # t=0, 1
    assert [scheduled_ids(plan) for plan in plans] == [["a", "c"], ["a", "c"]]
    assert scheduler.padding_tokens == 1  # a's prompt padded to c's 4 tokens
    assert scheduler.seconds_until_launch() == 3.0  # t=2: b has waited 2 of 5
    assert all(step(scheduler).is_empty for _ in range(3))  # t=2, 3, 4
    assert scheduled_ids(step(scheduler)) == ["b"]  # t=5
    assert lone.first_scheduled_time == 5.0
    run(scheduler)


def test_dynamic_launches_the_oldest_due_bucket_first():
    scheduler = make_scheduler(batching="dynamic", static_batch_size=4, batch_timeout_s=2.0)
    add(scheduler, "long", 12, max_tokens=1)  # bucket 16, t=0
    scheduler.clock.now = 1.0
    add(scheduler, "short", 2, max_tokens=1)  # bucket 2, t=1
    scheduler.clock.now = 5.0  # both are due
    assert scheduled_ids(step(scheduler)) == ["long"]
    assert scheduled_ids(step(scheduler)) == ["short"]


def test_dynamic_buckets_are_powers_of_two():
    from scheduler.batching import DynamicBatching

    bucket = {length: DynamicBatching.bucket(make_request("r", prompt(length))) for length in (1, 2, 3, 4, 5, 16, 17)}
    assert bucket == {1: 0, 2: 1, 3: 2, 4: 2, 5: 3, 16: 4, 17: 5}


# -- configuration ----------------------------------------------------------------------------


def test_config_checks_the_batching_knobs():
    with pytest.raises(ValueError, match="static_batch_size"):
        SchedulerConfig(max_model_len=64, max_num_seqs=4, static_batch_size=5)
    with pytest.raises(ValueError, match="static_batch_size"):
        SchedulerConfig(max_model_len=64, static_batch_size=0)
    with pytest.raises(ValueError, match="batch_timeout_s"):
        SchedulerConfig(max_model_len=64, batch_timeout_s=-1.0)
    assert SchedulerConfig(max_model_len=64, max_num_seqs=6).batch_size == 6
    with pytest.raises(ValueError, match="batching mode"):
        make_scheduler(batching="adaptive")


@pytest.mark.parametrize("batching", ["static", "dynamic"])
@pytest.mark.parametrize("policy", ["priority", "sjf"])
def test_a_launched_batch_is_admitted_before_equals_and_later_arrivals_that_outrank_it(policy, batching):
    # r1 is launched alone; r2 ties with it (priority) or outranks it (sjf: a shorter job).
    scheduler = make_scheduler(max_model_len=16, max_num_seqs=1, enable_chunked_prefill=False, num_blocks=16,
                               block_size=1, enable_prefix_caching=False, policy=policy, batching=batching,
                               static_batch_size=1, batch_timeout_s=0.0)
    first = add(scheduler, "r0", 6, max_tokens=1)
    launched = add(scheduler, "r1", 9 if policy == "sjf" else 6, max_tokens=1)
    assert scheduled_ids(step(scheduler)) == ["r0"]
    later = add(scheduler, "r2", 6, max_tokens=1)
    run(scheduler, max_steps=10)
    assert all(item.is_finished for item in (first, launched, later))


# -- random workloads -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(data=st.data(), batching=st.sampled_from(["static", "dynamic"]), timeout_s=st.sampled_from([0.0, 1.5, 4.0]))
def test_random_workloads_run_batches_to_completion_with_exact_outputs(data, batching, timeout_s):
    config = data.draw(configs(), label="config")
    specs, aborts = data.draw(workloads(config["max_model_len"]), label="workload")
    batch_size = data.draw(st.integers(1, config["max_num_seqs"]), label="batch_size")
    scheduler = make_scheduler(**config, batching=batching, static_batch_size=batch_size, batch_timeout_s=timeout_s)
    requests = [make_request(f"r{i}", spec["prompt"], spec["max_tokens"]) for i, spec in enumerate(specs)]
    aborted: set[str] = set()
    members = scheduler.batching.members
    for victim, plan in replay(scheduler, requests, specs, aborts):
        if victim is not None:
            aborted.add(victim.request_id)
        if scheduler.batching.members is not members:
            # A new batch launches only once every member of the last one has finished.
            assert all(member.is_finished for member in members)
            members = scheduler.batching.members
            assert 1 <= len(members) <= batch_size
            if batching == "dynamic":
                assert len({scheduler.batching.bucket(member) for member in members}) == 1
        assert {s.request.request_id for s in plan.scheduled} <= {member.request_id for member in members}

    assert_pool_free(scheduler)
    assert_replay_outputs(requests, specs, aborted, config["max_model_len"])
