"""Every failure answers with the one envelope and the right status: 400 (never 422), 401, 404, 413."""

import json

import httpx
import openai
import pytest

from server_harness import API_KEY

pytestmark = pytest.mark.slow

def NESTED(levels: int) -> str:
    """A JSON schema, as text, of objects nested `levels` deep (two JSON levels each)."""
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + '}, "required": ["a"]}' * levels


COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def assert_envelope(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt", None),
    ({"prompt": []}, "prompt", None),
    ({"prompt": [[]]}, "prompt", None),
    ({"prompt": [49152]}, "prompt", None),  # outside the vocabulary
    ({"prompt": "Hello " * 300, "max_tokens": 300}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "Hello", "max_tokens": 512}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "Hello " * 600}, "prompt", "context_length_exceeded"),
    ({"temperature": -0.5}, "temperature", None),
    ({"temperature": "hot"}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_k": -2}, "top_k", None),
    ({"top_k": 10**30}, "top_k", None),
    ({"seed": 2**64}, "seed", None),
    ({"best_of": 3}, "best_of", None),
    ({"logit_bias": {"seven": 1}}, "logit_bias", None),
    ({"logit_bias": {"7": 101}}, "logit_bias", None),
    ({"logit_bias": {"-7": 1}}, "logit_bias", None),
    ({"logit_bias": {"49152": 1}}, "logit_bias", None),  # outside the vocabulary
    # Structured outputs that are malformed, or do not compile (the engine's refusal), or more than one.
    ({"guided_choice": []}, "guided_choice", None),
    ({"guided_choice": "yes"}, "guided_choice", None),
    ({"guided_json": "not json"}, "guided_json", None),
    ({"guided_json": {"type": "nonsense"}}, "guided_json", None),
    ({"guided_json": NESTED(40)}, "guided_json", None),  # past MAX_SCHEMA_DEPTH
    ({"guided_json": NESTED(3000)}, "guided_json", None),  # past what the json module reads
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(NESTED(40))}}},
     "response_format", None),
    ({"guided_regex": "("}, "guided_regex", None),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs", None),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", None),
    ({"structured_outputs": "json"}, "structured_outputs", None),
    ({"guided_regex": "[0-9]+", "guided_choice": ["a"]}, "guided_choice", None),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", None),
    # vLLM's token-level constraints: refused, since unconstrained text would pass for them.
    ({"allowed_token_ids": [5, 6]}, "allowed_token_ids", None),
    ({"bad_words": ["no"]}, "bad_words", None),
    ({"min_p": 1.5}, "min_p", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 0}, "n", None),
    ({"n": 1000}, "n", None),
    ({"logprobs": 99}, "logprobs", None),
    ({"presence_penalty": 3}, "presence_penalty", None),
    ({"repetition_penalty": 0}, "repetition_penalty", None),
    ({"stop": [""]}, "stop", None),
    ({"stop": 5}, "stop", None),
    ({"stop_token_ids": [-1]}, "stop_token_ids", None),
    ({"max_tokens": 0}, "max_tokens", None),  # only an echo may generate nothing
    # Token ids no tokenizer can decode: checked before an echo decodes them (the fuzzer's 500).
    ({"prompt": [5, -1], "echo": True}, "prompt", None),
    ({"prompt": [[5], [2**40]], "echo": True, "logprobs": 1}, "prompt", None),
    ({"prompt_logprobs": 21}, "prompt_logprobs", None),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"prompt": None}, "prompt", None),
]


@pytest.mark.parametrize("change,param,code", BAD_COMPLETIONS, ids=[str(case[0])[:40] for case in BAD_COMPLETIONS])
def test_bad_completion_is_400(http, change, param, code):
    assert_envelope(http.post("/v1/completions", json={**COMPLETION, **change}), 400, code, param)


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),  # the field the client used
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "[a-z]+"}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize("change,param", BAD_CHATS, ids=[str(case[0])[:40] for case in BAD_CHATS])
def test_bad_chat_is_400(http, change, param):
    assert_envelope(http.post("/v1/chat/completions", json={**CHAT, **change}), 400, param=param)


def test_invalid_json_is_400(http):
    response = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_envelope(response, 400, "invalid_json")


def test_openai_client_sees_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=100_000)
    assert raised.value.code == "context_length_exceeded"


@pytest.mark.parametrize("argv,name,aliases", [
    ([], "smollm2", ()),
    (["--model", "models/../models/Llama-3"], "Llama-3", ("models/../models/Llama-3",)),
    (["--model", "Llama-3"], "Llama-3", ()),
    (["--model", "/m/Llama-3", "--served-model-name", "llama"], "llama", ()),
])
def test_a_model_answers_to_the_model_string_it_was_started_with(argv, name, aliases):
    """As vLLM serves it, so that `vllm bench serve --model PATH` (which sends PATH) finds it;
    the name reported stays the folder's."""
    import argparse

    from server.errors import APIError
    from server.engine_args import add_engine_arguments
    from server.serve_command import add_server_arguments, model_aliases, served_model_name
    from server.serving import ServerSettings, ServingState

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    assert (served_model_name(args), model_aliases(args)) == (name, aliases)
    serving = ServingState(ServerSettings(name, model_aliases=aliases), None, None, None, None)
    for model in (None, name, *aliases):
        serving.check_model(model)
    with pytest.raises(APIError) as refused:
        serving.check_model("other")
    assert refused.value.status_code == 404


def test_unknown_model_is_404(http):
    assert_envelope(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404, "model_not_found")
    assert_envelope(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model_not_found")


def test_unknown_route_keeps_its_status_in_the_envelope(http):
    assert_envelope(http.get("/v1/nothing-here"), 404)
    assert_envelope(http.get("/v1/completions"), 405)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}])
def test_missing_or_wrong_key_is_401(tiny_server, headers):
    for path in ("/v1/completions", "/v1/models", "/tokenize"):
        response = httpx.request("POST" if path != "/v1/models" else "GET", f"{tiny_server.url}{path}",
                                 json=COMPLETION, headers=headers)
        assert_envelope(response, 401, "invalid_api_key")


def test_every_route_but_health_and_metrics_needs_the_key(tiny_server):
    """The policy, route by route: probes and scrapers need no key; everything else, the schema
    included, answers 401 with the envelope without one, and works with it."""
    from server.middleware import OPEN_PATHS

    routes = [(method, route.path) for route in tiny_server.app.routes for method in sorted(route.methods)
              if method != "HEAD"]
    assert {path for _, path in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                                            "/detokenize", "/version", "/openapi.json", *OPEN_PATHS}
    for method, path in routes:
        url = f"{tiny_server.url}{path}"
        without_key = httpx.request(method, url, json={}, timeout=60)
        with_key = httpx.request(method, url, json={}, headers=tiny_server.headers(), timeout=60)
        if path in OPEN_PATHS:
            assert without_key.status_code == 200, path
        else:
            assert_envelope(without_key, 401, "invalid_api_key")
        assert with_key.status_code in (200, 400), (path, with_key.text)  # 400: `{}` is no valid body


def test_the_api_key_is_never_logged(tiny_server, caplog):
    caplog.set_level("DEBUG")
    for key in (API_KEY, "wrong-key-that-must-not-be-logged"):
        httpx.post(f"{tiny_server.url}/v1/completions", json=COMPLETION, timeout=60,
                   headers={"Authorization": f"Bearer {key}"})
    assert caplog.records  # DEBUG reached the loggers of the server and its clients alike
    assert API_KEY not in caplog.text and "wrong-key-that-must-not-be-logged" not in caplog.text


def test_openai_client_with_a_wrong_key(tiny_server):
    with openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_body_over_the_limit_is_413(http, tiny_server):
    limit = tiny_server.serving.settings.max_body_bytes
    response = http.post("/v1/completions", json={**COMPLETION, "prompt": "x" * (limit + 1)})
    assert_envelope(response, 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert_envelope(response, 413, "request_too_large")
