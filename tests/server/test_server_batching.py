"""A static batch on the engine thread: it waits for its timeout without spinning, and its
padding reaches /metrics as iterserve_padding_tokens_total."""

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families
import pytest

from server_harness import pool_is_free

pytestmark = pytest.mark.slow


def test_a_static_batch_waits_without_spinning_and_exports_its_padding(tiny_model_path, torch_threads):
    from engine import EngineConfig, LLMEngine
    from scheduler import SamplingParams
    from server.async_engine import AsyncEngine
    from server.engine_core import EngineRequest
    from server.metrics import EngineMetrics

    timeout_s = 0.3
    llm_engine = LLMEngine(EngineConfig(model=str(tiny_model_path), num_kv_blocks=64, max_num_seqs=4, num_threads=1,
                                        batching="static", static_batch_size=4, batch_timeout_s=timeout_s))
    metrics = EngineMetrics("tiny", llm_engine.max_model_len, llm_engine.kv_bytes_per_block)
    num_steps = 0
    step = llm_engine.step

    def counted_step():
        nonlocal num_steps
        num_steps += 1
        return step()

    llm_engine.step = counted_step
    # Two of four seats, so the batch launches on the timeout. Padding: prompts 3 and 7 tokens
    # (4 to pad), outputs 2 and 5 tokens (the short row idles for 3 steps): 7 in all.
    arrival = time.monotonic()
    requests = [
        EngineRequest("short", [10, 11, 12], SamplingParams(max_tokens=2, ignore_eos=True), arrival),
        EngineRequest("long", list(range(20, 27)), SamplingParams(max_tokens=5, ignore_eos=True), arrival),
    ]

    async def serve() -> list:
        engine = AsyncEngine(llm_engine, observer=metrics.record_step)
        engine.start()
        try:
            with engine.submit(requests) as stream:
                return [output async for output in stream if output.finished]
        finally:
            await asyncio.to_thread(engine.stop)

    finished = asyncio.run(serve())

    assert sorted(output.times.num_output_tokens for output in finished) == [2, 5]
    assert all(output.times.first_scheduled_time - arrival >= timeout_s for output in finished)
    # Five steps run the batch; a spinning loop would have stepped thousands of times while it filled.
    assert num_steps <= 5 + 4
    assert llm_engine.scheduler.padding_tokens == 7
    exported = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(metrics.exposition()[0].decode())
                for s in family.samples}
    assert exported[("iterserve_padding_tokens_total", (("model_name", "tiny"),))] == 7
    assert pool_is_free(llm_engine)
