"""The official `openai` client against a real server on the tiny random Llama (the text is noise)."""

import json
import re
from typing import Literal

import pydantic
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"  # under one KV block, so repeats never hit the prefix cache


def test_models_lists_the_served_model(client, tiny_server):
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny"]


def test_completion_reports_usage_and_length(client):
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0,
                                           extra_body={"ignore_eos": True})
    choice = completion.choices[0]
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert choice.finish_reason == "length"
    assert choice.text
    assert completion.usage.completion_tokens == 7
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.total_tokens == 11


def test_completion_takes_token_ids_and_lists_of_prompts(client, http):
    token_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=token_ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text

    batch = client.completions.create(model="tiny", prompt=[PROMPT, "Hello"], n=2, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI orders them
    assert batch.choices[0].text == batch.choices[1].text
    assert batch.choices[2].text == batch.choices[3].text
    assert batch.usage.prompt_tokens == 4 + 1  # each prompt counted once, whatever n is
    assert batch.usage.completion_tokens == 4 * 3


def test_chat_completion(client):
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=6, temperature=0,
        extra_body={"ignore_eos": True})
    choice = chat.choices[0]
    assert chat.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert chat.usage.completion_tokens == 6


def test_streamed_completion_matches_and_counts_its_tokens(client):
    expected = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, logprobs=0,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage_chunk, content_chunks = chunks[-1], chunks[:-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(chunk.usage is None for chunk in content_chunks)
    # Every streamed token carries its logprob, even one whose text is still held back.
    num_streamed_tokens = sum(len(chunk.choices[0].logprobs.tokens) for chunk in content_chunks)
    assert usage_chunk.usage.completion_tokens == num_streamed_tokens == 12
    assert "".join(chunk.choices[0].text for chunk in content_chunks) == expected.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in content_chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in content_chunks[:-1])


def test_streamed_chat_sends_role_first_and_usage_last(client):
    messages = [{"role": "user", "content": "Hi"}]
    expected = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True, logprobs=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    first, usage_chunk, middle = chunks[0], chunks[-1], chunks[1:-1]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert usage_chunk.choices == []
    num_streamed_tokens = sum(len(chunk.choices[0].logprobs.content) for chunk in middle)
    assert usage_chunk.usage.completion_tokens == num_streamed_tokens == 8
    assert "".join(chunk.choices[0].delta.content or "" for chunk in middle) == expected.choices[0].message.content
    assert middle[-1].choices[0].finish_reason == "length"
    assert len({chunk.id for chunk in chunks}) == 1


def _stop_string(text: str) -> tuple[str, int]:
    """A short piece of `text`, from past its start, that first occurs where it is taken from."""
    for start in range(3, len(text) - 2):
        stop = text[start:start + 2]
        if stop.strip() and text.find(stop) == start:
            return stop, start
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(client, stream):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop, start = _stop_string(full)
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(chunk.choices[0].text for chunk in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, finish_reason = choice.text, choice.finish_reason
    assert text == full[:start]
    assert finish_reason == "stop"


def test_n_choices_differ_and_a_seed_reproduces_them(client):
    def sample(seed):
        completion = client.completions.create(model="tiny", prompt=PROMPT, n=3, max_tokens=8, temperature=1.0,
                                               seed=seed, extra_body={"ignore_eos": True})
        assert [choice.index for choice in completion.choices] == [0, 1, 2]
        return [choice.text for choice in completion.choices]

    first = sample(1234)
    assert len(set(first)) == 3  # seed + i per choice, as vLLM does
    assert sample(1234) == first
    assert sample(4321) != first


def test_chat_top_logprobs(client):
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_tokenize_and_detokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 4
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2


def test_health_and_metrics_need_no_key(tiny_server):
    import httpx

    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    assert httpx.get(f"{tiny_server.url}/metrics").status_code == 200
    version = httpx.get(f"{tiny_server.url}/version", headers=tiny_server.headers())
    assert version.status_code == 200 and version.json()["version"]


def test_version_says_which_kernels_this_host_got(http, tiny_server):
    from engine import host

    version = http.get("/version").json()
    engine = tiny_server.llm_engine
    assert version["device"] == str(engine.device)
    assert version["kv_cache"]["dtype"] == version["dtype"], "auto: the cache holds the model's dtype"
    assert version["paths"] == engine.paths
    assert version["paths"]["linear"] in ("onednn-packed", "F.linear")
    assert version["host"] == host.current().summary()


def test_explicit_nulls_take_the_defaults(http):
    # What SDK wrappers send for every field a caller left unset; OpenAI documents them nullable.
    nulls = dict.fromkeys(["n", "stream", "stream_options", "logprobs", "top_logprobs", "temperature", "top_p", "seed",
                           "stop", "user", "ignore_eos", "min_tokens", "skip_special_tokens", "presence_penalty",
                           "include_stop_str_in_output", "max_completion_tokens", "response_format", "tools"])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi", "name": None}], "max_tokens": 3, **nulls}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert [choice["index"] for choice in response.json()["choices"]] == [0]
    completion = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "echo": None,
                                                    "suffix": None, "best_of": None, **nulls})
    assert completion.status_code == 200, completion.text


def test_stream_options_ask_for_usage_by_being_there(http):
    """As vLLM reads them: `stream_options: {}` means include_usage, and continuous_usage_stats
    puts the running count on every chunk."""
    def stream(options):
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "stream": True,
                "stream_options": options}
        with http.stream("POST", "/v1/completions", json=body) as response:
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(item) for item in data[:-1]]

    chunks = stream({})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    chunks = stream({"continuous_usage_stats": True})
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 4
    assert all(chunk["usage"]["prompt_tokens"] == 4 for chunk in chunks)
    assert stream({"include_usage": False})[-1]["choices"]


def test_logit_bias_reaches_the_sampler(client, http):
    token = http.post("/tokenize", json={"prompt": " fox"}).json()["tokens"][-1]
    expected = http.post("/detokenize", json={"tokens": [token] * 3}).json()["prompt"]
    forced = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == expected
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0.8, seed=1, logit_bias={str(token): 100},
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == expected


class Verdict(pydantic.BaseModel):
    """What the client's `parse` turns the reply into (an enum and a bool: the tiny model's
    noise would wander in a free string, and the test would wait on max_tokens)."""

    answer: Literal["yes", "no", "maybe"]
    sure: bool


def test_structured_outputs_through_the_official_client(client):
    """Each way a client asks: the SDK's `parse` (response_format json_schema, strict), OpenAI's
    json_object, and vLLM's fields, streamed and with n > 1."""
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    parsed = client.chat.completions.parse(model="tiny", messages=messages, response_format=Verdict, max_tokens=40,
                                           temperature=1.0, seed=3)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    assert parsed.choices[0].finish_reason == "stop"
    choice = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, n=3, temperature=1.0,
                                       extra_body={"guided_choice": ["red", "green"]})
    assert [c.text for c in choice.choices if c.text not in ("red", "green")] == []
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, stream=True,
                                            extra_body={"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}})
    assert re.fullmatch("[0-9]{2}:[0-9]{2}", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    # json_object: any object. The tiny model's noise may not close it within max_tokens, so it
    # must open one, and parse as one where it ended.
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_chat_template_options_render_as_vllm_renders_them(http):
    story = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a"}]

    def tokens(**options):
        response = http.post("/tokenize", json={"messages": story, **options})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    new_turn, closed = tokens(), tokens(add_generation_prompt=False)
    assert len(closed) < len(new_turn) and new_turn[:len(closed)] == closed
    continued = tokens(add_generation_prompt=False, continue_final_message=True)
    # The last message is left open: it ends in its own text, without the end-of-turn marker.
    own = http.post("/tokenize", json={"prompt": "Once upon a"}).json()["tokens"]
    assert continued[-len(own):] == own and len(continued) < len(closed)
    assert tokens(chat_template_kwargs={"enable_thinking": False}) == new_turn  # a variable this template ignores

    chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": story, "max_tokens": 2,
                                                   "add_generation_prompt": False, "continue_final_message": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(continued)
    for options, param in [({"continue_final_message": True}, "continue_final_message"),
                           ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs")]:
        refused = http.post("/v1/chat/completions", json={"model": "tiny", "messages": story, **options})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    last_is_user = http.post("/v1/chat/completions", json={"model": "tiny", "messages": story[:1],
                                                           "add_generation_prompt": False,
                                                           "continue_final_message": True})
    assert last_is_user.status_code == 400


# Renders what SmolLM2's template leaves out: a message's name, tool calls (arguments as an
# object) and the call a tool's answer is for.
TOOL_TEMPLATE = ("{% for m in messages %}[{{ m.role }}{% if m.name %}:{{ m.name }}{% endif %}]{{ m.content }}"
                 "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} {{ c.function.arguments.city }}>"
                 "{% endfor %}{% if m.tool_call_id %}<for {{ m.tool_call_id }}>{% endif %}{% endfor %}")


def test_an_operators_chat_template_sees_names_and_tool_calls(tiny_model_path, torch_threads):
    import httpx

    from server_harness import start_server

    server = start_server(tiny_model_path, "tiny", num_kv_blocks=32, chat_template=TOOL_TEMPLATE)
    messages = [
        {"role": "user", "content": "Weather in Paris?", "name": "ada"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    try:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
            text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
            assert text == "[user:ada]Weather in Paris?[assistant]<call weather Paris>[tool]sunny<for call_1>"
            chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 1})
            assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(tokens)
            refused = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                              "chat_template": TOOL_TEMPLATE})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
    finally:
        server.stop()


def test_chat_template_flag_takes_a_file_or_the_template_itself(tmp_path):
    from server.serve_command import load_chat_template

    path = tmp_path / "template.jinja"
    path.write_text(TOOL_TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == TOOL_TEMPLATE
    assert load_chat_template(TOOL_TEMPLATE) == TOOL_TEMPLATE
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_chat_echo_starts_the_reply_with_the_assistant_message_it_continues(http):
    story = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a"}]
    body = {"model": "tiny", "messages": story, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "add_generation_prompt": False, "continue_final_message": True}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    echoed = http.post("/v1/chat/completions", json={**body, "echo": True}).json()["choices"][0]["message"]
    assert echoed["content"] == "Once upon a" + plain
    with http.stream("POST", "/v1/chat/completions", json={**body, "echo": True, "stream": True}) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == echoed["content"]
    # The last message is the user's: there is nothing of the reply's to echo.
    question = {"model": "tiny", "messages": story[:1], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    replies = [http.post("/v1/chat/completions", json={**question, "echo": echo}).json()["choices"][0]["message"]
               for echo in (False, True)]
    assert replies[0] == replies[1]
