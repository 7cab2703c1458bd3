"""From a step's processed logits to tokens: the three draws.

On a GPU the exponential race (`draw_by_race`): top-k and top-p by a sort, nothing read back.
On a CPU one call of the C++ kernel (`draw_with_kernel`), or torch's inverse CDF
(`draw_by_inverse_cdf`) where the kernel cannot be built. Every draw takes a seeded row's
randomness from its own generator alone, so its tokens do not depend on the batch.
"""

import torch

from engine.device_copy import by_row, to_device
from scheduler import SamplingParams


def draw_with_kernel(kernel, logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """The CPU kernel's draw (engine/csrc/sampling.cpp): every row in one call, in the logits'
    own dtype, greedy rows by argmax; temperature, top-k, min-p and top-p applied there, as the
    torch draws apply them."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    temperature = torch.tensor([0.0 if p.is_greedy else p.temperature for p in params], dtype=torch.float32)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    return kernel.sample_tokens(logits, temperature, top_k, min_p, top_p, uniforms(generators, logits.device))


def uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One float64 draw in [0, 1) per row: a seeded row's from its own generator, the others
    from torch's."""
    uniform = torch.rand(len(generators), dtype=torch.float64, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(1, dtype=torch.float64, device=device, generator=generator)
    return uniform


def draw_by_race(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> torch.Tensor:
    """The GPU's draw, nothing read back: top-k and top-p by a sort of each asking row, min-p on
    the probabilities, then the exponential race. `logits` are already divided by temperature."""
    logits = _filter_rows(logits, params, [row for row, p in enumerate(params) if p.top_k or p.top_p < 1.0],
                          sort=True)
    probs = torch.softmax(logits, dim=-1)
    min_p = _min_p(params, probs)
    if min_p is not None:
        probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1), 0.0)
    return exponential_race(probs, generators)


def draw_by_inverse_cdf(logits: torch.Tensor, params: list[SamplingParams],
                        generators: list[torch.Generator | None]) -> torch.Tensor:
    """The CPU's draw, where a sort of the vocabulary and exponential noise are slow (see
    `inverse_cdf`): top-k by topk, the inverse CDF, and top-p alone by rejection
    (`redraw_outside_top_p`). `logits` are already divided by temperature."""
    logits = _filter_rows(logits, params, [row for row, p in enumerate(params) if p.top_k], sort=False)
    min_p = _min_p(params, logits)
    tokens = inverse_cdf(logits, generators, min_p)
    nucleus = [row for row, p in enumerate(params) if not p.top_k and p.top_p < 1.0]
    if nucleus:
        redraw_outside_top_p(tokens, logits, generators, min_p, nucleus, [params[row].top_p for row in nucleus])
    return tokens


def _filter_rows(logits: torch.Tensor, params: list[SamplingParams], rows: list[int], sort: bool) -> torch.Tensor:
    """`logits` with `rows`' top-k and top-p applied (`_apply_top_k_top_p`), the others as they are
    (in place, where not every row asks)."""
    if len(rows) == len(params):
        return _apply_top_k_top_p(logits, params, sort)
    if rows:
        index = to_device(rows, torch.long, logits.device)
        logits[index] = _apply_top_k_top_p(logits[index], [params[row] for row in rows], sort)
    return logits


def _min_p(params: list[SamplingParams], like: torch.Tensor) -> torch.Tensor | None:
    return by_row([p.min_p for p in params], like) if any(p.min_p > 0.0 for p in params) else None


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` [rows, vocab], drawn as argmax(p / E) with E ~ Exp(1): one
    noise value per entry, a few elementwise kernels and no copy to the host, for the GPU.
    Unseeded rows share one draw; a row with a generator draws its own noise from it."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def inverse_cdf(logits: torch.Tensor, generators: list[torch.Generator | None],
                min_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab]: the first whose running sum of weights
    exp(logit - max) passes one uniform draw per row times the total, for the CPU. There torch
    draws exponential noise one value at a time (59 ms for 64 rows of a 49k vocabulary, where
    this takes under a fifth of that: BENCHMARKS.md, session 16). Summed in float64: a float32
    sum of 49k terms would round away the unlikeliest tokens' shares. `min_p` drops tokens
    weighing less than that fraction of the best (whose weight is 1). A token of weight 0 spans
    no width and is never drawn."""
    weights = _weights(logits)
    if min_p is not None:
        weights.masked_fill_(weights < min_p.unsqueeze(1), 0.0)
    cdf = weights.cumsum_(dim=-1)
    total = cdf[:, -1:]
    uniform = uniforms(generators, logits.device).unsqueeze(1)
    # Kept below the total even where rounding would reach it, so the search always lands on a
    # token that adds weight.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    # A row of NaN (a broken model) finds no place: it still gets a token id of the vocabulary.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)


def redraw_outside_top_p(tokens: torch.Tensor, logits: torch.Tensor, generators: list[torch.Generator | None],
                         min_p: torch.Tensor | None, rows: list[int], top_p: list[float]) -> None:
    """Top-p by rejection, for the CPU: `tokens` (drawn by `inverse_cdf` from `logits`) stand
    where the tokens likelier than them weigh at most top_p of their row; a row whose token does
    not drops every token no likelier than it and draws again, until one stands. What stands is
    distributed as top-p's renormalised distribution, and each draw stands with probability at
    least top_p, so a row takes 1/top_p draws on average, each two passes over the vocabulary,
    where sorting SmolLM2's 49k logits cost 110-130 ms for 64 rows (2 cores)."""
    index = to_device(rows, torch.long, logits.device)
    candidates = logits[index]  # a copy, losing tokens as draws are refused
    weights = _weights(candidates)
    limit = to_device(top_p, torch.float64, logits.device) * weights.sum(dim=-1)
    chosen = tokens[index]
    pending = torch.arange(len(rows), device=logits.device)
    while len(pending):
        drawn = candidates[pending].gather(1, chosen[pending].unsqueeze(1))
        likelier = weights[pending].masked_fill_(candidates[pending] <= drawn, 0.0).sum(dim=-1)
        refused = likelier > limit[pending]
        pending, drawn = pending[refused], drawn[refused]
        if not len(pending):
            break
        candidates[pending] = candidates[pending].masked_fill_(candidates[pending] <= drawn, float("-inf"))
        chosen[pending] = inverse_cdf(candidates[pending], [generators[rows[i]] for i in pending.tolist()],
                                      None if min_p is None else min_p[index[pending]])
    tokens[index] = chosen


def _weights(logits: torch.Tensor) -> torch.Tensor:
    """exp(logit - row max) in float64: a new tensor, worked on in place (each further 25 MB
    tensor of a 64-row step would cost its page faults again)."""
    weights = logits.double()
    return weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], sort: bool) -> torch.Tensor:
    """`logits` with each row's tokens outside its top-k, then outside its top-p, at -inf.

    Both rules are decided over a row's best tokens in order: with `sort`, the whole sorted row
    (the GPU's way). Without, every row must have a top-k, and its best tokens down to the last
    tied with its k-th (topk) settle them all: on a CPU a sort of SmolLM2's 49k logits cost
    110-130 ms for 64 rows (2 cores)."""
    vocab = logits.shape[-1]
    top_k = to_device([min(p.top_k or vocab, vocab) for p in params], torch.long, logits.device).unsqueeze(1)
    if sort:
        values, order = logits.sort(dim=-1, descending=True)
    else:  # the best max(top_k) settle each row's k-th; then as many as are at or above it
        kth = logits.topk(int(top_k.max()), dim=-1).values.gather(1, top_k - 1)
        width = min(vocab, int((logits >= kth).sum(dim=-1).max()) + 1)
        values, order = logits.topk(width, dim=-1) if width < vocab else logits.sort(dim=-1, descending=True)
    width = values.shape[-1]
    top_p = by_row([p.top_p for p in params], logits).unsqueeze(1)
    ranks = torch.arange(width, device=logits.device).unsqueeze(0)
    # Tokens tied with the k-th best are kept too, as vLLM keeps them (a bfloat16 model's
    # logits tie often); the CPU kernel's floor keeps the same.
    within_k = values >= values.gather(1, top_k - 1)
    values = values.masked_fill(~within_k, float("-inf"))
    probs = torch.softmax(values, dim=-1)  # top-p's shares are of what top-k left
    mass_before = probs.cumsum(dim=-1) - probs
    # The most likely token is always kept, whatever top_p says; top_p 1 keeps every token,
    # even where rounding lifts the running sum past 1.
    kept = within_k & ((mass_before <= top_p) | (ranks == 0) | (top_p >= 1.0))
    filtered = values.masked_fill(~kept, float("-inf"))
    if width == vocab:
        return torch.empty_like(logits).scatter_(-1, order, filtered)
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, filtered)
