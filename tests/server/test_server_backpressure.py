"""Backpressure and disconnects: a full queue answers 429; a client that leaves frees everything.

A `StepGate` holds the engine loop between steps, so each request is exactly where
the test needs it (waiting, or mid-stream) whatever the machine's speed.
"""

from contextlib import ExitStack
import json
import socket
import threading
import time

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


def assert_queue_full(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"].isdigit()
    assert response.json()["error"]["type"] == "rate_limit_error"


def read_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def read_to_the_end(response: httpx.Response) -> list[dict]:
    events = read_events(response)
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_the_queue_bound_counts_sequences_waiting_for_a_seat(tiny_server, step_gate):
    """Free seats take a burst first; a request's every choice counts; a refusal is a 429 at once."""
    engine = tiny_server.serving.engine
    seats = tiny_server.llm_engine.scheduler.config.max_num_seqs
    engine.max_queued_requests = 2
    body = {**LONG, "max_tokens": 3, "stream": True}
    step_gate.hold()  # nothing is scheduled: every accepted request waits, in the scheduler or the inbox
    try:
        with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as http, \
                ExitStack() as open_streams:
            # Streams answer 200 as soon as they are queued, so the test sees each admission.
            accepted = [open_streams.enter_context(http.stream("POST", "/v1/completions", json=body))
                        for _ in range(seats + 2)]
            assert [response.status_code for response in accepted] == [200] * (seats + 2)
            assert_queue_full(http.post("/v1/completions", json={**body, "stream": False}))
            step_gate.open()
            for response in accepted:
                assert read_to_the_end(response)[-1]["choices"][0]["finish_reason"] == "length"
        assert_engine_is_empty(tiny_server)

        step_gate.hold()
        with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as http:
            # n choices are n sequences: one over the seats and the bound is refused on an idle engine.
            assert_queue_full(http.post("/v1/completions", json={**body, "n": seats + 3}))
            with http.stream("POST", "/v1/completions", json={**body, "n": seats + 2}) as response:
                assert response.status_code == 200
                step_gate.open()
                finished = [chunk for chunk in read_to_the_end(response) if chunk["choices"][0]["finish_reason"]]
                assert len(finished) == seats + 2
            assert http.get("/health").status_code == 200
    finally:
        engine.max_queued_requests = 64
        step_gate.open()
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


def test_a_request_past_its_timeout_gets_408_and_frees_its_blocks(tiny_server, step_gate, http):
    step_gate.hold()
    results = {}

    def post():
        with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as own:
            results["plain"] = own.post("/v1/completions", json={**LONG, "timeout": 0.2})

    thread = threading.Thread(target=post)
    thread.start()
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True, "timeout": 0.2}) as streamed:
        assert streamed.status_code == 200  # a stream has begun, so its timeout comes as an error event
        wait_until(lambda: tiny_server.serving.engine.num_waiting == 2, what="both requests to queue")
        time.sleep(0.3)  # past both deadlines while the engine is held
        step_gate.open()
        events = read_events(streamed)
    thread.join(120)
    assert results["plain"].status_code == 408
    assert results["plain"].json()["error"]["code"] == "request_timeout"
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert_engine_is_empty(tiny_server)
    assert sample(scrape(tiny_server), "iterserve_requests_finished_total", model_name="tiny",
                  finish_reason="timeout") >= 2


def test_a_bad_timeout_is_a_400(http):
    for timeout in (0, -1, "soon"):
        response = http.post("/v1/completions", json={**LONG, "timeout": timeout})
        assert response.status_code == 400 and response.json()["error"]["param"] == "timeout"
