"""The front end's text (server/output_text.py): each iteration's token ids decoded into text,
and a stop string ending the request there, with what the engine did after it dropped."""

import pytest
from transformers import AutoTokenizer

from engine import RequestOutput
from scheduler import SamplingParams
from scheduler.request import RequestTimes
from server.engine_core import EngineRequest
from server.output_text import OutputText

TEXT = "The quick brown fox jumps over the lazy dog, and then it sleeps."


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def times(num_output_tokens: int, first: float = 1.0, last: float = 2.0) -> RequestTimes:
    return RequestTimes("", 0.0, 3, num_output_tokens, 0.5, first, last, None, within_slo=False)


def outputs_of(token_ids: list[int], request_id: str = "r", finished_at: int | None = None) -> list[RequestOutput]:
    """One output per token, as the engine sends them, the last finished if `finished_at` says so."""
    return [RequestOutput(request_id, [token_id], "", index == finished_at, times(index + 1),
                          "length" if index == finished_at else None)
            for index, token_id in enumerate(token_ids)]


def start(tokenizer, stop: list[str], request_id: str = "r", slo_ttft_s: float | None = None,
          min_tokens: int = 0) -> OutputText:
    text = OutputText(tokenizer)
    params = SamplingParams(max_tokens=64, stop=stop, min_tokens=min_tokens)
    text.start([EngineRequest(request_id, tokenizer.encode("Say:"), params, 0.0, slo_ttft_s=slo_ttft_s)])
    return text


def test_text_without_stop_strings_is_the_whole_decode(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    text = start(tokenizer, [])
    kept, stopped = text.process(outputs_of(token_ids, finished_at=len(token_ids) - 1))
    assert "".join(output.new_text for output in kept) == TEXT
    assert stopped == [] and kept[-1].finished and kept[-1].finish_reason == "length"


def test_a_stop_string_ends_the_request_and_what_came_after_is_dropped(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    text = start(tokenizer, ["lazy"])
    outputs = outputs_of(token_ids)
    kept, stopped = text.process(outputs[:-3])
    assert stopped == ["r"]
    assert "".join(output.new_text for output in kept) == TEXT[:TEXT.index("lazy")]
    end = kept[-1]
    assert end.finished and end.finish_reason == "stop"
    # Ended at the token that completed "lazy": no token past it reaches the client.
    assert tokenizer.decode([t for output in kept for t in output.new_token_ids]).endswith("lazy")
    assert end.times.finished_time == end.times.last_token_time and end.times.within_slo
    # The engine's next token and its abort's end arrive later: neither is the client's.
    late = outputs[-3:] + [RequestOutput("r", [], "", True, times(len(token_ids)), "abort")]
    assert text.process(late) == ([], [])


def test_a_stop_string_judges_the_slo_targets_as_the_engine_would(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    text = start(tokenizer, ["fox"], slo_ttft_s=0.5)  # the first token came at 1.0 s
    kept, stopped = text.process(outputs_of(token_ids))
    assert stopped == ["r"] and kept[-1].finish_reason == "stop" and not kept[-1].times.within_slo


def test_a_stop_inside_a_multi_token_output_cuts_its_tokens(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stop_index = next(i for i in range(len(token_ids)) if "fox" in tokenizer.decode(token_ids[:i + 1]))
    text = start(tokenizer, ["fox"])
    output = RequestOutput("r", token_ids, "", False, times(len(token_ids)))
    [kept], stopped = text.process([output])
    assert stopped == ["r"] and kept.finished
    assert kept.new_token_ids == token_ids[:stop_index + 1]
    assert kept.times.num_output_tokens == stop_index + 1
    assert kept.new_text == TEXT[:TEXT.index("fox")]


def test_a_stop_string_on_the_engines_last_token_needs_no_abort(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stop_index = next(i for i in range(len(token_ids)) if "fox" in tokenizer.decode(token_ids[:i + 1]))
    text = start(tokenizer, ["fox"])
    kept, stopped = text.process(outputs_of(token_ids[:stop_index + 1], finished_at=stop_index))
    assert stopped == []  # the engine has ended it already
    assert kept[-1].finish_reason == "stop"
    assert "".join(output.new_text for output in kept) == TEXT[:TEXT.index("fox")]


def test_a_stop_string_before_min_tokens_does_not_count(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    first_the = next(i for i in range(len(token_ids)) if "the" in tokenizer.decode(token_ids[:i + 1]))
    text = start(tokenizer, ["the"], min_tokens=first_the + 1)  # "the" first completes at token first_the + 1
    kept, stopped = text.process(outputs_of(token_ids))
    # Not at "over the", within min_tokens, but at "then", the next "the" after it (as vLLM counts).
    assert stopped == ["r"]
    assert "".join(output.new_text for output in kept) == TEXT[:TEXT.index("then")]


def test_requests_are_decoded_apart_and_forgotten(tokenizer):
    text = OutputText(tokenizer)
    prompts = {"a": "Once upon a time", "b": "Hello there"}
    text.start([EngineRequest(rid, tokenizer.encode("Say:"), SamplingParams(), 0.0) for rid in prompts])
    ids = {rid: tokenizer.encode(p, add_special_tokens=False) for rid, p in prompts.items()}
    interleaved = [output for pair in zip(outputs_of(ids["a"], "a"), outputs_of(ids["b"], "b")) for output in pair]
    kept, _ = text.process(interleaved)
    for rid, prompt in prompts.items():
        assert prompt.startswith("".join(output.new_text for output in kept if output.request_id == rid))
    text.forget(["a"])
    assert text.process(outputs_of(ids["a"], "a")) == ([], [])
