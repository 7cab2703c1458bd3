"""Bad input is refused before it touches the engine; a failing step fails only its requests."""

import json

import pytest

from engine import LLM
from scheduler import InvalidRequestError, SamplingParams
from server.cli import main


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    return LLM(str(tiny_model_path), dtype="float32", num_kv_blocks=64, max_model_len=256)


def assert_untouched(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.pool.num_blocks


@pytest.mark.parametrize("prompt, code", [
    ("", None),
    ([], None),
    ([5, -1], None),
    ([10 ** 9], None),
    (list(range(300)), "context_length_exceeded"),
])
def test_bad_prompts_are_refused(llm, prompt, code):
    with pytest.raises(InvalidRequestError) as error:
        llm.generate([prompt] if isinstance(prompt, list) else prompt, SamplingParams(max_tokens=4))
    assert error.value.param == "prompt"
    assert error.value.code == code
    assert_untouched(llm)


def test_one_bad_prompt_queues_nothing(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert_untouched(llm)


@pytest.mark.parametrize("params, param", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -5}, "top_k"),
    ({"logprobs": 99}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_sampling_parameters_are_refused(params, param):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**params)
    assert error.value.param == param


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch):
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = llm.generate(["a healthy prompt"], params)[0].token_ids

    real_forward = engine.runner.model.forward
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner.model, "forward", fail_once)
    engine.add_request(engine.tokenize("doomed prompt"), params, request_id="doomed")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("doomed", "error")]
    assert "injected fault" in outputs[0].error
    assert_untouched(llm)
    assert llm.generate(["a healthy prompt"], params)[0].token_ids == expected


def test_abort_frees_everything(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add_request(engine.tokenize("first"), params, request_id="a")
    engine.add_request(engine.tokenize("second"), params, request_id="b")
    engine.step()
    final = engine.abort("a")
    assert final.finish_reason == "abort" and final.finished
    assert engine.abort("a") is None, "a request ends exactly once"
    assert engine.abort("b").finish_reason == "abort"
    assert_untouched(llm)


def test_stop_strings_cut_the_text(smollm2_path):
    llm = LLM(str(smollm2_path), dtype="float32", num_kv_blocks=128, max_model_len=1024)
    free = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=12, temperature=0.0))[0]
    stop = free.text.strip().split(",")[1].strip()  # a number the model is going to write
    cut = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert free.text.startswith(cut.text)
    kept = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop],
                                                       include_stop_str_in_output=True))[0]
    assert kept.text == cut.text + stop


def test_cli_generate_json(tiny_model_path, capsys):
    code = main(["generate", "--model", str(tiny_model_path), "--dtype", "float32", "--num-kv-blocks", "64",
                 "--max-model-len", "256", "--max-tokens", "5", "--json", "one", "two"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    assert all(len(line["token_ids"]) <= 5 and isinstance(line["text"], str) for line in lines)


def test_cli_reports_bad_input(tiny_model_path, capsys):
    code = main(["generate", "--model", str(tiny_model_path), "--dtype", "float32", "--num-kv-blocks", "64",
                 "--max-model-len", "256", "--temperature", "-2", "hi"])
    assert code == 2
    assert "temperature" in capsys.readouterr().err
