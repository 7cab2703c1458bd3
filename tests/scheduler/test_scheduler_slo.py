"""The slo policy on a virtual clock whose steps take what a linear cost says (and the cost
model learns it): earliest deadline first, refusal of unreachable TTFT targets at the door,
a token budget sized to the TPOT targets; and per-tenant KV caps under every policy."""

import zlib

from hypothesis import given, settings, strategies as st
import pytest

from scheduler import Request, RequestRejectedError, RequestStatus, SamplingParams, StepShape, slo
from scheduler_sim import make_scheduler, reference_output, run, step


def cost(shape: StepShape) -> float:
    """The fake engine's step time: 10 ms, 1 ms per prompt token, 2 ms per decode."""
    return 0.010 + 0.001 * shape.prefill_tokens + 0.002 * shape.decode_seqs


def request(request_id: str, prompt_len: int = 4, max_tokens: int = 8, arrival_time: float = 0.0,
            slo_ttft_s: float | None = None, slo_tpot_s: float | None = None, tenant: str = "") -> Request:
    start = zlib.crc32(request_id.encode())  # not hash(): that differs from run to run
    prompt = [(start + index) % 50 for index in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival_time=arrival_time, tenant=tenant, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)


def calibrated(**knobs):
    # No prefix cache: a hit would shorten a prompt's estimate and blur what these tests count.
    scheduler = make_scheduler(policy="slo", enable_prefix_caching=False, **knobs)
    for index in range(8):
        scheduler.add_request(request(f"warm-{index}", prompt_len=12, max_tokens=10))
    run(scheduler, step_cost=cost)
    assert scheduler.cost_model.is_calibrated
    return scheduler


def admitted_order(plans) -> list[str]:
    order = []
    for plan in plans:
        order += [s.request.request_id for s in plan.scheduled if s.request.request_id not in order]
    return order


def test_waiting_requests_are_admitted_earliest_ttft_deadline_first():
    scheduler = make_scheduler(max_num_seqs=1, policy="slo", priority_aging_s=100.0)
    for request_id, arrival, target in [("best-effort", 0.0, None), ("loose", 0.0, 50.0), ("tight", 1.0, 5.0),
                                        ("tighter-later", 2.0, 3.5)]:
        scheduler.add_request(request(request_id, arrival_time=arrival, slo_ttft_s=target))
    # Deadlines: tight 6, tighter-later 5.5, loose 50, best effort 100 (its arrival plus the aging).
    assert admitted_order(run(scheduler)) == ["tighter-later", "tight", "loose", "best-effort"]


def test_a_burst_is_admitted_while_its_ttft_target_is_reachable_and_refused_after():
    scheduler = calibrated(max_model_len=256, num_blocks=256, max_num_batched_tokens=64)
    now = scheduler.clock()
    assert scheduler.estimate_ttft(request("alone", prompt_len=40, arrival_time=now)) == \
        pytest.approx(0.010 + 0.040, rel=0.2)
    # Forty 50-token prompts due in a second: each waits behind the ones before it, ~74 ms a
    # step of 64 tokens, so about the first sixteen can make it.
    admitted, refused = [], []
    free_before = scheduler.kv_cache.pool.num_free_blocks
    burst_requests = [request(f"burst-{index}", prompt_len=50, arrival_time=now, slo_ttft_s=1.0) for index in range(40)]
    for burst in burst_requests:
        try:
            scheduler.add_request(burst)
            admitted.append(burst)
        except RequestRejectedError as error:
            refused.append((burst, error))
    assert 12 <= len(admitted) <= 20 and len(admitted) + len(refused) == 40
    assert admitted == burst_requests[:len(admitted)]  # the first come
    burst, error = refused[0]
    assert error.code == "slo_unreachable" and "TTFT target of 1000 ms cannot be met" in str(error)
    assert not {r.request_id for r, _ in refused} & set(scheduler.requests)
    assert scheduler.kv_cache.pool.num_free_blocks == free_before  # refusing touched no state
    run(scheduler, step_cost=cost)
    # What was admitted made its target (within the fitted model's error).
    assert max(r.first_token_time - r.arrival_time for r in admitted) <= 1.0 * 1.1
    later = request("later", prompt_len=50, arrival_time=scheduler.clock(), slo_ttft_s=1.0)
    scheduler.add_request(later)  # the queue has drained: reachable again
    assert "later" in scheduler.requests


def test_running_prompts_with_later_deadlines_are_not_counted_ahead():
    scheduler = calibrated(max_model_len=256, num_blocks=256, max_num_batched_tokens=64,
                           long_prefill_token_threshold=8)
    now = scheduler.clock()
    for index in range(20):  # best effort: due in a minute, and already running their prefill
        scheduler.add_request(request(f"batch-{index}", prompt_len=200, arrival_time=now))
    step(scheduler, step_cost=cost)
    assert sum(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running) >= 8
    urgent = request("urgent", prompt_len=40, arrival_time=scheduler.clock(), slo_ttft_s=0.5)
    # Its five 8-token chunks, not the 4,000 batch tokens: the budget goes to it first.
    assert scheduler.estimate_ttft(urgent) < 0.4
    scheduler.add_request(urgent)
    run(scheduler, step_cost=cost)
    assert urgent.first_token_time - urgent.arrival_time < 0.5


def test_an_unreachable_target_can_run_best_effort_after_the_rest():
    scheduler = calibrated(max_model_len=256, num_blocks=256, max_num_batched_tokens=64,
                           slo_infeasible="best-effort", max_num_seqs=2)
    now = scheduler.clock()
    burst = [request(f"burst-{index:02d}", prompt_len=50, arrival_time=now, slo_ttft_s=1.0) for index in range(30)]
    for item in burst:
        scheduler.add_request(item)
    demoted = [item for item in burst if item.best_effort]
    # The first ~16 make it, the rest cannot.
    assert demoted == burst[-len(demoted):] and 10 <= len(demoted) <= 18
    assert demoted[0].slo_ttft_s == 1.0  # kept, for goodput to count against
    order = admitted_order(run(scheduler, step_cost=cost))
    assert order[-len(demoted):] == [item.request_id for item in demoted]  # after every request with a target
    assert all(item.status is RequestStatus.FINISHED_LENGTH for item in burst)


def test_nothing_is_refused_before_the_cost_model_has_measured_a_step():
    scheduler = make_scheduler(policy="slo", max_model_len=256, num_blocks=256)
    for index in range(20):
        scheduler.add_request(request(f"r{index}", prompt_len=50, slo_ttft_s=0.001))
    assert len(scheduler.requests) == 20


@pytest.mark.parametrize("target_s, expect_shrunk", [(0.050, True), (1.0, False)])
def test_the_token_budget_fits_the_tightest_tpot_target(target_s, expect_shrunk):
    scheduler = calibrated(max_model_len=256, num_blocks=256, max_num_batched_tokens=64, max_num_seqs=8)
    decoders = [request(f"decoder-{index}", prompt_len=4, max_tokens=60, slo_tpot_s=target_s,
                        arrival_time=scheduler.clock()) for index in range(4)]
    for decoder in decoders:
        scheduler.add_request(decoder)
    for _ in range(3):
        step(scheduler, step_cost=cost)  # all four are decoding now
    for index in range(4):
        scheduler.add_request(request(f"long-{index}", prompt_len=200, max_tokens=2, arrival_time=scheduler.clock()))
    budgets = []
    for _ in range(12):
        step(scheduler, step_cost=cost)
        budgets.append(scheduler.token_budget)
    if expect_shrunk:
        # 4 decodes and, once the time banked by the first decode-only steps is spent, steps
        # of the target itself (a fifth of one stays banked as a cushion): (50 - 10 - 8) ms
        # of prompt tokens at 1 ms each, as far as the fitted model knows the costs.
        assert 4 + 26 <= budgets[-1] <= 4 + 38
        assert budgets[0] > budgets[-1]  # the first spent what the decode-only steps banked
    else:
        assert budgets == [64] * 12
    run(scheduler, step_cost=cost)
    for decoder in decoders:
        assert mean_tpot(decoder) <= target_s


def mean_tpot(request: Request) -> float:
    return (request.last_token_time - request.first_token_time) / (len(request.output_token_ids) - 1)


def test_decode_steps_faster_than_the_tpot_target_bank_time_for_one_longer_step():
    scheduler = calibrated(max_model_len=1024, num_blocks=512, max_num_batched_tokens=1024, max_num_seqs=8)
    target_s = 0.050
    decoders = [request(f"decoder-{index}", prompt_len=4, max_tokens=80, slo_tpot_s=target_s,
                        arrival_time=scheduler.clock()) for index in range(4)]
    for decoder in decoders:
        scheduler.add_request(decoder)
    for _ in range(12):
        step(scheduler, step_cost=cost)  # 18 ms decode-only steps: 32 ms banked each
    scheduler.add_request(request("long", prompt_len=800, max_tokens=2, arrival_time=scheduler.clock()))
    plans = [step(scheduler, step_cost=cost) for _ in range(12)]
    step_times = [cost(plan.shape()) for plan in plans]
    # The first step spends what the decodes banked, up to TPOT_BANK_TARGETS targets; later
    # ones only what each decode step saves.
    assert 2 * target_s < step_times[0] <= slo.TPOT_BANK_TARGETS * target_s * 1.1
    assert max(step_times[1:]) < step_times[0]
    run(scheduler, step_cost=cost)
    for decoder in decoders:
        assert mean_tpot(decoder) <= target_s * 1.05  # the fitted model's error


def test_steps_stay_short_enough_for_a_recent_ttft_target():
    scheduler = calibrated(max_model_len=2048, num_blocks=1024, max_num_batched_tokens=2048)
    scheduler.add_request(request("long", prompt_len=1500, max_tokens=2, arrival_time=scheduler.clock()))
    step(scheduler, step_cost=cost)
    assert scheduler.token_budget == 2048  # no target seen: one step takes the whole prompt
    scheduler.add_request(request("chat", prompt_len=10, max_tokens=2, slo_ttft_s=1.0, arrival_time=scheduler.clock()))
    run(scheduler, step_cost=cost)
    scheduler.add_request(request("long-2", prompt_len=1500, max_tokens=2, arrival_time=scheduler.clock()))
    plan = step(scheduler, step_cost=cost)
    # 0.6 of the 1 s target: (600 - 10) ms of prompt at 1 ms a token, as far as the fit knows.
    share = slo.TTFT_STEP_SHARE
    assert 0.8 * share * 1000 <= plan.num_batched_tokens <= 1.1 * share * 1000 and cost(plan.shape()) <= 1.1 * share
    scheduler.clock.now += 61  # a minute without such targets: long steps again
    assert slo.plan_token_budget(scheduler) == 2048


def test_the_recent_minimum_forgets_after_its_window():
    recent = slo.RecentMinimum(window_s=10)
    recent.add(0.0, 5.0)
    recent.add(1.0, 2.0)
    recent.add(2.0, 3.0)
    assert recent.get(2.0) == 2.0 and recent.get(11.5) == 3.0 and recent.get(12.5) is None


def test_under_slo_the_decodes_keep_their_token_when_an_earlier_deadline_prompt_is_admitted():
    scheduler = make_scheduler(policy="slo", max_model_len=256, num_blocks=256, max_num_batched_tokens=16)
    decoders = [request(f"decoder-{index}", prompt_len=4, max_tokens=30, slo_ttft_s=100.0) for index in range(3)]
    for decoder in decoders:
        scheduler.add_request(decoder)
    step(scheduler)
    urgent = request("urgent", prompt_len=100, max_tokens=2, slo_ttft_s=0.5, arrival_time=scheduler.clock())
    scheduler.add_request(urgent)
    plan = step(scheduler)
    served = {s.request.request_id: s.num_new_tokens for s in plan.scheduled}
    assert served["urgent"] == 13 and all(served[d.request_id] == 1 for d in decoders)


# -- per-tenant KV caps ---------------------------------------------------------------------


def held_blocks(scheduler, tenant: str) -> int:
    return sum(len(scheduler.kv_cache.block_ids(r.request_id)) for r in scheduler.running if r.tenant == tenant)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["fcfs", "priority", "sjf", "fair", "slo"]), st.booleans(),
       st.lists(st.tuples(st.sampled_from(["capped", "other", "second"]), st.integers(1, 30), st.integers(1, 20)),
                min_size=5, max_size=40))
def test_a_tenant_holds_no_more_than_its_kv_share_while_another_waits(policy, swap, arrivals):
    """Checked after every step that began with another tenant's request waiting: the capped
    tenant gave blocks back first, and grew no further. (A request that starts waiting in
    mid-step, preempted for lack of blocks, is protected from the next step on; and a step in
    which caps stalled every running request while no waiting one could start runs with the
    caps lifted, rather than never.) A second capped tenant shares the pool, so caps also bind
    against each other, and every request still ends with the tokens it would have alone."""
    fraction, num_blocks = 0.25, 32
    scheduler = make_scheduler(max_model_len=64, max_num_seqs=6, max_num_batched_tokens=32, num_blocks=num_blocks,
                               block_size=4, policy=policy, tenant_kv_fractions={"capped": fraction, "second": 0.5},
                               num_host_blocks=16 if swap else 0, swap_threshold_tokens=1 if swap else None)
    cap = int(fraction * num_blocks)
    pending = list(enumerate(arrivals))
    requests = []
    while pending or scheduler.has_unfinished_requests():
        for _ in range(2):
            if pending:
                index, (tenant, prompt_len, max_tokens) = pending.pop(0)
                requests.append(request(f"{tenant}-{index}", prompt_len=prompt_len, max_tokens=max_tokens,
                                        tenant=tenant, arrival_time=scheduler.clock()))
                scheduler.add_request(requests[-1])
        another_waits = any(r.tenant == "other" for r in scheduler.waiting)
        lifted_before = scheduler.kv_caps.num_lifted
        step(scheduler)
        # Unless the caps had to be lifted for the step to run anything at all.
        if another_waits and scheduler.kv_caps.num_lifted == lifted_before:
            assert held_blocks(scheduler, "capped") <= cap
        assert scheduler.clock() < 2000, "the scheduler stopped making progress"
    for item in requests:
        assert item.output_token_ids == reference_output(item.prompt_token_ids, item.sampling_params.max_tokens)
    assert scheduler.kv_cache.pool.num_free_blocks == num_blocks


def test_the_cap_binds_only_while_another_tenant_waits():
    scheduler = make_scheduler(max_model_len=64, max_num_seqs=6, num_blocks=32, block_size=4,
                               tenant_kv_fractions={"capped": 0.25})
    for index in range(6):
        scheduler.add_request(request(f"capped-{index}", prompt_len=16, max_tokens=8, tenant="capped"))
    step(scheduler)
    assert held_blocks(scheduler, "capped") > 8  # alone, it may use the whole pool
    scheduler.add_request(request("other", prompt_len=16, max_tokens=8, tenant="other",
                                  arrival_time=scheduler.clock()))
    plan = step(scheduler)
    assert plan.preempted_ids  # it gives blocks back at once
    assert held_blocks(scheduler, "capped") <= 8
    assert any(s.request.request_id == "other" for s in plan.scheduled)
    run(scheduler)


def test_a_tenant_kv_fraction_must_be_a_share():
    with pytest.raises(ValueError, match="fractions"):
        make_scheduler(tenant_kv_fractions={"a": 1.5})
    with pytest.raises(ValueError, match="slo_infeasible"):
        make_scheduler(policy="slo", slo_infeasible="sometimes")


def noisy_scheduler():
    scheduler = calibrated(max_model_len=256, num_blocks=256, max_num_batched_tokens=64)
    # Steps now run 25% slower or faster than the model would say, alternately.
    for index in range(40):
        scheduler.add_request(request(f"noisy-{index}", prompt_len=12, max_tokens=4, arrival_time=scheduler.clock()))
        run(scheduler, step_cost=lambda shape, sign=(-1) ** index: cost(shape) * (1 + 0.25 * sign))
    return scheduler


@pytest.mark.parametrize("margin, admitted", [(0.5, False), (1.5, True)])
def test_the_ttft_estimate_at_the_door_is_padded_by_the_cost_models_recent_error(margin, admitted):
    scheduler = noisy_scheduler()
    error = scheduler.cost_model.mean_relative_error
    assert 0.1 < error < 0.4
    now = scheduler.clock()
    # Four steps of 64 tokens: each far shorter than the share of the target steps are held to.
    bare = scheduler.estimate_ttft(request("probe", prompt_len=200, arrival_time=now))
    asked = request("asked", prompt_len=200, arrival_time=now, slo_ttft_s=bare * (1 + error * margin))
    try:
        scheduler.add_request(asked)
    except RequestRejectedError:
        pass
    assert ("asked" in scheduler.requests) == admitted


def test_when_tpot_targets_are_out_of_reach_a_prompt_with_a_ttft_target_gets_its_whole_prompt_in_a_step():
    scheduler = calibrated(max_model_len=512, num_blocks=1024, max_num_batched_tokens=1024, max_num_seqs=32)
    # Twenty decodes take 50 ms a step, beyond their 20 ms target however little else runs.
    decoders = [request(f"decoder-{index}", prompt_len=4, max_tokens=200, slo_tpot_s=0.020,
                        arrival_time=scheduler.clock()) for index in range(20)]
    for decoder in decoders:
        scheduler.add_request(decoder)
    for _ in range(3):
        step(scheduler, step_cost=cost)
    scheduler.add_request(request("batch", prompt_len=400, max_tokens=2, arrival_time=scheduler.clock()))
    plan = step(scheduler, step_cost=cost)
    # A best-effort prompt only stretches the step by half: 25 ms of prompt tokens at 1 ms each.
    assert 15 <= plan.num_batched_tokens - 20 <= 35
    chat = request("chat", prompt_len=150, max_tokens=2, slo_ttft_s=1.0, arrival_time=scheduler.clock())
    scheduler.add_request(chat)
    plan = step(scheduler, step_cost=cost)
    scheduled = {s.request.request_id: s.num_new_tokens for s in plan.scheduled}
    assert scheduled["chat"] == 150 and chat.first_token_time is not None  # 200 ms, within the 600 ms share
    run(scheduler, step_cost=cost)
