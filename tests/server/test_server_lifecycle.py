"""Draining on SIGTERM, a failing model step, a dead engine, and the real `iterserve serve` process."""

import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from server_harness import API_KEY, StepGate, pool_is_free, start_server, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LONG = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 20, "ignore_eos": True}


@pytest.fixture()
def own_server(tiny_model_path, torch_threads):
    """A server of its own, for tests that shut it down or break its engine."""
    servers = []

    def make(**settings):
        servers.append(start_server(tiny_model_path, "tiny", num_kv_blocks=64, **settings))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def post_in_background(server, body, results, name):
    def post():
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            results[name] = http.post("/v1/completions", json=body)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


@pytest.mark.parametrize("shutdown_timeout_s,finish_reason", [(60.0, "length"), (0.0, "abort")])
def test_sigterm_drains_then_exits(own_server, shutdown_timeout_s, finish_reason):
    server = own_server(shutdown_timeout_s=shutdown_timeout_s)
    gate = StepGate(server.llm_engine)
    gate.hold()
    results = {}
    in_flight = post_in_background(server, LONG, results, "in flight")
    gate.wait_blocked()

    server.server.handle_exit(signal.SIGTERM, None)  # exactly what the signal would call
    wait_until(lambda: server.serving.engine.draining, what="the drain to start")
    headers = server.headers()
    assert httpx.get(f"{server.url}/health").status_code == 503
    refused = httpx.post(f"{server.url}/v1/completions", json=LONG, headers=headers)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert httpx.get(f"{server.url}/metrics").status_code == 200

    if finish_reason == "abort":  # the timeout has passed: the drain aborts, then the loop may step on
        wait_until(lambda: not server.serving.engine._inbox.empty(), what="the abort to be queued")
    gate.open()
    in_flight.join(120)
    assert results["in flight"].status_code == 200
    assert results["in flight"].json()["choices"][0]["finish_reason"] == finish_reason
    server.thread.join(60)
    assert not server.thread.is_alive()
    assert pool_is_free(server.llm_engine)


def test_a_failing_model_step_fails_only_its_requests(tiny_server, client):
    runner = tiny_server.llm_engine.runner
    execute = runner.execute
    calls = []

    def fail_once(plan):
        if not calls:
            calls.append(plan)
            raise RuntimeError("injected")
        return execute(plan)

    runner.execute = fail_once
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert "injected" in str(raised.value)
        runner.execute = fail_once
        calls.clear()
        stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, stream=True)
        with pytest.raises(openai.APIError, match="injected"):
            list(stream)
    finally:
        runner.execute = execute
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=3).choices[0].finish_reason
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    wait_until(lambda: pool_is_free(tiny_server.llm_engine), what="the failed request's blocks to be freed")


def test_a_dead_engine_turns_health_to_503(own_server):
    server = own_server()

    def broken_step():
        raise RuntimeError("the engine is broken")

    server.llm_engine.step = broken_step
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert httpx.get(f"{server.url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert raised.value.status_code == 503


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_iterserve_serve_exits_0_on_sigterm_after_finishing_its_requests(tiny_model_path, engine_core):
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_model_path), "--port", str(port),
               "--num-threads", "1", "--num-kv-blocks", "64", "--shutdown-timeout", "120",
               "--served-model-name", "tiny", "--log-level", "warning", "--engine-core", engine_core]
    env = {**os.environ, "ITERSERVE_API_KEY": API_KEY}
    process = subprocess.Popen(command, cwd=REPO, env=env)
    try:
        def healthy():
            assert process.poll() is None, "the server exited during start-up"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout_s=180, what="`iterserve serve` to start")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # the key came from the env
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {**LONG, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, headers=headers,
                          timeout=120) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            next(events)
            process.send_signal(signal.SIGTERM)
            rest = [line[len("data: "):] for line in events]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
