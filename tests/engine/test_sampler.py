"""The sampler on hand-made logits: each parameter does what its name says, through torch's
draw and the C++ kernel's alike (the draws themselves: test_draws.py)."""

import math

import pytest
import torch

from cpu_draws import DRAWS, kernel_of
from engine.draws import _apply_top_k_top_p
from engine.sampler import Sampler, apply_penalties
from scheduler import Request, SamplingParams

VOCAB = 50


@pytest.fixture(params=DRAWS)
def make_sampler(request):
    kernel = kernel_of(request.param)
    return lambda: Sampler(kernel=kernel)


def make_request(request_id="r", prompt=(1, 2, 3), output=(), **params):
    request = Request(request_id, list(prompt), SamplingParams(max_tokens=100, **params))
    for token in output:
        request.append_output_token(token)
    return request


def peaked_logits(rows=1, best=7, runner_up=9):
    logits = torch.linspace(-3.0, 0.0, VOCAB).repeat(rows, 1)
    logits[:, best] = 5.0
    logits[:, runner_up] = 4.5
    return logits


def test_greedy_takes_the_argmax(make_sampler):
    tokens, logprobs = make_sampler().sample(peaked_logits(2), [make_request("a", temperature=0.0),
                                                           make_request("b", temperature=0.0)])
    assert tokens == [7, 7]
    assert logprobs == [None, None]


def test_greedy_on_bfloat16_logits_is_the_float_argmax_and_the_first_of_ties(make_sampler):
    # A greedy-only batch is sampled from the model's own dtype, with no float copy.
    logits = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # a tie: the lower id wins, as argmax gives it
    requests = [make_request(f"r{i}", temperature=0.0) for i in range(64)]
    tokens, _ = make_sampler().sample(logits, requests)
    assert tokens == logits.float().argmax(dim=-1).tolist()
    assert tokens[3] == 10
    # With a row that needs the float path in the batch, the greedy rows agree.
    requests[5] = make_request("r5", temperature=0.0, logprobs=1)
    mixed, logprobs = make_sampler().sample(logits, requests)
    assert mixed == tokens and logprobs[5].token_id == tokens[5]


def test_top_k_one_and_tiny_top_p_are_greedy(make_sampler):
    logits = peaked_logits(2)
    requests = [make_request("a", temperature=1.5, top_k=1), make_request("b", temperature=1.5, top_p=1e-6)]
    for _ in range(20):
        assert make_sampler().sample(logits, requests)[0] == [7, 7]


def test_top_k_restricts_to_the_k_best(make_sampler):
    logits = peaked_logits()
    sampler = make_sampler()
    seen = {sampler.sample(logits, [make_request(temperature=5.0, top_k=2)])[0][0] for _ in range(200)}
    assert seen == {7, 9}


def test_min_p_drops_unlikely_tokens(make_sampler):
    logits = peaked_logits()
    sampler = make_sampler()
    # min_p 0.5: only tokens at least half as likely as the best survive (7, and 9 at e^-0.5).
    seen = {sampler.sample(logits, [make_request(temperature=1.0, min_p=0.5)])[0][0] for _ in range(200)}
    assert seen == {7, 9}


def test_seeded_rows_repeat_whatever_the_batch(make_sampler):
    logits = torch.randn(3, VOCAB)
    alone = make_sampler().sample(logits[1:2], [make_request("x", temperature=1.0, seed=42)])[0]
    with_others = make_sampler().sample(logits, [make_request("a", temperature=1.0),
                                                 make_request("x", temperature=1.0, seed=42),
                                                 make_request("b", temperature=1.0, seed=1)])[0]
    assert with_others[1] == alone[0]


def test_unseeded_rows_of_one_batch_each_draw_from_the_distribution(make_sampler):
    """They share one noise draw, row by row independent: 4,000 rows of the same logits land
    on each token as often as its probability says, and rows do not copy each other."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)]).repeat(4000, 1)
    tokens, _ = make_sampler().sample(logits, [make_request(f"r{i}", temperature=1.0) for i in range(4000)])
    expected = torch.softmax(logits[0], dim=-1)[:4]
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB)[:4] / 4000
    assert torch.allclose(counts, expected, atol=0.03)  # about 4 standard errors
    assert sum(a != b for a, b in zip(tokens, tokens[1:])) > 1000


def test_a_seeded_request_continues_its_own_stream(make_sampler):
    logits = torch.zeros(1, VOCAB)  # uniform: every draw depends only on the generator
    first = make_sampler()
    second = make_sampler()
    draws_a = [first.sample(logits, [make_request("x", temperature=1.0, seed=3)])[0][0] for _ in range(8)]
    draws_b = [second.sample(logits, [make_request("x", temperature=1.0, seed=3)])[0][0] for _ in range(8)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 1, "the stream advances instead of repeating one draw"


def test_penalties_move_away_from_repeated_tokens(make_sampler):
    logits = peaked_logits()
    sampler = make_sampler()
    assert sampler.sample(logits, [make_request(temperature=0.0, output=[7], presence_penalty=1.0)])[0] == [9]
    assert sampler.sample(logits, [make_request(temperature=0.0, output=[7], frequency_penalty=1.0)])[0] == [9]
    # Repetition penalty covers the prompt too: 7 in the prompt, 5.0 / 2 < 4.5.
    assert sampler.sample(logits, [make_request(temperature=0.0, prompt=[7], repetition_penalty=2.0)])[0] == [9]
    assert sampler.sample(logits, [make_request(temperature=0.0, output=[7])])[0] == [7]


def penalized_row(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """The penalties' definition, one row at a time."""
    params = request.sampling_params
    counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=VOCAB).float()
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen[torch.tensor(request.prompt_token_ids, dtype=torch.long)] = True
        penalty = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def test_penalties_on_a_mixed_batch_are_each_rows_own_exactly():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, VOCAB, generator=generator) * 4
    requests = [
        make_request("plain", output=(7, 7, 9)),
        make_request("presence", output=(7, 7, 9), presence_penalty=0.5),
        make_request("frequency", prompt=(4,), output=(3, 3, 3, 11), frequency_penalty=-1.25),
        make_request("repetition", prompt=(1, 2, 40), output=(2, 8), repetition_penalty=1.7),
        make_request("all", prompt=(5, 5, 6), output=(6, 0, 49, 49), repetition_penalty=0.6,
                     presence_penalty=-0.3, frequency_penalty=0.9),
        make_request("no output yet", prompt=(9, 10), repetition_penalty=1.9, presence_penalty=1.0),
    ]
    got = apply_penalties(logits.clone(), requests)
    for row, request in enumerate(requests):
        expected = penalized_row(logits[row], request) if request.sampling_params.has_penalties else logits[row]
        assert torch.equal(got[row], expected), request.request_id


def test_logit_bias_moves_only_its_own_rows_tokens(make_sampler):
    logits = peaked_logits(4)
    requests = [make_request("banned", temperature=0.0, logit_bias={7: -100.0}),
                make_request("forced", temperature=0.0, logit_bias={30: 100.0}),
                make_request("plain", temperature=0.0),
                make_request("sampled", temperature=1.0, seed=3, logit_bias={7: -100.0, 9: -100.0, 12: 100.0})]
    tokens, logprobs = make_sampler().sample(logits, requests)
    assert tokens == [9, 30, 7, 12]
    assert torch.equal(logits, peaked_logits(4))  # the model's logits are left as they were
    # Logprobs are the model's own distribution's, as vLLM reports them, before any bias.
    _, (entry,) = make_sampler().sample(logits[:1], [make_request(temperature=0.0, logprobs=0, logit_bias={7: -100.0})])
    assert entry.token_id == 9
    assert math.isclose(entry.logprob, torch.log_softmax(logits[0], dim=-1)[9].item(), rel_tol=1e-6)


def test_logit_bias_is_added_before_the_penalties(make_sampler):
    logits = peaked_logits()
    # As vLLM orders them. 7 is biased to 3.0; 9 (already generated) is biased to 5.5 and then
    # halved to 2.75, so 7 wins. Penalised first, 9 would be 4.5 / 2 + 1 = 3.25, and win.
    request = make_request(temperature=0.0, output=[9], repetition_penalty=2.0, logit_bias={7: -2.0, 9: 1.0})
    assert make_sampler().sample(logits, [request])[0] == [7]


def test_logprobs_are_the_model_distribution(make_sampler):
    logits = peaked_logits()
    tokens, logprobs = make_sampler().sample(logits, [make_request(temperature=0.0, logprobs=3)])
    expected = torch.log_softmax(logits[0], dim=-1)
    entry = logprobs[0]
    assert entry.token_id == tokens[0] == 7
    assert math.isclose(entry.logprob, expected[7].item(), rel_tol=1e-6)
    assert [token for token, _ in entry.top] == expected.topk(3).indices.tolist()
    assert all(a >= b for (_, a), (_, b) in zip(entry.top, entry.top[1:]))


EXTREMES = [
    {"temperature": 1e-38}, {"temperature": 1e-6}, {"temperature": 1e-5}, {"temperature": 100.0},
    {"top_p": 1e-9}, {"top_k": 1}, {"min_p": 1.0}, {"min_p": 1.0, "temperature": 100.0},
    {"repetition_penalty": 2.0}, {"repetition_penalty": 1e-9}, {"presence_penalty": 2.0},
    {"frequency_penalty": -2.0}, {"presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 2.0},
    {"temperature": 1e-4, "top_p": 1e-9, "top_k": 3, "min_p": 0.9},
    {"top_p": 1e-50},  # 0 in float32
]


@torch.inference_mode()
def test_sampling_parameters_at_their_extremes_give_a_real_token(make_sampler):
    # Logits as large as a model's, with ties and repeated output tokens for the penalties.
    logits = peaked_logits(len(EXTREMES)) * 20.0
    requests = [make_request(f"r{i}", output=(7, 7, 9), **params) for i, params in enumerate(EXTREMES)]
    for _ in range(10):
        tokens, _ = make_sampler().sample(logits.clone(), requests)
        assert all(0 <= token < VOCAB for token in tokens)
        for params, token in zip(EXTREMES, tokens):
            if params.get("temperature", 1.0) < 1e-5 or params.get("top_p", 1.0) < 1e-6 or params.get("min_p") == 1.0:
                assert token == 7, params  # nothing but the best token may survive these


def test_a_temperature_under_the_greedy_floor_is_greedy():
    assert SamplingParams(temperature=1e-38).is_greedy
    assert SamplingParams(temperature=9.9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_top_p_by_rejection_draws_from_what_the_sort_keeps(make_sampler):
    """On a CPU top-p alone is drawn by rejection: 20,000 rows land on the tokens the GPU's sort
    keeps, as often as their renormalised probabilities say, and never elsewhere."""
    torch.manual_seed(0)
    logits = torch.linspace(0.0, -4.0, VOCAB).unsqueeze(0)
    for top_p in (0.3, 0.8):
        kept = _apply_top_k_top_p(logits, [SamplingParams(max_tokens=1, top_p=top_p)], sort=True)[0]
        expected = torch.softmax(kept, dim=-1)
        tokens, _ = make_sampler().sample(logits.repeat(20000, 1),
                                     [make_request(f"r{i}", temperature=1.0, top_p=top_p) for i in range(20000)])
        counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB) / 20000
        assert set(tokens) == set(torch.isfinite(kept).nonzero().squeeze(1).tolist())
        assert torch.allclose(counts, expected, atol=0.012)


def test_top_p_by_rejection_with_min_p_and_seeds(make_sampler):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(6)) * 2
    requests = [make_request("a", temperature=1.0, top_p=0.7, min_p=0.2, seed=11),
                make_request("b", temperature=1.0, top_p=0.5, seed=12), make_request("c", temperature=1.0)]
    first = make_sampler().sample(logits, requests)[0]
    alone = make_sampler().sample(logits[1:2], [make_request("b", temperature=1.0, top_p=0.5, seed=12)])[0]
    assert first[1] == alone[0]
    for row, (top_p, min_p) in enumerate([(0.7, 0.2), (0.5, 0.0)]):
        allowed = torch.isfinite(_apply_top_k_top_p(logits[row:row + 1], [SamplingParams(max_tokens=1, top_p=top_p)],
                                                    sort=True)[0])
        probs = torch.softmax(logits[row], dim=-1)
        allowed &= probs >= min_p * probs.max()
        sampler = make_sampler()
        asking = [make_request(f"s{i}", temperature=1.0, top_p=top_p, min_p=min_p) for i in range(300)]
        seen = {sampler.sample(logits[row:row + 1], [request])[0][0] for request in asking}
        assert seen <= set(allowed.nonzero().squeeze(1).tolist())


def test_rows_without_top_k_or_top_p_keep_every_token_beside_rows_with_them(make_sampler):
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    requests = [make_request("plain", temperature=1.0, seed=1), make_request("narrow", temperature=1.0, top_k=1)]
    alone = make_sampler().sample(logits[:1], [make_request("plain", temperature=1.0, seed=1)])[0]
    tokens = make_sampler().sample(logits, requests)[0]
    assert tokens == [alone[0], int(logits[1].argmax())]
