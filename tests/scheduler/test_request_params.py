"""SamplingParams validation, Request bookkeeping and the scheduler's intake checks."""

import pytest

from kvcache import KVCacheManager
from scheduler import (
    InvalidRequestError, Request, RequestStatus, SamplingParams, Scheduler, SchedulerConfig, StructuredOutput,
)
from scheduler.request import json_depth


@pytest.mark.parametrize("param, value", [
    ("max_tokens", 0),
    ("max_tokens", 2.5),
    ("max_tokens", None),  # OpenAI clients send null
    ("max_tokens", "16"),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("top_p", 0.0),
    ("top_p", 1.1),
    ("top_k", -2),
    ("top_k", 1.5),
    ("min_p", 1.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", 2.1),
    ("logprobs", -1),
    ("logprobs", SamplingParams.MAX_LOGPROBS + 1),
    ("min_tokens", -1),
    ("min_tokens", 17),  # above the default max_tokens of 16
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["7"]),
    ("seed", 1.5),
])
def test_invalid_sampling_params_name_the_bad_param(param, value):
    with pytest.raises(InvalidRequestError) as raised:
        SamplingParams(**{param: value})
    assert raised.value.param == param
    assert param in str(raised.value)


def test_valid_sampling_params_are_normalised():
    params = SamplingParams(temperature=0.0, top_k=-1, stop="###", logprobs=SamplingParams.MAX_LOGPROBS,
                            min_tokens=16, stop_token_ids=[0, 5], seed=7)
    assert params.top_k == 0 and params.stop == ["###"]
    assert params.is_greedy and not params.has_penalties
    assert SamplingParams(repetition_penalty=1.2).has_penalties


def test_invalid_request_error_is_a_value_error():
    error = InvalidRequestError("bad", param="prompt", code="context_length_exceeded")
    assert isinstance(error, ValueError) and (error.param, error.code) == ("prompt", "context_length_exceeded")


def test_request_tracks_prompt_and_outputs_together():
    request = Request("a", [1, 2, 3], SamplingParams())
    request.append_output_token(9)
    assert request.all_token_ids == [1, 2, 3, 9] and request.num_tokens == 4
    assert request.num_prompt_tokens == 3 and request.output_token_ids == [9]
    assert request.status is RequestStatus.WAITING and not request.is_finished
    assert RequestStatus.WAITING.finish_reason is None
    assert [s.finish_reason for s in RequestStatus if s.is_finished] == ["stop", "length", "abort", "error", "timeout"]


def test_scheduler_refuses_a_duplicate_id_and_an_unknown_policy():
    config = SchedulerConfig(max_model_len=32)
    scheduler = Scheduler(config, KVCacheManager(num_blocks=8))
    scheduler.add_request(Request("a", [1], SamplingParams()))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(Request("a", [2], SamplingParams()))
    assert scheduler.num_waiting == 1
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        Scheduler(SchedulerConfig(max_model_len=32, policy="lottery"), KVCacheManager(num_blocks=8))


@pytest.mark.parametrize("policy", ["fcfs", "priority", "sjf", "fair", "slo"])
def test_a_held_request_waits_while_those_behind_it_run(policy):
    """The engine holds a request whose grammar is compiling: it keeps its place in the queue,
    the ones after it are admitted, and it is admitted once let go."""
    scheduler = Scheduler(SchedulerConfig(max_model_len=64, policy=policy), KVCacheManager(num_blocks=32))
    held = Request("held", [1, 2, 3], SamplingParams(), arrival_time=0.0, held=True)
    scheduler.add_request(held)
    scheduler.add_request(Request("next", [4, 5], SamplingParams(), arrival_time=1.0))
    assert [s.request.request_id for s in scheduler.schedule().scheduled] == ["next"]
    assert held.status is RequestStatus.WAITING and scheduler.num_waiting == 1
    held.held = False
    assert {s.request.request_id for s in scheduler.schedule().scheduled} == {"next", "held"}


@pytest.mark.parametrize("text, depth", [
    ("3", 0), ('"[[{"', 0), ('{"a": 1}', 1), ('{"a": "}}}", "b": [1, {"c": [2]}]}', 4),
    ('{"a": "\\"[[[\\\\", "b": {}}', 2), ("[" * 5000 + "]" * 5000, 5000),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth


def test_a_schema_nested_too_deep_is_refused():
    nested = '{"type": "object", "properties": {"a": ' * 40 + "{}" + "}}" * 40
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(structured_output=StructuredOutput("json", nested, "guided_json"))
    assert error.value.param == "guided_json" and "nests more than" in str(error.value)
