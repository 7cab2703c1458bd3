"""Scheduler scenarios under a fake model and a virtual clock: budget, chunking, preemption, abort, stops."""

import pytest

from scheduler import RequestStatus, SchedulerConfig
from scheduler_sim import assert_pool_free, make_request, make_scheduler, reference_output, run, step

EOS = 2


def prompt(length: int, seed: int = 0) -> list[int]:
    return [(seed * 13 + position * 7 + 3) % 50 for position in range(length)]


def new_tokens_per_step(plans, request_id: str) -> list[int]:
    return [s.num_new_tokens for plan in plans for s in plan.scheduled if s.request.request_id == request_id]


# -- budget, chunking, seats ------------------------------------------------------------------


def test_long_prompt_is_chunked_to_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = make_request("a", prompt(30), max_tokens=3)
    scheduler.add_request(request)
    plans = run(scheduler)
    assert new_tokens_per_step(plans, "a") == [8, 8, 8, 6, 1, 1]
    assert request.output_token_ids == reference_output(prompt(30), 3)
    assert request.status.finish_reason == "length"
    # The virtual clock ticks once a step: the first token comes out of the fourth.
    assert (request.first_scheduled_time, request.first_token_time, request.finished_time) == (0.0, 3.0, 5.0)


def test_long_prefill_threshold_lets_a_short_prompt_start_beside_a_long_one():
    scheduler = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=6)
    long, short = make_request("long", prompt(20), max_tokens=2), make_request("short", prompt(4, seed=1), max_tokens=2)
    scheduler.add_request(long)
    scheduler.add_request(short)
    plans = run(scheduler)
    assert new_tokens_per_step(plans, "long") == [6, 6, 6, 2, 1]
    assert new_tokens_per_step(plans, "short") == [4, 1]  # its first token in step one, not after the long prefill
    assert long.output_token_ids == reference_output(prompt(20), 2)
    assert short.output_token_ids == reference_output(prompt(4, seed=1), 2)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(max_model_len=64, long_prefill_token_threshold=-1)


def test_a_one_token_budget_still_makes_progress():
    scheduler = make_scheduler(max_num_batched_tokens=1)
    scheduler.add_request(make_request("a", prompt(3), max_tokens=2))
    scheduler.add_request(make_request("b", prompt(2, seed=1), max_tokens=2))
    plans = run(scheduler)
    assert [[(s.request.request_id, s.num_new_tokens) for s in plan.scheduled] for plan in plans] == [
        [("a", 1)], [("a", 1)], [("a", 1)], [("a", 1)], [("b", 1)], [("b", 1)], [("b", 1)]]


def test_prompts_are_never_chunked_with_chunked_prefill_off():
    scheduler = make_scheduler(max_model_len=32, max_num_batched_tokens=32, enable_chunked_prefill=False)
    for request_id in "ab":
        scheduler.add_request(make_request(request_id, prompt(20, seed=ord(request_id)), max_tokens=4))
    plans = run(scheduler)  # run() checks every scheduled prefill covers the whole prompt
    assert new_tokens_per_step(plans, "a") == [20, 1, 1, 1]
    assert new_tokens_per_step(plans, "b") == [20, 1, 1, 1]  # waited a step rather than take 12
    assert [s.request.request_id for s in plans[0].scheduled] == ["a"]


def test_config_rejects_a_budget_below_max_model_len_without_chunking():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=64, max_num_batched_tokens=32, enable_chunked_prefill=False)
    SchedulerConfig(max_model_len=64, max_num_batched_tokens=32, enable_chunked_prefill=True)
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=64, max_num_seqs=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=64, max_num_batched_tokens=0)


def test_seat_limit_holds_back_requests_until_a_seat_frees():
    scheduler = make_scheduler(max_num_seqs=2)
    requests = [make_request(f"r{i}", prompt(5, seed=i), max_tokens=3) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    plans = run(scheduler)
    assert max(len(plan.scheduled) for plan in plans) == 2
    assert [r.first_scheduled_time for r in requests] == [0.0, 0.0, 3.0, 3.0, 6.0]
    assert all(r.output_token_ids == reference_output(prompt(5, seed=i), 3) for i, r in enumerate(requests))


def test_every_running_decode_gets_a_token_every_step():
    scheduler = make_scheduler(max_num_batched_tokens=6)
    decoders = [make_request(f"d{i}", prompt(2, seed=i), max_tokens=6) for i in range(3)]
    for request in decoders:
        scheduler.add_request(request)
    step(scheduler)
    scheduler.add_request(make_request("long", prompt(40), max_tokens=2))
    while not decoders[0].is_finished:
        plan = step(scheduler)
        served = {s.request.request_id: s.num_new_tokens for s in plan.scheduled}
        assert served == {"d0": 1, "d1": 1, "d2": 1, "long": 3}  # the prefill takes what is left
    assert all(len(r.output_token_ids) == 6 for r in decoders)
    run(scheduler)


# -- preemption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preempted_requests_resume_with_the_same_outputs(enable_prefix_caching):
    def outputs(num_blocks):
        scheduler = make_scheduler(num_blocks=num_blocks, block_size=2, enable_prefix_caching=enable_prefix_caching)
        requests = [make_request(f"r{i}", prompt(6, seed=i), max_tokens=10) for i in range(4)]
        for request in requests:
            scheduler.add_request(request)
        run(scheduler)
        return {r.request_id: r.output_token_ids for r in requests}, scheduler.num_preemptions

    roomy, roomy_preemptions = outputs(num_blocks=64)
    tight, tight_preemptions = outputs(num_blocks=9)  # one request at full length needs 8
    assert (roomy_preemptions, tight_preemptions > 0) == (0, True)
    assert tight == roomy == {f"r{i}": reference_output(prompt(6, seed=i), 10) for i in range(4)}


def test_the_latest_admitted_is_preempted_and_waits_first_in_line():
    scheduler = make_scheduler(num_blocks=6, block_size=2)
    first, second = make_request("first", prompt(4, 1)), make_request("second", prompt(4, 2))
    for request in (first, second, make_request("third", prompt(6, 3), max_tokens=4)):
        scheduler.add_request(request)
    assert [s.request.request_id for s in step(scheduler).scheduled] == ["first", "second"]
    plan = step(scheduler)
    while not plan.preempted_ids:
        plan = step(scheduler)
    assert plan.preempted_ids == ["second"] and second.status is RequestStatus.PREEMPTED
    assert [s.request.request_id for s in plan.scheduled] == ["first"]
    assert scheduler.kv_cache.block_ids("second") == [] and second.num_computed_tokens == 0
    assert [r.request_id for r in scheduler.waiting] == ["second", "third"]
    run(scheduler)
    assert second.num_preemptions >= 1
    assert second.output_token_ids == reference_output(prompt(4, 2), 8)


# -- abort ---------------------------------------------------------------------------------------


def abort_and_check(scheduler, request_id: str) -> None:
    request = scheduler.abort(request_id)
    assert request.status is RequestStatus.FINISHED_ABORTED and request.status.finish_reason == "abort"
    assert scheduler.kv_cache.block_ids(request_id) == []
    assert request not in scheduler.running and request not in list(scheduler.waiting)
    assert scheduler.abort(request_id) is None  # gone for good
    later = run(scheduler)
    assert all(request_id not in [s.request.request_id for s in plan.scheduled] for plan in later)


def test_abort_a_waiting_request():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("a", prompt(5), max_tokens=4))
    scheduler.add_request(make_request("b", prompt(5, seed=1)))
    step(scheduler)
    assert scheduler.requests["b"].status is RequestStatus.WAITING
    abort_and_check(scheduler, "b")


def test_abort_a_running_request_mid_prefill():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", prompt(30)))
    step(scheduler)
    assert len(scheduler.kv_cache.block_ids("a")) == 2
    abort_and_check(scheduler, "a")
    assert_pool_free(scheduler)


def test_abort_a_preempted_request():
    scheduler = make_scheduler(num_blocks=6, block_size=2)
    requests = [make_request(f"r{i}", prompt(4, seed=i), max_tokens=8) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    while not any(r.status is RequestStatus.PREEMPTED for r in requests):
        step(scheduler)
    victim = next(r for r in requests if r.status is RequestStatus.PREEMPTED)
    abort_and_check(scheduler, victim.request_id)
    survivors = [r for r in requests if r is not victim]
    assert all(r.output_token_ids == reference_output(prompt(4, seed=int(r.request_id[1:])), 8) for r in survivors)


def test_abort_while_the_step_runs_drops_its_token():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", prompt(5)))
    plan = scheduler.schedule()
    request = scheduler.abort("a")
    assert scheduler.update(plan, {"a": 7}) == []
    assert request.output_token_ids == [] and request.num_computed_tokens == 0
    assert_pool_free(scheduler)
    assert scheduler.schedule().is_empty


# -- stop conditions -------------------------------------------------------------------------------


@pytest.mark.parametrize("params, script, expected, reason", [
    ({}, [5, EOS, 7, 7], [5, EOS], "stop"),
    ({"ignore_eos": True}, [5, EOS, 7, 7], [5, EOS, 7, 7], "length"),
    ({"stop_token_ids": [7]}, [5, 8, 7, 9], [5, 8, 7], "stop"),
    ({"ignore_eos": True, "stop_token_ids": [EOS]}, [5, EOS, 7, 7], [5, EOS], "stop"),
    ({"max_tokens": 3}, [5, 6, 7, 8], [5, 6, 7], "length"),
    ({"min_tokens": 3}, [EOS] * 4, [EOS] * 3, "stop"),
    ({"min_tokens": 2, "stop_token_ids": [7]}, [7, 7, 7, 7], [7, 7], "stop"),
])
def test_stop_conditions(params, script, expected, reason):
    scheduler = make_scheduler()
    request = make_request("a", prompt(5), **{"max_tokens": 4, "eos": frozenset({EOS}), **params})
    scheduler.add_request(request)
    run(scheduler, model=lambda r: script[len(r.output_token_ids)])
    assert request.output_token_ids == expected
    assert request.status.finish_reason == reason
    assert "a" not in scheduler.requests


def test_max_model_len_ends_a_request():
    scheduler = make_scheduler(max_model_len=8)
    request = make_request("a", prompt(6), max_tokens=16)
    scheduler.add_request(request)
    run(scheduler)
    assert len(request.output_token_ids) == 2 and request.status is RequestStatus.FINISHED_LENGTH


# -- prefix caching ----------------------------------------------------------------------------------


@pytest.mark.parametrize("same_step", [False, True])
def test_identical_prefix_is_scheduled_with_fewer_tokens(same_step):
    scheduler = make_scheduler(block_size=4)
    first, second = make_request("first", prompt(13)), make_request("second", prompt(13))
    scheduler.add_request(first)
    if not same_step:
        run(scheduler)
    scheduler.add_request(second)
    plans = run(scheduler)
    assert new_tokens_per_step(plans, "second")[0] == 1  # 12 tokens (three blocks) came from cache
    assert second.num_cached_tokens == 12
    assert second.output_token_ids == first.output_token_ids == reference_output(prompt(13), 8)


def test_without_prefix_caching_the_whole_prompt_is_computed():
    scheduler = make_scheduler(enable_prefix_caching=False)
    for request_id in ("first", "second"):
        scheduler.add_request(make_request(request_id, prompt(13)))
        plans = run(scheduler)
        assert new_tokens_per_step(plans, request_id)[0] == 13


# -- async scheduling -------------------------------------------------------------------------


def test_async_scheduling_schedules_on_the_token_in_flight_and_stops_at_the_last():
    """Step N+1 is scheduled before N's token is known: the request is given that pending
    token to compute, and once the pending token is its max_tokens-th it gets no more."""
    scheduler = make_scheduler()
    request = make_request("a", prompt(5), max_tokens=2)
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert [(s.start_position, s.num_new_tokens, s.samples) for s in first.scheduled] == [(0, 5, True)]
    scheduler.advance(first)
    assert (request.num_computed_tokens, request.num_pending_tokens, request.output_token_ids) == (5, 1, [])

    second = scheduler.schedule()  # the first step's token is still in flight
    assert [(s.start_position, s.num_new_tokens, s.samples) for s in second.scheduled] == [(5, 1, True)]
    scheduler.advance(second)
    scheduler.update(first, {"a": 7}, advanced=True)
    assert (request.num_computed_tokens, request.num_pending_tokens, request.output_token_ids) == (6, 1, [7])

    # The second step's token will be the last: no step is scheduled on it.
    assert scheduler.schedule().is_empty
    scheduler.update(second, {"a": 8}, advanced=True)
    assert request.output_token_ids == [7, 8] and request.status is RequestStatus.FINISHED_LENGTH
    assert not scheduler.has_unfinished_requests()
    assert_pool_free(scheduler)
