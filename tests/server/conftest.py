"""Fixtures: a session-wide server on the tiny random Llama, one on SmolLM2, and clients for them."""

import httpx
import pytest

from server_harness import API_KEY, StepGate, start_server, wait_until


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_path, torch_threads):
    server = start_server(tiny_model_path, "tiny", metrics_compat="vllm", max_queued_requests=64)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_path, torch_threads):
    server = start_server(smollm2_path, "smollm2", max_model_len=1024, num_kv_blocks=128)
    yield server
    server.stop()


@pytest.fixture()
def client(tiny_server):
    import openai

    with openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture()
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as http:
        yield http


@pytest.fixture()
def step_gate(tiny_server):
    gate = StepGate(tiny_server.llm_engine)
    yield gate
    gate.remove()
    wait_until(lambda: not tiny_server.llm_engine.has_unfinished_requests(), what="the engine to go idle")
