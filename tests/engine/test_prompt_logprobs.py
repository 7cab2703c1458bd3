"""Prompt logprobs (vLLM's prompt_logprobs; echo with logprobs): every prompt token after the
first scored as transformers scores it, however the prompt was chunked, cached, preempted
or batched."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler import SamplingParams
from tiny_llm import make_llm

PROMPTS = [
    "The capital of France is",
    "counting sheep, " * 20,  # 81 tokens: chunked under the small token budgets below
    "Hello",
    "Q: What is the boiling point of water?\nA:",
    "one sheep, two sheep, " * 12,
]
TOLERANCE = 1e-4
SCORED = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=3)


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """prompt token ids -> transformers' log-softmax over the vocabulary at every position."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)

    def logprobs(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)
    return logprobs


def check_against_reference(completion, reference, number: int) -> None:
    ids = completion.prompt_token_ids
    scored = completion.prompt_logprobs
    assert scored is not None and len(scored) == len(ids) and scored[0] is None
    expected = reference(ids)
    for index in range(1, len(ids)):
        entry, row = scored[index], expected[index - 1]
        assert entry.token_id == ids[index]
        own = row[ids[index]].item()
        assert entry.logprob == pytest.approx(own, abs=TOLERANCE)
        # A random model's distribution is nearly flat: thousands of tokens lie within float
        # rounding of each other, so rank and order are checked up to the tolerance.
        assert int((row > own + TOLERANCE).sum()) + 1 <= entry.rank <= int((row > own - TOLERANCE).sum()) + 1
        assert len(entry.top) == number
        assert [value for _, value in entry.top] == pytest.approx(row.topk(number).values.tolist(), abs=TOLERANCE)
        assert [value for _, value in entry.top] == pytest.approx([row[token].item() for token, _ in entry.top],
                                                                  abs=TOLERANCE)


@pytest.mark.parametrize("config, max_tokens", [
    ({}, 4),
    ({"max_num_batched_tokens": 16}, 4),  # prompts chunked across steps, decodes beside the chunks
    ({"max_num_batched_tokens": 16, "async_scheduling": True}, 4),
    ({"num_kv_blocks": 40}, 24),  # preempted by recompute while decoding: not scored again
    # Four prompts filling at once, preempted mid-prompt: scored again, the first score kept.
    ({"num_kv_blocks": 32, "max_num_batched_tokens": 16, "long_prefill_token_threshold": 4}, 4),
    ({"attention_backend": "torch"}, 4),
])
def test_prompt_tokens_are_scored_as_transformers_scores_them(tiny_model_path, reference, config, max_tokens):
    llm = make_llm(tiny_model_path, **config)
    completions = llm.generate(PROMPTS, dataclasses.replace(SCORED, max_tokens=max_tokens))
    for completion in completions:
        check_against_reference(completion, reference, SCORED.prompt_logprobs)
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not llm.engine._prompt_logprobs, "nothing is kept for a finished request"
    if "num_kv_blocks" in config:
        assert llm.engine.scheduler.num_preemptions > 0


def test_a_cached_prefix_is_scored_again_and_others_still_hit_it(tiny_model_path, reference):
    llm = make_llm(tiny_model_path)
    shared = "You are a careful assistant. Answer in one short sentence. " * 2
    plain = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate(shared + "Why is the sky blue?", plain)
    scored = llm.generate(shared + "What is rain?", SCORED)[0]
    check_against_reference(scored, reference, SCORED.prompt_logprobs)
    assert scored.num_cached_tokens == 0
    assert llm.generate(shared + "Name a planet.", plain)[0].num_cached_tokens > 0


def test_scoring_changes_no_token_and_only_the_asking_requests_get_scores(tiny_model_path, reference):
    llm = make_llm(tiny_model_path, max_num_batched_tokens=16)
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in llm.generate(PROMPTS, plain)]
    params = [SCORED if i % 2 else plain for i in range(len(PROMPTS))]
    completions = llm.generate(PROMPTS, params)
    assert [c.token_ids for c in completions] == expected
    for completion, asked in zip(completions, params):
        if asked.prompt_logprobs is None:
            assert completion.prompt_logprobs is None
        else:
            check_against_reference(completion, reference, asked.prompt_logprobs)


def test_one_token_prompt_chunks_through_the_static_decode_path(tiny_model_path, reference):
    """A budget of one token makes every prompt chunk one token long, shaped like a decode:
    with static decode steps on (CUDA graphs' buffers, run eagerly here) such steps run there."""
    llm = make_llm(tiny_model_path, max_num_batched_tokens=1, max_num_seqs=1, enable_chunked_prefill=True,
                   long_prefill_token_threshold=1)
    llm.engine.runner.use_static_decode(1, 128, capture=False)
    completion = llm.generate(PROMPTS[0], SCORED)[0]
    check_against_reference(completion, reference, SCORED.prompt_logprobs)


def test_a_one_token_prompt_has_only_its_unscored_first_entry(tiny_model_path):
    completion = make_llm(tiny_model_path).generate([[42]], SCORED)[0]
    assert completion.prompt_logprobs == [None]
    assert len(completion.token_ids) == SCORED.max_tokens


@pytest.mark.parametrize("value", [-1, 21, 1.5])
def test_prompt_logprobs_out_of_range_are_refused(value):
    from scheduler import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
