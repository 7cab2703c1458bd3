"""Backpressure and disconnects: a full queue answers 429; a client that leaves frees everything.

A `StepGate` holds the engine loop between steps, so each request is exactly where
the test needs it (waiting, or mid-stream) whatever the machine's speed.
"""

import json
import socket
import threading

import httpx
import pytest

from server_harness import pool_is_free, sample, scrape, wait_until

pytestmark = pytest.mark.slow

LONG = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True}


def aborted(samples) -> float:
    return sample(samples, "iterserve_requests_finished_total", model_name="tiny", finish_reason="abort")


def assert_engine_is_empty(tiny_server):
    llm_engine = tiny_server.llm_engine
    wait_until(lambda: not llm_engine.has_unfinished_requests(), what="the engine to finish every request")
    # The gauges are set by the engine loop after each iteration, so they agree by now.
    samples = scrape(tiny_server)
    assert sample(samples, "iterserve_num_requests_running", model_name="tiny") == 0
    assert sample(samples, "iterserve_num_requests_waiting", model_name="tiny") == 0
    assert sample(samples, "iterserve_kv_cache_usage_perc", model_name="tiny") == 0
    assert pool_is_free(llm_engine)


def test_full_queue_answers_429_with_retry_after(tiny_server, step_gate, http):
    engine = tiny_server.serving.engine
    engine.max_queued_requests = 2
    step_gate.hold()
    results = {}

    def post(name):
        with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as own:
            results[name] = own.post("/v1/completions", json={**LONG, "max_tokens": 3})

    threads = [threading.Thread(target=post, args=(name,)) for name in ("first", "second")]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: engine.num_waiting == 2, what="two requests in the queue")
        refused = http.post("/v1/completions", json={**LONG, "max_tokens": 3})
        assert refused.status_code == 429
        assert refused.headers["Retry-After"].isdigit()
        assert refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.max_queued_requests = 64
        step_gate.open()
        for thread in threads:
            thread.join(120)
    assert [results[name].status_code for name in ("first", "second")] == [200, 200]
    assert_engine_is_empty(tiny_server)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_client_leaving_a_stream_aborts_it_and_frees_its_blocks(tiny_server, step_gate, endpoint):
    body = {**LONG, "stream": True, "logprobs": 0}  # logprobs: a chunk per token, even one with no text yet
    if endpoint.endswith("chat/completions"):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
    before = aborted(scrape(tiny_server))
    step_gate.hold(permits=3)  # the prompt and two more tokens, then the loop waits
    with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as own:
        with own.stream("POST", endpoint, json=body) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            first = next(line for line in events if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"]
            step_gate.wait_blocked()
            assert tiny_server.llm_engine.scheduler.num_running == 1
    # The server notices the disconnect and closes the stream, which queues the abort.
    wait_until(lambda: tiny_server.serving.engine.num_active_streams == 0, what="the server to see the disconnect")
    step_gate.open()
    assert_engine_is_empty(tiny_server)
    assert aborted(scrape(tiny_server)) == before + 1


def test_client_leaving_a_plain_request_aborts_it(tiny_server, step_gate):
    before = aborted(scrape(tiny_server))
    step_gate.hold(permits=2)
    body = json.dumps(LONG).encode()
    host, port = tiny_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer test-key\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        step_gate.wait_blocked()
        wait_until(lambda: tiny_server.llm_engine.scheduler.num_running == 1, what="the request to run")
    wait_until(lambda: tiny_server.serving.engine.num_active_streams == 0, what="the server to see the disconnect")
    step_gate.open()
    assert_engine_is_empty(tiny_server)
    assert aborted(scrape(tiny_server)) == before + 1
