"""The simulator: the real scheduler on a virtual clock with step times from a cost function.
Its timestamps follow from the step times exactly; every request ends once and the pool is
free after; it refuses what serve would refuse; its steps are the real engine's, step for
step; runs taken at once change nothing; the roofline presets match GPU.md's limits."""

import itertools
import random

import pytest

from scheduler import SchedulerConfig, StepShape
from scheduler.roofline import HARDWARE, MODELS, ModelShape, RooflineStepTime
from scheduler import simulator
from scheduler.simulator import Deployment, SimRequest, simulate


def linear(shape: StepShape) -> float:
    return 0.010 + 0.001 * shape.prefill_tokens + 0.002 * shape.decode_seqs


def deployment(**knobs) -> Deployment:
    config = SchedulerConfig(max_model_len=knobs.pop("max_model_len", 512), **knobs)
    return Deployment(config, num_blocks=256, block_size=16)


def test_one_request_takes_its_prefill_chunks_then_one_step_per_token():
    request = SimRequest("a", arrival_s=5.0, prompt_len=300, output_len=4)
    result = simulate([request], deployment(max_num_batched_tokens=256, long_prefill_token_threshold=0), linear)
    (outcome,) = result.outcomes
    # Two prompt steps (256 + 44 tokens; the second samples the first token), then three decodes.
    assert outcome.first_token_s == pytest.approx(5.0 + (0.010 + 0.256) + (0.010 + 0.044))
    assert outcome.itl_s == pytest.approx([0.012] * 3)
    assert outcome.finished_s == pytest.approx(outcome.first_token_s + 3 * 0.012)
    assert outcome.finish_reason == "length" and outcome.num_output_tokens == 4
    assert result.num_steps == 5 and result.duration_s == pytest.approx(outcome.finished_s - 5.0)


def test_a_workload_runs_to_the_end_deterministically_with_every_request_ended_once():
    requests = [SimRequest(f"r{i}", arrival_s=i * 0.05, prompt_len=20 + (i * 37) % 300, output_len=1 + (i * 13) % 60,
                           tenant="chat" if i % 3 else "batch") for i in range(300)]
    first = simulate(requests, deployment(max_num_seqs=32), linear)
    second = simulate(requests, deployment(max_num_seqs=32), linear)
    assert [(o.first_token_s, o.finished_s) for o in first.outcomes] == \
        [(o.first_token_s, o.finished_s) for o in second.outcomes]
    assert sorted(o.request.id for o in first.outcomes) == sorted(r.id for r in requests)
    for outcome in first.outcomes:
        assert outcome.finish_reason == "length" and outcome.num_output_tokens == outcome.request.output_len
        assert outcome.request.arrival_s < outcome.first_token_s <= outcome.finished_s


def test_the_kv_cache_limits_concurrency_and_preempts():
    requests = [SimRequest(f"r{i}", 0.0, prompt_len=200, output_len=200) for i in range(40)]
    tight = Deployment(SchedulerConfig(max_model_len=512), num_blocks=100, block_size=16)
    result = simulate(requests, tight, linear)
    assert result.num_preemptions > 0
    assert all(o.finish_reason == "length" for o in result.outcomes)


def test_what_serve_would_refuse_is_refused_not_run():
    too_long = SimRequest("long", 0.0, prompt_len=500, output_len=100)
    ok = SimRequest("ok", 0.0, prompt_len=10, output_len=5)
    result = simulate([too_long, ok], deployment(), linear)
    outcomes = {o.request.id: o for o in result.outcomes}
    assert outcomes["long"].finish_reason is None and "max_model_len" in outcomes["long"].error
    assert outcomes["ok"].finish_reason == "length"


def test_the_slo_policy_refuses_unreachable_targets_once_it_has_measured_steps():
    warm = [SimRequest(f"warm{i}", 0.0, prompt_len=64, output_len=16) for i in range(10)]
    burst = [SimRequest(f"b{i}", 1.0, prompt_len=400, output_len=8, slo_ttft_s=0.8) for i in range(30)]
    result = simulate(warm + burst, deployment(policy="slo"), linear)
    refused = [o for o in result.outcomes if o.error and "TTFT target" in o.error]
    served = [o for o in result.outcomes if o.request.id.startswith("b") and o.finish_reason == "length"]
    assert refused and served
    # What was admitted mostly made its target (the estimate ignores seats, so not always).
    made = [o for o in served if o.first_token_s - o.request.arrival_s <= 0.8]
    assert len(made) >= 0.8 * len(served)


def outcome_record(result) -> tuple:
    return (result.num_steps, result.num_preemptions, result.duration_s, result.decode_steps_by_batch, [
        (o.request.id, o.finish_reason, o.error, o.first_token_s, o.finished_s, o.num_output_tokens, o.itl_s)
        for o in result.outcomes])


@pytest.mark.parametrize("policy", ["fcfs", "priority", "slo", "sjf", "fair"])
@pytest.mark.parametrize("seed", range(3))
def test_plain_decode_runs_taken_at_once_change_nothing_in_the_outcome(policy, seed, monkeypatch):
    rng = random.Random(seed)
    arrivals = itertools.accumulate(rng.expovariate(8.0) for _ in range(100))
    requests = [SimRequest(f"r{i}", arrival_s=arrival, prompt_len=rng.randint(1, 300),
                           output_len=rng.randint(1, 120), tenant=rng.choice(["chat", "batch"]),
                           priority=rng.randint(0, 2), slo_ttft_s=rng.choice([None, 0.5, 2.0]),
                           slo_tpot_s=rng.choice([None, 0.02, 0.1])) for i, arrival in enumerate(arrivals)]
    config = SchedulerConfig(max_model_len=512, policy=policy, max_num_seqs=rng.choice([8, 32]),
                             max_num_batched_tokens=rng.choice([64, 256]), priority_aging_s=5.0,
                             tenant_kv_fractions={"batch": 0.5} if seed % 2 else {})
    # Few blocks (preemptions, swaps) in some runs, plenty in others.
    tight = Deployment(config, num_blocks=rng.choice([60, 400]), block_size=16, num_host_blocks=rng.choice([0, 40]),
                       swap_block_s=0.0001)
    stepped = simulate(requests, tight, linear, fast_forward=False)
    runs = []
    take = simulator.take_plain_decode_steps
    monkeypatch.setattr(simulator, "take_plain_decode_steps", lambda s, n, *rest: runs.append(n) or take(s, n, *rest))
    ended_in_runs = []
    finish = simulator.finish_by_length

    def finish_and_count(*args):
        ended = finish(*args)
        ended_in_runs.extend(ended)
        return ended

    monkeypatch.setattr(simulator, "finish_by_length", finish_and_count)
    taken_at_once = simulate(requests, tight, linear, fast_forward=True)
    assert outcome_record(taken_at_once) == outcome_record(stepped)
    assert any(o.finish_reason == "length" for o in stepped.outcomes)
    # The rank-static policies took runs (the others never may: their ranks move as they serve),
    # and some of those runs' last steps ended requests.
    assert bool(runs) == bool(ended_in_runs) == (policy in ("fcfs", "priority", "slo"))


def test_the_roofline_matches_gpu_md_for_the_8b_decode_and_prefill():
    h100 = RooflineStepTime(HARDWARE["h100"], MODELS["llama-3-8b"], step_overhead_s=0.0)
    # GPU.md: batch 256 at context ~540 moves 14.8 GB of weights and 18 GB of KV: "about 11 ms".
    decode = h100(StepShape(0, 256, 256 * 540))
    assert decode == pytest.approx(0.011, rel=0.12)
    # 2,048 prompt tokens are compute-bound: 2 x 8.03e9 x 2048 FLOPs at ~790 TFLOP/s.
    assert h100(StepShape(2048, 0, 2048)) == pytest.approx(2 * 8.03e9 * 2048 / 791e12, rel=0.02)
    # Tensor parallelism splits both, and adds its all-reduces.
    tp2 = RooflineStepTime(HARDWARE["h100"], MODELS["llama-3-8b"], tensor_parallel_size=2, step_overhead_s=0.0)
    assert decode / 2 < tp2(StepShape(0, 256, 256 * 540)) < decode


def test_a_models_shape_is_read_from_its_hugging_face_config(tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    shape = ModelShape.from_hf_config(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32)
    num_params = sum(p.numel() for p in model.parameters())
    assert shape.num_params == pytest.approx(num_params, rel=0.01)  # less the norms
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (3, 2, 16)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_the_simulated_admissions_and_preemptions_are_the_real_engines(tiny_model_path, policy, monkeypatch):
    """The same trace through the real engine (the tiny model on CPU) and the simulator, with a
    KV cache small enough to preempt and, under priority, late urgent arrivals that preempt:
    every step schedules the same requests for the same tokens and preempts the same ones."""
    from engine import LLMEngine
    from engine.config import EngineConfig
    from scheduler import SamplingParams
    from scheduler.scheduler import Scheduler

    steps = []
    schedule = Scheduler.schedule

    def recording_schedule(self):
        plan = schedule(self)
        steps.append(([(s.request.request_id, s.num_new_tokens) for s in plan.scheduled], list(plan.preempted_ids)))
        return plan

    monkeypatch.setattr(Scheduler, "schedule", recording_schedule)
    rng = random.Random(7)
    # Eight at t=0, three urgent ones (priority -1) arriving after the third step.
    trace = [SimRequest(f"r{i}", 0.0 if i < 8 else 2.5, prompt_len=rng.randint(20, 60), output_len=rng.randint(20, 60),
                        priority=(-1 if i >= 8 else rng.randint(0, 2)) if policy == "priority" else 0)
             for i in range(11)]
    knobs = dict(max_model_len=128, max_num_seqs=6, max_num_batched_tokens=96, long_prefill_token_threshold=0,
                 policy=policy, priority_aging_s=None)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_path), dtype="float32", num_kv_blocks=14,
                                    enable_prefix_caching=False, swap_space=0, **knobs))
    late = [r for r in trace if r.arrival_s > 0]
    for number, request in enumerate(r for r in trace if r.arrival_s == 0):
        engine.add_request([100 + number] * request.prompt_len, SamplingParams(max_tokens=request.output_len,
                           ignore_eos=True), request_id=request.id, arrival_time=0.0, priority=request.priority)
    num_steps = 0
    while engine.has_unfinished_requests() or late:
        if num_steps == 3:
            for request in late:
                engine.add_request([200] * request.prompt_len, SamplingParams(max_tokens=request.output_len,
                                   ignore_eos=True), request_id=request.id, arrival_time=2.5, priority=request.priority)
            late = []
        engine.step()
        num_steps += 1
    real_steps, steps[:] = list(steps), []

    config_knobs = {k: v for k, v in knobs.items() if k != "max_model_len"}
    tight = Deployment(SchedulerConfig(max_model_len=128, **config_knobs), num_blocks=14, block_size=16)
    simulate(trace, tight, lambda shape: 1.0, fast_forward=False)  # a step a second: the late ones join before the 4th
    assert steps == real_steps
    assert any(preempted for _, preempted in real_steps)
