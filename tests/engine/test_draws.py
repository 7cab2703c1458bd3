"""The three draws from processed logits to tokens (engine/draws.py), each on any host: the
GPU's exponential race, torch's inverse CDF and the C++ kernel in every build this CPU runs,
against the distributions top-k, top-p and min-p define; and the kernel's own edges, its
logprobs and its refusals."""

import functools

import pytest
import torch

from cpu_draws import DRAWS, kernel_of
from engine.draws import (
    _apply_top_k_top_p, draw_by_inverse_cdf, draw_by_race, draw_with_kernel, exponential_race, inverse_cdf,
)
from engine.sampler import logprob_tensors
from scheduler import SamplingParams

VOCAB = 50


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
    """On a CPU rows with a top-k are filtered over their best tokens down to the last tied
    with the k-th (topk), with their top-p among them: the same tokens survive as under the
    GPU's full sort."""
    vocab = 4096
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(3)) * torch.tensor([[4.0], [0.1]]).repeat(4, 1)
    settings = [{"top_k": 7}, {"top_k": 40, "top_p": 0.5}, {"top_k": 2000}, {"top_k": 3000, "top_p": 0.99}]
    params = [SamplingParams(max_tokens=1, temperature=1.0, **settings[row // 2]) for row in range(8)]
    filtered = _apply_top_k_top_p(logits, params, sort=False)
    assert torch.equal(filtered, _apply_top_k_top_p(logits, params, sort=True))
    kept = torch.isfinite(filtered).sum(dim=-1).tolist()
    assert kept[:2] == [7, 7] and kept[4:6] == [2000, 2000]
    assert kept[2] < kept[3] < 40, "top-p among the top-k: the peaked row keeps fewer than the flat one"


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


KERNELS = DRAWS[1:]  # the kernel's builds


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
