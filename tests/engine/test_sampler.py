"""The sampler on hand-made logits: each parameter does what its name says."""

import functools
import math

import pytest
import torch

from engine import cpu_kernels
from engine.draws import (
    _apply_top_k_top_p, draw_by_inverse_cdf, draw_by_race, draw_with_kernel, exponential_race, inverse_cdf,
)
from engine.sampler import Sampler, apply_penalties, logprob_tensors
from scheduler import Request, SamplingParams

VOCAB = 50
# The CPU's two draws: torch's ops, and the C++ kernel in each build this CPU runs.
DRAWS = ["torch", *(build.isa for build in cpu_kernels.runnable_builds())]


def kernel_of(draw: str):
    if draw == "torch":
        return None
    kernel = cpu_kernels.load(draw)
    if kernel is None:
        pytest.skip("no compiler here: the engine samples with torch's ops")
    return kernel


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


def draw_from_probs(name: str):
    """The draw `name` ("race", the GPU's, or one of DRAWS) as a function of probabilities:
    the CPU's draws take their logarithm, -inf where a token is impossible."""
    if name == "race":
        return exponential_race
    kernel = kernel_of(name)
    if kernel is None:
        return lambda probs, generators: inverse_cdf(probs.log(), generators)
    return lambda probs, generators: draw_with_kernel(
        kernel, probs.log(), [SamplingParams(max_tokens=1, temperature=1.0)] * len(probs), generators)


def draw_from_logits(name: str):
    """The draw `name` as `draw_by_race` and `draw_by_inverse_cdf` take their arguments."""
    if name == "race":
        return draw_by_race
    kernel = kernel_of(name)
    return draw_by_inverse_cdf if kernel is None else functools.partial(draw_with_kernel, kernel)


@pytest.mark.parametrize("name", ["race", *DRAWS])
def test_every_draw_follows_the_distribution_and_never_takes_an_impossible_token(name):
    """The GPU's draw (exponential race, from probabilities) and the CPU's (from logits), each
    on any host."""
    draw = draw_from_probs(name)
    torch.manual_seed(0)
    probs = torch.zeros(20000, VOCAB)
    probs[:, [1, 4, 5, 20]] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tokens = draw(probs, [None] * len(probs))
    counts = torch.bincount(tokens, minlength=VOCAB) / len(probs)
    assert set(tokens.tolist()) == {1, 4, 5, 20}
    assert torch.allclose(counts[[1, 4, 5, 20]], torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)  # ~4 std errors
    # All the mass on the first or on the last token, and a distribution that does not sum to 1.
    edges = torch.zeros(3, VOCAB)
    edges[0, 0] = edges[1, -1] = 1.0
    edges[2, [3, 7]] = torch.tensor([2e-3, 6e-3])
    for _ in range(50):
        first, last, unnormalised = draw(edges, [None] * 3).tolist()
        assert (first, last) == (0, VOCAB - 1) and unnormalised in (3, 7)


@pytest.mark.parametrize("name", ["race", *DRAWS])
def test_every_draw_takes_a_seeded_rows_draw_from_its_generator_alone(name):
    draw = draw_from_probs(name)
    probs = torch.softmax(torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1)), dim=-1)
    alone = draw(probs[2:3], [torch.Generator().manual_seed(7)])
    for _ in range(5):
        batch = draw(probs, [None, None, torch.Generator().manual_seed(7), None])
        assert batch[2] == alone[0]
    stream = torch.Generator().manual_seed(7)
    assert len({draw(probs[2:3], [stream]).item() for _ in range(20)}) > 1, "the generator advances"


@pytest.mark.parametrize("name", DRAWS)
def test_the_cpu_draws_keep_a_broken_row_inside_the_vocabulary(name):
    logits = torch.full((4, VOCAB), float("nan"))
    logits[1] = torch.randn(VOCAB)
    logits[2] = float("-inf")
    logits[3, :10] = float("inf")
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)] * 4
    tokens = draw_from_logits(name)(logits, params, [None] * 4)
    assert all(0 <= token < VOCAB for token in tokens.tolist())


def test_top_k_over_the_best_candidates_keeps_what_a_full_sort_keeps():
    """On a CPU rows with a top-k are filtered over their best max(top_k) + 1 tokens (topk),
    with their top-p among them: the same tokens survive as under the GPU's full sort."""
    vocab = 4096
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(3)) * torch.tensor([[4.0], [0.1]]).repeat(4, 1)
    settings = [{"top_k": 7}, {"top_k": 40, "top_p": 0.5}, {"top_k": 2000}, {"top_k": 3000, "top_p": 0.99}]
    params = [SamplingParams(max_tokens=1, temperature=1.0, **settings[row // 2]) for row in range(8)]
    filtered = _apply_top_k_top_p(logits, params, sort=False)
    assert torch.equal(filtered, _apply_top_k_top_p(logits, params, sort=True))
    kept = torch.isfinite(filtered).sum(dim=-1).tolist()
    assert kept[:2] == [7, 7] and kept[4:6] == [2000, 2000]
    assert kept[2] < kept[3] < 40, "top-p among the top-k: the peaked row keeps fewer than the flat one"


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


def filtered_distribution(probs: torch.Tensor, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, then min-p applied by hand to probabilities in order, best first: the
    tokens kept and their renormalised probabilities."""
    keep = torch.arange(len(probs)) < settings.get("top_k", len(probs))
    within = torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum()
    keep &= (within.cumsum(0) - within) <= settings.get("top_p", 1.0)
    keep &= probs >= settings.get("min_p", 0.0) * probs[0]
    return keep, torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum()


@pytest.mark.parametrize("name", ["race", *DRAWS])
@pytest.mark.parametrize("settings", [{"top_p": 0.6}, {"top_k": 5, "top_p": 0.9}, {"min_p": 0.3},
                                      {"top_k": 4, "min_p": 0.5}, {"top_p": 0.8, "min_p": 0.4}])
def test_the_gpus_draw_and_the_cpus_give_the_same_distribution(name, settings):
    """`draw_by_race` runs on CUDA, the kernel's draw and `draw_by_inverse_cdf` on CPUs: each is
    run here, on any host, against top-k then top-p then min-p applied by hand to the sorted
    probabilities."""
    draw = draw_from_logits(name)
    torch.manual_seed(0)
    logits = torch.linspace(1.0, -3.0, VOCAB).unsqueeze(0)
    keep, expected = filtered_distribution(torch.softmax(logits[0], dim=-1), settings)
    params = [SamplingParams(max_tokens=1, temperature=1.0, **settings)] * 20000
    tokens = draw(logits.repeat(20000, 1), params, [None] * 20000)
    assert set(tokens.tolist()) == set(keep.nonzero().squeeze(1).tolist())
    assert torch.allclose(torch.bincount(tokens, minlength=VOCAB) / 20000, expected, atol=0.012)


@pytest.mark.parametrize("name", ["race", *DRAWS])
@pytest.mark.parametrize("settings", [{"top_p": 0.6}, {"top_k": 300, "top_p": 0.9}, {"min_p": 0.3},
                                      {"top_k": 700, "min_p": 0.2}, {"top_p": 0.8, "min_p": 0.4}])
def test_every_draw_keeps_the_same_tokens_across_a_long_vocabulary(name, settings):
    """The same over 1,000 tokens: the kernel's partial sums (256 tokens each) and top-p's
    rising floor cross blocks. 10,000 rows land on each twentieth of the vocabulary as often as
    its share says, and never outside what the rules keep."""
    draw = draw_from_logits(name)
    torch.manual_seed(0)
    logits = torch.linspace(2.0, -4.0, 1000).unsqueeze(0)
    keep, expected = filtered_distribution(torch.softmax(logits[0], dim=-1), settings)
    params = [SamplingParams(max_tokens=1, temperature=1.0, **settings)] * 10000
    tokens = draw(logits.repeat(10000, 1), params, [None] * 10000)
    assert set(tokens.tolist()) <= set(keep.nonzero().squeeze(1).tolist())
    counts = torch.bincount(tokens, minlength=1000).view(20, 50).sum(dim=-1) / 10000
    assert torch.allclose(counts, expected.view(20, 50).sum(dim=-1), atol=0.015)


@pytest.mark.parametrize("name", ["race", *DRAWS])
def test_every_draws_top_k_keeps_the_tokens_tied_with_the_kth_best(name):
    """Top-k keeps every token tied with the k-th best, as vLLM keeps them (a bfloat16 model's
    logits tie often), on the GPU's draw and both of the CPU's alike."""
    logits = torch.full((200, VOCAB), -2.0)
    logits[:, 0], logits[:, [3, 8, 40]] = 5.0, 4.5
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=2)] * 200
    assert set(draw_from_logits(name)(logits, params, [None] * 200).tolist()) == {0, 3, 8, 40}


KERNELS = DRAWS[1:]


@pytest.mark.parametrize("isa", KERNELS)
@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1.0), (torch.bfloat16, 0.5), (torch.float16, 1.7)])
def test_the_kernel_draws_each_stretch_of_a_long_vocabulary_as_often_as_its_mass(isa, dtype, temperature):
    """A vocabulary of many partial sums (the kernel's blocks are 256 tokens), the last one
    short: 10,000 rows land on each tenth of it as often as softmax(logits / temperature) says,
    in the model's own dtype."""
    torch.manual_seed(0)
    logits = (torch.randn(1000) * 1.5).to(dtype)
    expected = torch.softmax(logits.float() / temperature, dim=-1).view(10, 100).sum(dim=-1)
    params = [SamplingParams(max_tokens=1, temperature=temperature)] * 10000
    tokens = draw_with_kernel(kernel_of(isa), logits.repeat(10000, 1), params, [None] * 10000)
    counts = torch.bincount(tokens, minlength=1000).view(10, 100).sum(dim=-1) / 10000
    assert torch.allclose(counts, expected, atol=0.015)  # ~4 standard errors


@pytest.mark.parametrize("isa", KERNELS)
def test_the_kernel_draws_tokens_at_the_edges_of_its_blocks(isa):
    probs = torch.zeros(3, 1000)
    probs[0, [255, 256]] = torch.tensor([0.25, 0.75])  # the last of one block, the first of the next
    probs[1, 999] = 1.0  # the last token of a short last block
    probs[2, [0, 511, 512, 998]] = 0.25
    seen = [set(), set(), set()]
    for _ in range(100):
        for row, token in enumerate(draw_from_probs(isa)(probs, [None] * 3).tolist()):
            seen[row].add(token)
    assert seen == [{255, 256}, {999}, {0, 511, 512, 998}]


@pytest.mark.parametrize("isa", KERNELS)
@pytest.mark.parametrize("order", ["random", "ascending"])  # ascending: every logit enters the kernel's heap
def test_the_kernels_top_k_keeps_exactly_the_tokens_at_or_above_the_kth_best(isa, order):
    logits = (torch.randn(1000, generator=torch.Generator().manual_seed(8)) * 2).to(torch.bfloat16)
    if order == "ascending":
        logits = logits.sort().values
    for k in (1, 7, 64, 65, 300, 999):
        kept = set((logits >= logits.topk(k).values[-1]).nonzero().squeeze(1).tolist())
        params = [SamplingParams(max_tokens=1, temperature=100.0, top_k=k)] * 4000  # near uniform over the kept
        tokens = draw_with_kernel(kernel_of(isa), logits.repeat(4000, 1), params, [None] * 4000)
        drawn = set(tokens.tolist())
        assert drawn == kept if k <= 300 else drawn <= kept and len(drawn) > 900, k


@pytest.mark.parametrize("isa", KERNELS)
def test_the_kernel_takes_greedy_rows_beside_drawn_ones_by_argmax(isa):
    logits = torch.randn(64, 4096, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    logits[4, 100] = logits[4, 200] = logits[4].max() + 1  # a tie: the lower id, as argmax gives it
    params = [SamplingParams(max_tokens=1, temperature=0.0 if row % 2 == 0 else 1.0) for row in range(64)]
    tokens = draw_with_kernel(kernel_of(isa), logits, params, [None] * 64)
    assert tokens[::2].tolist() == logits[::2].float().argmax(dim=-1).tolist()
    assert tokens[4] == 100
    assert (tokens[1::2] != logits[1::2].float().argmax(dim=-1)).any(), "the other rows are drawn"


@pytest.mark.parametrize("isa", KERNELS)
def test_the_kernel_refuses_malformed_arguments_with_a_clear_error(isa):
    kernel, logits, row, top_k = kernel_of(isa), torch.randn(2, VOCAB), torch.ones(2), torch.zeros(2, dtype=torch.long)
    uniform = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="one value per row"):
        kernel.sample_tokens(logits, torch.ones(3), top_k, row * 0, row, uniform)
    with pytest.raises(RuntimeError, match="top_k must be a contiguous Long"):
        kernel.sample_tokens(logits, row, row, row * 0, row, uniform)
    with pytest.raises(RuntimeError, match="uniform in"):
        kernel.sample_tokens(logits, row, top_k, row * 0, row, uniform + 1.0)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        kernel.sample_tokens(logits.t(), row, top_k, row * 0, row, uniform)


@pytest.mark.parametrize("isa", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernels_logprobs_are_the_log_softmax_of_the_model_rows(isa, dtype):
    """Against torch's log_softmax of the widened rows: a vocabulary of several partial sums and
    stretches, tokens of every rank, ties among the best (the lower id first), and asking for
    no alternatives or for the whole vocabulary."""
    logits = (torch.randn(6, 1000, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    logits[2, [40, 700, 999]] = logits[2].max() + 1  # a three-way tie for the best
    expected_rows = torch.log_softmax(logits.float(), dim=-1)
    tokens = torch.tensor([0, 999, 700, int(expected_rows[3].argmin()), int(expected_rows[4].argmax()), 500])
    for most in (0, 5, 1000):
        chosen, ranks, top_values, top_ids = kernel_of(isa).token_logprobs(logits, tokens, most)
        expected = logprob_tensors(expected_rows, tokens, most)
        assert torch.allclose(chosen, expected[0], atol=1e-5) and torch.equal(ranks, expected[1])
        assert torch.allclose(top_values, expected[2], atol=1e-5)
        order = torch.sort(-expected_rows, dim=-1, stable=True).indices[:, :most]  # best first, lower id first
        assert torch.equal(top_ids, order)
    assert ranks[4] == 1 and ranks[3] >= 990
    assert top_ids[2, :3].tolist() == [40, 700, 999]


@pytest.mark.parametrize("isa", KERNELS)
def test_the_kernels_logprobs_refuse_a_token_outside_the_vocabulary(isa):
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernel_of(isa).token_logprobs(torch.randn(2, VOCAB), torch.tensor([3, VOCAB]), 2)
    with pytest.raises(RuntimeError, match="most must be"):
        kernel_of(isa).token_logprobs(torch.randn(2, VOCAB), torch.tensor([3, 4]), VOCAB + 1)
