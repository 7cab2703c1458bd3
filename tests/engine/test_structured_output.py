"""Structured outputs: every kind of constraint holds on the text generated, greedy or sampled,
through either sampler, beside unconstrained requests, across preemption and async
scheduling; a complete grammar ends its request; a bad one is refused and leaves nothing behind.

The tiny model has random weights, so whatever it generates is the mask's doing: an unmasked
token would break the grammar within a few steps.
"""

import json
import re

import pytest
import torch

from engine.structured_output import StructuredOutputs
from scheduler import InvalidRequestError, SamplingParams, StructuredOutput
from tiny_llm import make_llm

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "light blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "color", "count", "tags"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", 'a "quoted" maybe\n']
REGEX = r"[0-9]{3}-[a-c]{2,4}"
GRAMMAR = 'root ::= "The answer is " ("yes" | "no") "." | "I do not know."'
CONSTRAINTS = {
    "json": StructuredOutput("json", json.dumps(SCHEMA)),
    "regex": StructuredOutput("regex", REGEX),
    "choice": StructuredOutput("choice", json.dumps(CHOICES)),
    "grammar": StructuredOutput("grammar", GRAMMAR),
}
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "counting sheep, " * 12]


def follows(kind: str, text: str) -> bool:
    """Whether `text` is a sentence of CONSTRAINTS[kind]'s language (checked without xgrammar)."""
    if kind == "json":
        value = json.loads(text)
        return (set(value) == set(SCHEMA["properties"]) and isinstance(value["ok"], bool)
                and value["color"] in ("red", "green", "light blue") and type(value["count"]) is int
                and 0 <= value["count"] <= 99 and len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"})
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    return text in ("The answer is yes.", "The answer is no.", "I do not know.")


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    return make_llm(tiny_model_path)


def assert_untouched(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.pool.num_blocks
    assert not engine.structured._matchers, "every matcher is released with its request"


@pytest.mark.parametrize("sampler", ["kernel", "torch"])
@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_every_kind_of_constraint_holds_greedy_and_sampled(llm, kind, sampler, monkeypatch):
    if sampler == "torch":
        monkeypatch.setattr(llm.engine.runner.sampler, "kernel", None)
    elif llm.engine.runner.sampler.kernel is None:
        pytest.skip("no C++ kernels on this host")
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=80, temperature=temperature, seed=7, top_k=50,
                                structured_output=CONSTRAINTS[kind])
        for completion in llm.generate(PROMPTS, params):
            assert completion.finish_reason == "stop", completion.text
            assert follows(kind, completion.text), completion.text
    assert_untouched(llm)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(llm):
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = [c.token_ids for c in llm.generate(PROMPTS, plain)]
    constrained = SamplingParams(max_tokens=16, temperature=0.0, structured_output=CONSTRAINTS["json"])
    engine = llm.engine
    ids = [engine.add_request(p, plain if i % 2 else constrained) for i, p in enumerate(PROMPTS)]
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            done.setdefault(output.request_id, []).extend(output.new_token_ids)
    assert [done[ids[i]] for i in (1, 3)] == [alone[1], alone[3]]
    assert_untouched(llm)


def test_a_complete_grammar_ends_the_request_even_under_ignore_eos(llm):
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, min_tokens=40,
                            structured_output=CONSTRAINTS["choice"])
    (completion,) = llm.generate(["Is the sky blue?"], params)
    assert completion.finish_reason == "stop"
    assert completion.text in CHOICES
    assert completion.token_ids[-1] in llm.engine.eos_token_ids, "the grammar ends with an end-of-sequence token"
    assert_untouched(llm)


@pytest.mark.parametrize("constraint", [
    StructuredOutput("json", '{"type": "nonsense"}', "response_format"),
    StructuredOutput("json", "not json", "guided_json"),
    StructuredOutput("regex", "(", "guided_regex"),
    StructuredOutput("grammar", "root ::= ", "guided_grammar"),
    StructuredOutput("choice", "[]", "guided_choice"),
    StructuredOutput("choice", '["yes", ""]', "guided_choice"),
])
def test_a_constraint_that_does_not_compile_is_refused_and_leaves_nothing(llm, constraint):
    with pytest.raises(InvalidRequestError) as error:
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, structured_output=constraint))
    assert error.value.param == constraint.param
    assert "[" not in str(error.value).split(":")[0], "xgrammar's log prefix is cut off"
    assert_untouched(llm)


@pytest.mark.parametrize("constraint, param", [
    (StructuredOutput("xml", "<a/>"), "structured_outputs"),
    (StructuredOutput("regex", ""), "structured_outputs"),
    (StructuredOutput("grammar", "x" * (StructuredOutput.MAX_SPEC_CHARS + 1), "guided_grammar"), "guided_grammar"),
])
def test_a_malformed_constraint_is_refused_by_the_parameters(constraint, param):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(structured_output=constraint)
    assert error.value.param == param


@pytest.mark.parametrize("steps", [0, 3])
def test_an_aborted_request_releases_its_grammar(llm, steps):
    engine = llm.engine
    request_id = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50, structured_output=CONSTRAINTS["json"]))
    for _ in range(steps):
        engine.step()
    assert request_id in engine.structured
    engine.abort(request_id)
    assert_untouched(llm)
    assert not engine.structured.num_compiling


def test_a_slow_grammar_holds_back_its_own_request_alone(llm):
    """Compiling runs beside the engine: a schema of 1,000 optional properties (about 2 s to
    compile; xgrammar is cubic in them) holds its request while a plain one comes and goes."""
    engine = llm.engine
    schema = {"type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(1000)}}
    slow = engine.add_request(PROMPTS[0], SamplingParams(
        max_tokens=8, temperature=0.0, structured_output=StructuredOutput("json", json.dumps(schema))))
    plain = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = (engine.structured.num_compiling, output.finish_reason)
    assert finished[plain] == (1, "length"), "the plain request finished while the grammar was compiling"
    assert finished[slow] == (0, "length")
    assert_untouched(llm)


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(llm, monkeypatch):
    class FailingCompiler:
        def compile_grammar(self, grammar):
            raise RuntimeError("[02:29:56] /project/cpp/compiler.cc:1: out of memory")

    engine = llm.engine
    monkeypatch.setattr(engine.structured, "_get_compiler", FailingCompiler)
    constrained = SamplingParams(max_tokens=8, structured_output=CONSTRAINTS["regex"])
    failed = engine.add_request(PROMPTS[0], constrained)
    plain = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert [(o.finish_reason, o.error) for o in outputs[failed]] == [
        ("error", "its grammar did not compile: out of memory")]
    assert outputs[plain][-1].finish_reason == "length"
    assert_untouched(llm)


@pytest.mark.parametrize("config", [
    {"num_kv_blocks": 40},  # preempted by recompute, over and over: the matchers keep their place
    {"num_kv_blocks": 40, "swap_space": 16 * 1024 * 1024, "swap_threshold_tokens": 1},
    {"max_num_batched_tokens": 16},
])
def test_async_scheduling_and_preemption_keep_to_the_grammar(tiny_model_path, config):
    """Async scheduling reads a constrained step back before the next is built (its mask needs
    the token); its outputs are the synchronous engine's, token for token."""
    prompts = PROMPTS * 3
    params = [SamplingParams(max_tokens=60, temperature=0.0 if i % 2 else 1.0, seed=i,
                             structured_output=list(CONSTRAINTS.values())[i % 4]) for i in range(len(prompts))]
    outputs = []
    for async_scheduling in (False, True):
        llm = make_llm(tiny_model_path, async_scheduling=async_scheduling, **config)
        completions = llm.generate(prompts, params)
        assert_untouched(llm)
        outputs.append([(c.token_ids, c.finish_reason) for c in completions])
        for i, completion in enumerate(completions):
            assert follows(list(CONSTRAINTS)[i % 4], completion.text), completion.text
    assert outputs[1] == outputs[0]


def test_the_mask_allows_exactly_the_tokens_that_continue_the_output(llm):
    tokenizer = llm.engine.tokenizer
    structured = StructuredOutputs(tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    structured.start("constrained", structured.grammar(StructuredOutput("choice", json.dumps(["yes", "no"]))))
    assert structured.take_compiled(None) == [("constrained", None)]

    class Row:
        def __init__(self, request_id):
            self.request_id = request_id

    logits = torch.randn(2, llm.engine.vocab_size)
    masked = logits.clone()
    structured.apply_masks(masked, [Row("plain"), Row("constrained")])
    assert torch.equal(masked[0], logits[0]), "a row without a constraint is untouched"
    allowed = torch.nonzero(masked[1] > float("-inf")).flatten().tolist()
    assert torch.equal(masked[1][allowed], logits[1][allowed])
    texts = {tokenizer.decode([token]) for token in allowed}
    assert texts and all("yes".startswith(text) or "no".startswith(text) for text in texts), texts
    assert {"yes", "no"} <= texts or {"y", "n"} <= texts
