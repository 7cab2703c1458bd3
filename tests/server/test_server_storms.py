"""Many clients misbehaving at once: a disconnect storm, and SIGTERM with a full house.

Bounded on loopback: every client has a timeout, and the assertions are about what is
left afterwards (nothing running, waiting or holding a block; every stream ended with a
final event), never about how fast anything ran.
"""

import asyncio
import json
import signal

import httpx
import pytest

from server_harness import API_KEY, StepGate, pool_is_free, sample, scrape, start_server, wait_until

pytestmark = pytest.mark.slow

STORY = {"model": "tiny", "prompt": "Tell me a long story about the sea", "max_tokens": 300, "ignore_eos": True}
SHORT_STORY_TOKENS = 60
GREEDY = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0.0}


@pytest.fixture()
def storm_server(tiny_model_path, torch_threads):
    servers = []

    def make(**settings):
        servers.append(start_server(tiny_model_path, "tiny", num_kv_blocks=256, max_queued_requests=None,
                                    **settings))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def greedy_text(server) -> str:
    response = httpx.post(f"{server.url}/v1/completions", json=GREEDY, headers=server.headers(), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def aborted(server) -> float:
    return sample(scrape(server), "iterserve_requests_finished_total", model_name="tiny", finish_reason="abort")


def assert_nothing_left(server) -> None:
    llm_engine = server.llm_engine
    wait_until(lambda: server.serving.engine.num_active_streams == 0, what="every stream to close")
    wait_until(lambda: not llm_engine.has_unfinished_requests(), what="the engine to go idle")
    samples = scrape(server)
    for gauge in ("iterserve_num_requests_running", "iterserve_num_requests_waiting", "iterserve_kv_cache_usage_perc"):
        assert sample(samples, gauge, model_name="tiny") == 0, gauge
    assert pool_is_free(llm_engine)


async def leave_after_the_first_chunk(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/v1/completions", json={**STORY, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return  # closing the stream here is the disconnect


async def give_up_waiting(url: str) -> None:
    # A client whose own timeout ends the request: the server sees it go away mid-generation.
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=httpx.Timeout(0.3, connect=30)) as http:
        try:
            await http.post("/v1/completions", json=STORY)
        except httpx.TimeoutException:
            pass


def test_a_disconnect_storm_frees_everything_and_changes_no_answer(storm_server):
    server = storm_server()
    before = greedy_text(server)
    aborted_before = aborted(server)

    async def storm():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), limits=limits,
                                     timeout=120) as http:
            await asyncio.gather(*(leave_after_the_first_chunk(http) for _ in range(100)),
                                 *(give_up_waiting(server.url) for _ in range(50)))

    asyncio.run(storm())
    assert_nothing_left(server)
    # Every stream left mid-story; a client that timed out may have been answered in time.
    assert aborted(server) - aborted_before >= 100
    assert greedy_text(server) == before


async def read_stream(http: httpx.AsyncClient, started: asyncio.Queue) -> list[str]:
    body = {**STORY, "max_tokens": SHORT_STORY_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                if not events:
                    started.put_nowait(None)
                events.append(line[len("data: "):])
        return events


@pytest.mark.parametrize("shutdown_timeout_s,finish_reason", [(120.0, "length"), (0.2, "abort")])
def test_sigterm_with_a_full_house_ends_every_stream_with_a_final_event(storm_server, shutdown_timeout_s,
                                                                         finish_reason):
    num_streams = 20
    server = storm_server(shutdown_timeout_s=shutdown_timeout_s, max_num_seqs=num_streams)
    gate = StepGate(server.llm_engine)

    async def full_house():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(),
                                     limits=httpx.Limits(max_connections=50), timeout=120) as http:
            started: asyncio.Queue = asyncio.Queue()
            streams = [asyncio.ensure_future(read_stream(http, started)) for _ in range(num_streams)]
            for _ in range(num_streams):
                await started.get()  # every stream has its first token: all are in flight
            if finish_reason == "abort":
                gate.hold()  # so that none can finish before the drain times out
            server.server.handle_exit(signal.SIGTERM, None)  # exactly what the signal would call
            while not server.serving.engine.draining:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/completions", json=GREEDY)
            health = await http.get("/health")
            if finish_reason == "abort":
                while server.serving.engine._inbox.empty():  # the drain timed out and queued the aborts
                    await asyncio.sleep(0.01)
                gate.open()
            return await asyncio.gather(*streams), refused, health

    results, refused, health = asyncio.run(full_house())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert health.status_code == 503
    for events in results:
        assert events[-1] == "[DONE]"
        *with_choices, usage = [json.loads(event) for event in events[:-1]]
        assert with_choices[-1]["choices"][0]["finish_reason"] == finish_reason
        if finish_reason == "length":  # none was cut short
            assert usage["usage"]["completion_tokens"] == SHORT_STORY_TOKENS
    server.thread.join(60)
    assert not server.thread.is_alive()
    assert pool_is_free(server.llm_engine)
