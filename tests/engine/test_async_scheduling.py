"""Async scheduling (LLMEngine.step): step N+1 is scheduled and launched before step N's
tokens are read back. It must give exactly the synchronous engine's outputs, token for
token and finish for finish (the synchronous engine is held to transformers in
test_greedy_equivalence), whatever ends requests and whatever the batch holds, and leave no
block, request or step behind.

On CPU the model runs as it is launched, so nothing overlaps here; what is checked is that
every input the next step takes from the step in flight, and every request that ends while
it runs, comes out right.
"""

import pytest
import torch

from engine import LLM
from scheduler import SamplingParams
from tiny_llm import make_llm

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "Hello",
    "counting sheep, " * 20,
    "List three colors:",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def generate(path, async_scheduling: bool, params=GREEDY, prompts=PROMPTS, **config):
    llm = make_llm(path, async_scheduling=async_scheduling, **config)
    completions = llm.generate(prompts, params)
    assert_drained(llm)
    return [(c.token_ids, c.finish_reason, c.logprobs) for c in completions], llm.engine


def assert_drained(llm: LLM) -> None:
    engine = llm.engine
    assert engine._in_flight is None and not engine.has_unfinished_requests()
    pool = engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks, "every block is free or cached"


@pytest.mark.parametrize("config", [
    {},
    {"max_num_batched_tokens": 16},  # prompts chunked across steps, decodes beside the chunks
    {"num_kv_blocks": 40},  # preempted by recompute, over and over
    {"num_kv_blocks": 40, "swap_space": 16 * 1024 * 1024, "swap_threshold_tokens": 1},  # preempted by swap
    {"max_num_seqs": 2},  # requests admitted as others finish, beside steps in flight
])
def test_greedy_tokens_are_the_synchronous_engines(tiny_model_path, config):
    expected, sync_engine = generate(tiny_model_path, False, **config)
    got, engine = generate(tiny_model_path, True, **config)
    assert engine.async_scheduling and not sync_engine.async_scheduling
    assert got == expected
    if "num_kv_blocks" in config:
        assert engine.scheduler.num_preemptions > 0, "the pool was small enough to preempt"


def test_shared_prefixes_hit_the_cache_under_async_scheduling(tiny_model_path):
    prefix = "You are a careful assistant who answers in one short sentence. " * 2
    prompts = [prefix + question for question in ("Why is the sky blue?", "What is rain?", "Name a planet.")]
    expected, _ = generate(tiny_model_path, False, prompts=prompts)
    got, engine = generate(tiny_model_path, True, prompts=prompts)
    assert got == expected
    assert engine.kv_cache.prefix_cache_hits > 0


def test_requests_that_stop_mid_flight_end_as_they_do_synchronously(tiny_model_path):
    """Stop tokens met at different steps: each request's next step is already queued when it
    stops, and that token must not reach its output."""
    free_run, _ = generate(tiny_model_path, False)
    # Each request stops at its own token: the one it would produce at step 3 + i.
    params = [SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[tokens[3 + i]])
              for i, (tokens, _, _) in enumerate(free_run)]
    expected, _ = generate(tiny_model_path, False, params=params)
    got, _ = generate(tiny_model_path, True, params=params)
    assert got == expected
    assert all(reason == "stop" for _, reason, _ in got)
    assert [len(tokens) for tokens, _, _ in got] != [24] * len(PROMPTS)


def test_a_request_is_not_scheduled_past_its_last_token(tiny_model_path):
    """A request whose token in flight is its max_tokens-th gets no step after it: every
    request computes its prompt and max_tokens - 1 outputs, no more, as synchronously."""
    computed = {}
    for async_scheduling in (False, True):
        llm = make_llm(tiny_model_path, async_scheduling=async_scheduling)
        scheduler = llm.engine.scheduler
        schedule = scheduler.schedule
        tokens = computed[async_scheduling] = {}

        def counting_schedule():
            plan = schedule()
            for s in plan.scheduled:
                tokens[s.request.request_id] = tokens.get(s.request.request_id, 0) + s.num_new_tokens
            return plan

        scheduler.schedule = counting_schedule
        llm.generate(PROMPTS, [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True)
                               for i in range(len(PROMPTS))])
        assert_drained(llm)
    prompt_lengths = [len(llm.tokenizer.encode(p)) for p in PROMPTS]
    assert sorted(computed[True].values()) == sorted(computed[False].values()) == sorted(
        n + 3 + i - 1 for i, n in enumerate(prompt_lengths))


def test_seeded_sampling_is_reproducible_across_modes_and_batches(tiny_model_path):
    seeded = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=100 + i) for i in range(len(PROMPTS))]
    expected, _ = generate(tiny_model_path, False, params=seeded)
    got, _ = generate(tiny_model_path, True, params=seeded)
    assert got == expected
    # The same request alone, beside unseeded neighbours: the same tokens again.
    alone, _ = generate(tiny_model_path, True, params=[seeded[2], SamplingParams(max_tokens=16, temperature=1.0)],
                        prompts=[PROMPTS[2], PROMPTS[0]])
    assert alone[0] == expected[2]


def test_penalties_and_logprobs_under_async_scheduling(tiny_model_path):
    """Penalised rows need every earlier token, so their steps are read back before the next
    is scheduled; logprobs ride along with the tokens. Both as synchronously."""
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.5),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=16, temperature=0.7, seed=3, frequency_penalty=0.8, logprobs=1)]
    prompts = PROMPTS[:3]
    expected, _ = generate(tiny_model_path, False, params=params, prompts=prompts)
    got, _ = generate(tiny_model_path, True, params=params, prompts=prompts)
    assert got == expected
    assert len(got[1][2]) == 16 and len(got[1][2][0].top) == 3


def test_a_request_aborted_while_its_step_is_in_flight(tiny_model_path):
    """The abort ends it at once and frees its blocks; the token its queued step samples is
    dropped, and the requests beside it go on as if it had never been there."""
    llm = make_llm(tiny_model_path, async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS[:3]]
    outputs = {request_id: [] for request_id in ids}
    for _ in range(4):
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert engine._in_flight is not None and ids[1] in [s.request.request_id for s in engine._in_flight.plan.scheduled]
    final = engine.abort(ids[1])
    assert final.finished and final.finish_reason == "abort" and not final.new_token_ids
    num_before = len(outputs[ids[1]])
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert len(outputs[ids[1]]) == num_before, "nothing came for the aborted request after its end"
    assert_drained(llm)
    expected, _ = generate(tiny_model_path, False, prompts=[PROMPTS[0], PROMPTS[2]])
    for request_id, (tokens, _, _) in zip([ids[0], ids[2]], expected):
        assert [t for o in outputs[request_id] for t in o.new_token_ids] == tokens


def test_padded_static_decode_steps_take_their_inputs_from_the_step_in_flight(tiny_model_path):
    """The CUDA-graph path's buffers, run eagerly: a decode's input id is written into the
    static buffer on the device from the step before's samples."""
    expected, _ = generate(tiny_model_path, False)
    llm = make_llm(tiny_model_path, async_scheduling=True)
    llm.engine.runner.use_static_decode(llm.engine.config.max_num_seqs, 128, capture=False)
    got = [(c.token_ids, c.finish_reason, c.logprobs) for c in llm.generate(PROMPTS, GREEDY)]
    assert_drained(llm)
    assert got == expected


def test_async_scheduling_is_on_for_cuda_alone_by_default(tiny_model_path):
    llm = LLM(str(tiny_model_path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert not llm.engine.async_scheduling


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_launching_a_step_never_waits_for_the_gpu(tiny_model_path, backend):
    """What overlap rests on: queueing a step (prompt chunks, decodes, greedy, seeded and
    logprob rows) makes no call that waits for the device. Penalties are left out: their
    steps are read back anyway."""
    llm = LLM(str(tiny_model_path), dtype="float32", device="cuda", num_kv_blocks=256, max_model_len=128,
              attention_backend=backend, async_scheduling=True, max_num_batched_tokens=32)
    engine = llm.engine
    params = [GREEDY, SamplingParams(max_tokens=24, temperature=0.8, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.0, logprobs=2, ignore_eos=True)]
    llm.generate(PROMPTS[:2], GREEDY)  # lazy initialisation (cuBLAS, Triton compiles) before the check
    launch = engine.runner.launch

    def strict_launch(plan):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.runner.launch = strict_launch
    got = [c.token_ids for c in llm.generate(PROMPTS, [params[i % 3] for i in range(len(PROMPTS))])]
    assert all(len(tokens) == 24 for tokens in got)


def test_each_call_is_timed_against_the_step_it_reads_back(tiny_model_path):
    """A call's time is mostly the wait for the step in flight, so the cost model (the slo
    policy plans with it) must see that step's shape, not the shape of the one just launched."""
    llm = make_llm(tiny_model_path, async_scheduling=True, max_num_batched_tokens=16)
    engine, runner = llm.engine, llm.engine.runner
    launched_shapes, collected = {}, []
    launch, collect = runner.launch, runner.collect

    def recording_launch(plan):
        step = launch(plan)
        launched_shapes[id(step)] = plan.shape()
        return step

    def recording_collect(step):
        collected.append(launched_shapes[id(step)])
        return collect(step)

    runner.launch, runner.collect = recording_launch, recording_collect
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, request_id=f"r{index}")
    calls = 0
    while engine.has_unfinished_requests():
        before = len(collected)
        engine.step()
        calls += 1
        assert engine.last_step_shape == (collected[-1] if len(collected) > before else None)
    assert len(collected) == calls - 1  # the first call only launched
    assert len({shape.prefill_tokens for shape in collected}) > 1  # prompt chunks and plain decodes both
