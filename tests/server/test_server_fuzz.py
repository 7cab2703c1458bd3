"""Schema fuzzing, as vLLM's CI does it: every operation of our own /openapi.json, valid and
invalid bodies alike, against a live server. No case may get a 5xx, and every 4xx carries the
OpenAI error envelope; afterwards nothing is left running or holding KV blocks."""

import httpx
from hypothesis import HealthCheck, given, settings, strategies
import pytest
import schemathesis

from server_harness import pool_is_free, wait_until

pytestmark = pytest.mark.slow

OPERATIONS = [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
    ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/version"),
]
# Cases per operation, half valid and half breaking the schema: enough to reach every field's
# edges, and a few hundred in all.
EXAMPLES = {"/v1/completions": 100, "/v1/chat/completions": 100, "/tokenize": 60, "/detokenize": 60}
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def openapi_schema(tiny_server):
    document = httpx.get(f"{tiny_server.url}/openapi.json", headers=tiny_server.headers(), timeout=30).json()
    return schemathesis.openapi.from_dict(document)


def test_the_fuzzed_operations_are_every_operation(openapi_schema):
    document = openapi_schema.raw_schema
    declared = {(method.upper(), path) for path, methods in document["paths"].items() for method in methods}
    assert declared == set(OPERATIONS)


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_gets_a_5xx_and_every_4xx_has_the_envelope(openapi_schema, tiny_server, method, path):
    operation = openapi_schema[path][method]

    @given(case=strategies.one_of(*(operation.as_strategy(generation_mode=mode) for mode in MODES)))
    @settings(max_examples=EXAMPLES.get(path, 5), deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def call(case):
        response = case.call(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

    call()


def test_fuzzing_left_nothing_behind(tiny_server):
    llm_engine = tiny_server.llm_engine
    wait_until(lambda: not llm_engine.has_unfinished_requests(), what="the engine to go idle")
    wait_until(lambda: tiny_server.serving.engine.num_active_streams == 0, what="every stream to close")
    assert pool_is_free(llm_engine)
