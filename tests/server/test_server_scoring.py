"""Scoring a text through the API: `echo` with `logprobs` (and `max_tokens: 0`), as lm-eval-harness
sends it, and vLLM's `prompt_logprobs`, checked against transformers' own logprobs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def reference(tiny_model_path, tiny_server):
    """prompt token ids -> transformers' log-softmax at every position, and the tolerance the
    server's dtype allows (float32, or bfloat16 on hosts that compute it natively)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    tolerance = 1e-4 if tiny_server.llm_engine.dtype == torch.float32 else 5e-2

    def logprobs(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), dim=-1)
    return logprobs, tolerance


@pytest.fixture()
def tokens(http):
    return lambda text: http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_lm_eval_loglikelihood_request(http, tokens, reference):
    """lm-eval's local-completions model: token-id prompts, max_tokens 1, logprobs 1, echo."""
    logprobs_of, tolerance = reference
    prompts = [tokens(TEXT), tokens("Hello there, general Kenobi")]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    for choice, ids in zip(response.json()["choices"], prompts):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        expected = logprobs_of(ids)
        for index in range(1, len(ids)):
            assert logprobs["token_logprobs"][index] == pytest.approx(expected[index - 1, ids[index]].item(),
                                                                      abs=tolerance)
            top = logprobs["top_logprobs"][index]
            assert logprobs["tokens"][index] in top and 1 <= len(top) <= 2
        assert choice["text"].startswith(http.post("/detokenize", json={"tokens": ids}).json()["prompt"])
        offsets = logprobs["text_offset"]
        assert offsets == [sum(len(token) for token in logprobs["tokens"][:i]) for i in range(len(offsets))]


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=[TEXT, TEXT], max_tokens=4, temperature=0, echo=True)
    assert [choice.text for choice in echoed.choices] == [TEXT + plain.choices[0].text] * 2
    assert echoed.usage.completion_tokens == 2 * plain.usage.completion_tokens


def test_max_tokens_zero_with_echo_returns_the_prompt_alone(client, tokens):
    ids = tokens(TEXT)
    completion = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True, logprobs=0)
    choice = completion.choices[0]
    assert choice.text == TEXT
    assert len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # the prompt's own token alone


@pytest.mark.parametrize("max_tokens", [5, 0])
def test_a_streamed_echo_sends_what_the_whole_response_holds(http, max_tokens):
    body = {"model": "tiny", "prompt": [TEXT, "Hello"], "max_tokens": max_tokens, "logprobs": 2, "echo": True,
            "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()["choices"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    for expected in whole:
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == expected["index"]]
        logprobs = [choice["logprobs"] for choice in mine if choice["logprobs"]]
        assert "".join(choice["text"] for choice in mine) == expected["text"]
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [value for part in logprobs for value in part[field]] == expected["logprobs"][field]
        assert mine[-1]["finish_reason"] == expected["finish_reason"] == "length"


def test_prompt_logprobs_in_vllms_format(http, tokens, reference):
    logprobs_of, tolerance = reference
    ids = tokens(TEXT)
    expected = logprobs_of(ids)
    completion = http.post("/v1/completions", json={"model": "tiny", "prompt": TEXT, "max_tokens": 2,
                                                    "prompt_logprobs": 3})
    chat = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "prompt_logprobs": 0,
                                                   "messages": [{"role": "user", "content": TEXT}]})
    assert completion.status_code == chat.status_code == 200, (completion.text, chat.text)
    scored = completion.json()["choices"][0]["prompt_logprobs"]
    assert completion.json()["choices"][0]["logprobs"] is None
    assert len(scored) == len(ids) and scored[0] is None
    for index in range(1, len(ids)):
        own = scored[index][str(ids[index])]
        assert own["logprob"] == pytest.approx(expected[index - 1, ids[index]].item(), abs=tolerance)
        assert own["rank"] >= 1 and own["decoded_token"]
        others = [entry for token, entry in scored[index].items() if token != str(ids[index])]
        assert len(scored[index]) in (3, 4) and sorted(entry["rank"] for entry in others) == [
            rank for rank in (1, 2, 3) if rank != own["rank"]]
    chat_scored = chat.json()["prompt_logprobs"]
    assert chat_scored[0] is None and all(len(entry) == 1 for entry in chat_scored[1:])


def test_prompt_logprobs_requests_leave_no_blocks_behind(http, tiny_server):
    from server_harness import wait_until

    for _ in range(2):  # the second would hit the first's cached prefix, were it allowed to
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": TEXT * 4, "max_tokens": 1,
                                                  "echo": True, "logprobs": 1}).status_code == 200
    engine = tiny_server.llm_engine
    wait_until(lambda: not engine.has_unfinished_requests(), what="the engine to go idle")
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.pool.num_blocks
    assert not engine._prompt_logprobs
