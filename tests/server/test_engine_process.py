"""The engine loop in a process of its own (server/engine_process.py), on loopback: the same
answers as the engine thread, aborts that free the KV cache, refusals that keep their
status, a killed engine process turning into errors and 503s, and a child that stops when
the front end goes."""

import json
import os
from multiprocessing import Pipe
import pickle
import signal

import httpx
import pytest

from server_harness import scrape, sample, start_server, wait_until

pytestmark = pytest.mark.slow

LONG = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 200, "ignore_eos": True, "stream": True}


# Also with async scheduling (the default on CUDA): outputs a step late, requests ending
# while the next step is in flight, and still the engine thread's and offline answers.
@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def process_server(request, tiny_model_path, torch_threads):
    server = start_server(tiny_model_path, "tiny", engine_core="process", max_queued_requests=64,
                          engine_args={"async_scheduling": request.param})
    yield server
    server.stop()


@pytest.fixture()
def own_process_server(tiny_model_path, torch_threads):
    servers = []

    def make(**settings):
        servers.append(start_server(tiny_model_path, "tiny", engine_core="process", num_kv_blocks=64, **settings))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers(), timeout=120)


def data_events(response: httpx.Response):
    return (line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))


def test_it_answers_as_the_engine_thread_does(process_server, tiny_server):
    bodies = [
        {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
        {"model": "tiny", "prompt": ["one two", "three four five"], "max_tokens": 6, "temperature": 0,
         "logprobs": 2},
        {"model": "tiny", "prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 2},
        {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0},
        # A constraint crosses to the engine process, and its grammar is followed there.
        {"model": "tiny", "prompt": "pick", "max_tokens": 9, "temperature": 1.0, "seed": 3, "n": 2,
         "guided_regex": "[a-f]{3}-[0-9]{2}"},
    ]
    for body in bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        got, expected = post(process_server, path, body), post(tiny_server, path, body)
        assert got.status_code == expected.status_code == 200
        assert got.json()["choices"] == expected.json()["choices"]
        assert got.json()["usage"] == expected.json()["usage"]
    # A grammar that does not compile is the engine's refusal, a 400 naming the field, from either.
    bad = {"model": "tiny", "prompt": "pick", "max_tokens": 4, "structured_outputs": {"grammar": "root ::= "}}
    for server in (process_server, tiny_server):
        refused = post(server, "/v1/completions", bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "structured_outputs"


def test_a_stream_matches_the_whole_answer(process_server):
    body = {**LONG, "max_tokens": 16, "temperature": 0}
    with httpx.stream("POST", f"{process_server.url}/v1/completions", json=body, headers=process_server.headers(),
                      timeout=120) as response:
        events = list(data_events(response))
    assert events[-1] == "[DONE]"
    streamed = "".join(choice["text"] for event in events[:-1] for choice in json.loads(event)["choices"])
    whole = post(process_server, "/v1/completions", {**body, "stream": False}).json()["choices"][0]["text"]
    assert streamed == whole


def test_a_disconnect_aborts_and_frees_the_kv_cache(process_server):
    for _ in range(3):
        with httpx.stream("POST", f"{process_server.url}/v1/completions", json=LONG,
                          headers=process_server.headers(), timeout=120) as response:
            next(data_events(response))  # then leave
    wait_until(lambda: sample(scrape(process_server), "iterserve_num_requests_running", model_name="tiny") == 0,
               what="the aborted requests to leave their seats")
    samples = scrape(process_server)
    assert sample(samples, "iterserve_kv_cache_usage_perc", model_name="tiny") == 0
    assert sample(samples, "iterserve_requests_finished_total", model_name="tiny", finish_reason="abort") >= 3
    # And it still answers.
    assert post(process_server, "/v1/completions", {**LONG, "max_tokens": 2, "stream": False}).status_code == 200


def test_a_stop_string_ends_the_request_as_the_offline_engine_ends_it(process_server, tiny_model_path):
    from engine import LLM
    from scheduler import SamplingParams

    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    full = post(process_server, "/v1/completions", body).json()["choices"][0]["text"]
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2)
                if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    before = scrape(process_server)
    answer = post(process_server, "/v1/completions", {**body, "stop": [stop]}).json()
    offline = LLM(str(tiny_model_path), num_kv_blocks=64, max_model_len=512).generate(
        "The capital of France is", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    # The front end found it, the engine process was told to abort: the client sees the offline answer.
    assert answer["choices"][0]["text"] == offline.text == full[:full.index(stop)]
    assert answer["choices"][0]["finish_reason"] == offline.finish_reason == "stop"
    assert answer["usage"]["completion_tokens"] == len(offline.token_ids) < 24
    wait_until(lambda: sample(scrape(process_server), "iterserve_num_requests_running", model_name="tiny") == 0,
               what="the stopped request to leave its seat")
    after = scrape(process_server)
    assert sample(after, "iterserve_kv_cache_usage_perc", model_name="tiny") == 0

    def finished(samples, reason):
        return sample(samples, "iterserve_requests_finished_total", model_name="tiny", finish_reason=reason)

    assert finished(after, "stop") - finished(before, "stop") == 1
    assert finished(after, "abort") == finished(before, "abort")  # the abort that freed it is not the client's


def test_metrics_show_the_engine_process_memory_beside_the_front_end(process_server):
    samples = scrape(process_server)
    engine_pid = process_server.engine_process.pid
    front_end = sample(samples, "process_resident_memory_bytes")
    engine = sample(samples, "iterserve_engine_process_resident_memory_bytes")
    with open(f"/proc/{engine_pid}/statm") as statm:
        resident_now = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # The engine holds the model and its KV cache: it is its own process's figure, not the front end's.
    assert engine == pytest.approx(resident_now, rel=0.2)
    assert front_end > 0 and engine != front_end


def test_a_refusal_keeps_its_status_across_the_process(own_process_server):
    server = own_process_server(max_queued_requests=0)
    body = {"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 2, "n": 4}  # 12 sequences, 8 seats
    refused = post(server, "/v1/completions", body)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"]


def test_a_killed_engine_process_ends_streams_and_turns_health_to_503(own_process_server):
    server = own_process_server()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, headers=server.headers(),
                      timeout=120) as response:
        events = data_events(response)
        next(events)
        os.kill(server.engine_process.pid, signal.SIGKILL)
        rest = list(events)
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "engine_error" and "exited unexpectedly" in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 503
    refused = post(server, "/v1/completions", {**LONG, "stream": False})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"


def test_a_model_that_fails_to_load_raises_in_the_front_end(tmp_path):
    from engine import EngineConfig
    from server.engine_process import EngineProcess

    with pytest.raises(FileNotFoundError):
        EngineProcess(EngineConfig(model=str(tmp_path / "no-such-model")))


def test_the_engine_process_stops_when_the_front_end_goes(tiny_model_path):
    from engine import EngineConfig
    from server.engine_process import EngineProcess

    process = EngineProcess(EngineConfig(model=str(tiny_model_path), num_kv_blocks=64, num_threads=1))
    process._commands.close()  # what the front end's death does to the pipe
    process._process.join(60)
    assert process._process.exitcode == 0


def test_a_steps_outputs_cross_the_pipe_unchanged():
    from engine import RequestOutput
    from engine.sampler import TokenLogprobs
    from scheduler.request import RequestTimes
    from server.engine_process import pack_outputs, unpack_outputs

    outputs = [
        RequestOutput("a", [5], "", False, RequestTimes("t1", 1.0, 7, 1, 1.1, 1.2, 1.2, None, False)),
        RequestOutput("b", [9, 10], "", True, RequestTimes("", 2.0, 3, 4, 2.1, 2.2, 2.5, 2.5, True), "length",
                      [TokenLogprobs(9, -0.5, [(9, -0.5), (3, -1.5)])], num_cached_tokens=16),
        RequestOutput("c", [], "", True, RequestTimes("", 3.0, 3, 0, None, None, None, 3.5, False), "error",
                      error="model step failed"),
    ]
    a, b = Pipe(duplex=False)
    b.send(pack_outputs(outputs))
    assert unpack_outputs(a.recv()) == outputs


def test_receive_commands_takes_everything_sent_and_stops_at_the_end_of_the_pipe():
    from server.engine_core import ABORT, STOP
    from server.engine_process import receive_commands

    reader, writer = Pipe(duplex=False)
    assert receive_commands(reader, 0) == []
    writer.send([(ABORT, ["a"])])
    writer.send([(ABORT, ["b"]), (ABORT, ["c"])])
    assert receive_commands(reader, None) == [(ABORT, ["a"]), (ABORT, ["b"]), (ABORT, ["c"])]
    writer.close()
    assert receive_commands(reader, None) == [(STOP, None)]


def test_errors_cross_the_pipe_with_their_status_code_and_headers():
    from server.errors import EngineError, QueueFullError

    refusal = pickle.loads(pickle.dumps(QueueFullError("full", retry_after_s=7, code="slo_unreachable")))
    assert (refusal.status_code, refusal.code, refusal.headers) == (429, "slo_unreachable", {"Retry-After": "7"})
    assert refusal.envelope() == QueueFullError("full", retry_after_s=7, code="slo_unreachable").envelope()
    failure = pickle.loads(pickle.dumps(EngineError("the engine stopped")))
    assert failure.status_code == 500 and failure.message == "the engine stopped"
