"""Turns one step's logits into tokens: logit bias, penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

Three draws: on a GPU by the exponential race (`draw_by_race`); on a CPU by the C++ kernel
(`draw_with_kernel`), or by torch's ops where it cannot be built (`draw_by_inverse_cdf`)."""

from dataclasses import dataclass, field
import itertools

import torch

from scheduler import Request, SamplingParams


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, best first
    rank: int | None = None  # the token's place in its distribution: 1 for the most likely


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", kernel=None):
        """`kernel`: the CPU kernels' operators (engine.cpu_kernels.load()), whose `sample_tokens`
        then draws a CPU step's rows; without it torch's ops draw them."""
        self.device = torch.device(device)
        self.kernel = kernel
        # Which draw this sampler takes, for the engine's log and the server's /version.
        if self.device.type == "cuda":
            self.path = "exponential race on the device"
        else:
            self.path = f"C++ kernel, {kernel.isa()} build" if kernel is not None else "torch, inverse CDF"
        # A seeded request draws from its own generator, so its tokens do not depend on
        # which other requests share the batch.
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [len(requests), vocab], in the model's dtype or float32."""
        return self.draw(logits, requests).to_host()

    def draw(self, logits: torch.Tensor, requests: list[Request]) -> "SampledTokens":
        """`sample` without reading anything back: the tokens (and logprobs) stay where the
        logits are, so an engine can queue the next step before this one's tokens are known."""
        params = [r.sampling_params for r in requests]
        if all(p.is_greedy and p.logprobs is None and not p.has_penalties and not p.logit_bias for p in params):
            # The common case needs no float copy of the logits: widening is exact, so the
            # largest is the same token. `max` rather than `argmax`: on CPU, argmax over
            # bfloat16 takes twice as long (both give the first of equal largest values).
            return SampledTokens(logits.max(dim=-1).indices)
        model_logits = logits  # processing below works on a copy
        biased, penalised = any(p.logit_bias for p in params), any(p.has_penalties for p in params)
        if biased or penalised:  # on a float copy: the model's own stay as they are
            logits = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if biased:
            apply_logit_bias(logits, requests)
        if penalised:
            apply_penalties(logits, requests)

        if self.kernel is not None:
            generators = [None if p.is_greedy else self._generator(r) for r, p in zip(requests, params)]
            tokens = draw_with_kernel(self.kernel, logits, params, generators)
        else:
            tokens = self._draw_with_torch(logits.float(), requests)
        sampled = SampledTokens(tokens)
        # Logprobs are reported from the model's own distribution, before any processing,
        # and computed for the rows that ask alone.
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if logprob_rows:
            asking_logits, asking_tokens = model_logits, tokens
            if len(logprob_rows) < len(requests):  # a copy of the asking rows alone
                index = to_device(logprob_rows, torch.long, logits.device)
                asking_logits, asking_tokens = model_logits[index], tokens[index]
            sampled.logprob_rows = logprob_rows
            sampled.numbers = [params[i].logprobs for i in logprob_rows]
            sampled.chosen, sampled.ranks, sampled.top_values, sampled.top_ids = model_logprobs(
                asking_logits, asking_tokens, max(sampled.numbers), self.kernel)
        return sampled

    def _draw_with_torch(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.is_greedy]
        if len(random_rows) == len(requests):
            return self._sample_random(logits, requests)
        tokens = logits.argmax(dim=-1)
        if random_rows:
            rows = to_device(random_rows, torch.long, logits.device)
            tokens[rows] = self._sample_random(logits[rows], [requests[i] for i in random_rows])
        return tokens

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        temperature = to_device([p.temperature for p in params], logits.dtype, logits.device)
        # A seeded row draws from its own generator, so its tokens do not depend on the batch.
        generators = [self._generator(request) for request in requests]
        draw = draw_by_race if logits.device.type == "cuda" else draw_by_inverse_cdf
        return draw(logits / temperature.unsqueeze(1), params, generators)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = generator
        return generator


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
    return _by_row([p.min_p for p in params], like) if any(p.min_p > 0.0 for p in params) else None


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


def uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One float64 draw in [0, 1) per row: a seeded row's from its own generator, the others
    from torch's."""
    uniform = torch.rand(len(generators), dtype=torch.float64, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(1, dtype=torch.float64, device=device, generator=generator)
    return uniform


def draw_with_kernel(kernel, logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """The CPU kernel's draw (engine/csrc/sampling.cpp): every row in one call, in the logits'
    own dtype, greedy rows by argmax, temperature and top-k applied there (top-k keeping the
    tokens tied with the k-th best, as vLLM keeps them)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    temperature = torch.tensor([0.0 if p.is_greedy else p.temperature for p in params], dtype=torch.float32)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    return kernel.sample_tokens(logits, temperature, top_k, min_p, top_p, uniforms(generators, logits.device))


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
    (the GPU's way). Without, every row must have a top-k, and its best max(top_k) + 1 tokens
    (topk) settle them all: on a CPU a sort of SmolLM2's 49k logits cost 110-130 ms for 64 rows
    (2 cores)."""
    vocab = logits.shape[-1]
    top_k_values = [min(p.top_k or vocab, vocab) for p in params]
    width = vocab if sort else min(vocab, max(top_k_values) + 1)
    if width < vocab:
        values, order = logits.topk(width, dim=-1)
    else:
        values, order = logits.sort(dim=-1, descending=True)
    top_k = to_device(top_k_values, torch.long, logits.device).unsqueeze(1)
    top_p = _by_row([p.top_p for p in params], logits).unsqueeze(1)
    ranks = torch.arange(width, device=logits.device).unsqueeze(0)
    within_k = ranks < top_k
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


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Each asking row's biases added to its tokens' logits, addressed as row * vocab + token
    over the flat logits (as the penalties are); `logits` is contiguous and changed in place."""
    vocab, keys, biases = logits.shape[-1], [], []
    for row, request in enumerate(requests):
        for token, bias in (request.sampling_params.logit_bias or {}).items():
            keys.append(row * vocab + token)
            biases.append(bias)
    logits.view(-1).index_add_(0, to_device(keys, torch.long, logits.device), _by_row(biases, logits))
    return logits


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition (over prompt and output, as in CTRL), presence and frequency (output only, as
    OpenAI), on the rows whose requests ask; `logits` is contiguous and changed in place.

    Only the entries of tokens a request has seen change, so they are addressed directly, as
    row * vocab + token over the flat logits: a dozen kernels and a few small copies for the
    whole batch, where a pass per row over the vocabulary cost a dozen kernels per row on a
    GPU, and a pass over the whole batch is bound by memory on a CPU."""
    rows = [row for row, request in enumerate(requests) if request.sampling_params.has_penalties]
    if not rows:
        return logits
    vocab, flat = logits.shape[-1], logits.view(-1)
    keys, counts = torch.unique(_token_keys(rows, [requests[row].output_token_ids for row in rows], vocab,
                                            logits.device), return_counts=True)
    repeating = [row for row in rows if requests[row].sampling_params.repetition_penalty != 1.0]
    if repeating:
        in_prompt = _token_keys(repeating, [requests[row].prompt_token_ids for row in repeating], vocab, logits.device)
        seen = torch.unique(torch.cat([in_prompt, keys]))
        # Rows without a repetition penalty have 1 here: divided or multiplied by it, exactly unchanged.
        penalty = _by_row([r.sampling_params.repetition_penalty for r in requests], logits)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    row_of = keys // vocab
    frequency = _by_row([r.sampling_params.frequency_penalty for r in requests], logits)[row_of]
    presence = _by_row([r.sampling_params.presence_penalty for r in requests], logits)[row_of]
    flat[keys] = flat[keys] - frequency * counts.to(logits.dtype) - presence
    return logits


def _token_keys(rows: list[int], token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """row * vocab + token for every token of each row's list, in one tensor on `device`."""
    flat = list(itertools.chain.from_iterable(token_lists))
    lengths = to_device([len(ids) for ids in token_lists], torch.long, device)
    # output_size given: otherwise a GPU would have to report the sum of lengths back first.
    starts = torch.repeat_interleave(to_device(rows, torch.long, device) * vocab, lengths, output_size=len(flat))
    return starts + to_device(flat, torch.long, device)


def _by_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.dtype, like.device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor from host values, copied as `copy_to_device` copies."""
    return copy_to_device(torch.tensor(values, dtype=dtype), device)


def copy_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: on a GPU through pinned memory and without a sync, so the copy
    is queued behind work already on the stream. A plain `.to(device)` (or `torch.tensor(
    values, device=...)`) waits for the whole stream, which would stall an engine that
    queues the next step before this one is read back."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def model_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, most: int,
                   kernel=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`logprob_tensors`' four for rows of the model's logits: on a CPU with the C++ kernels in
    one call over the rows in their own dtype (engine/csrc/sampling.cpp), else from torch's
    log_softmax of the rows widened to float32."""
    if kernel is not None:
        return tuple(kernel.token_logprobs(logits if logits.stride(-1) == 1 else logits.contiguous(), token_ids, most))
    return logprob_tensors(torch.log_softmax(logits.float(), dim=-1), token_ids, most)


def logprob_tensors(rows: torch.Tensor, token_ids: torch.Tensor,
                    most: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of logprobs and its token: the token's logprob, its rank (1 + how many
    tokens are likelier) and the row's `most` best, all on the device."""
    chosen = rows.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (rows > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_values, top_ids = rows.topk(most, dim=-1) if most else (rows[:, :0], rows[:, :0].long())
    return chosen, ranks, top_values, top_ids


def start_host_copy(tensors: tuple) -> tuple[tuple, "torch.cuda.Event | None"]:
    """`tensors` (None kept as None) on their way to the host, and the event marking their
    arrival: on a GPU copied into pinned host memory behind the work already queued, without
    a sync; on the CPU the tensors themselves, and no event."""
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cpu":
        return tensors, None
    host = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
        t, non_blocking=True) for t in tensors)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    return host, copied


@dataclass(slots=True)
class SampledTokens:
    """One step's samples where the logits were: the tokens, and for the rows that asked
    for logprobs (`logprob_rows`) the chosen token's logprob and the best alternatives.

    `start_copy` queues their copy to the host without waiting (on a GPU, into pinned
    memory, with an event to wait on); `to_host` waits for that copy alone, not for work
    queued behind it, and turns the values into lists."""

    token_ids: torch.Tensor  # [rows]
    logprob_rows: list[int] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)  # how many alternatives each of those rows wants
    chosen: torch.Tensor | None = None  # [len(logprob_rows)]
    ranks: torch.Tensor | None = None
    top_values: torch.Tensor | None = None  # [len(logprob_rows), max(numbers)]
    top_ids: torch.Tensor | None = None
    _host: tuple | None = None
    _copied: "torch.cuda.Event | None" = None

    def start_copy(self) -> None:
        self._host, self._copied = start_host_copy(
            (self.token_ids, self.chosen, self.ranks, self.top_values, self.top_ids))

    def to_host(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        if self._host is None:
            self.start_copy()
        if self._copied is not None:
            self._copied.synchronize()
        token_ids, chosen, ranks, top_values, top_ids = self._host
        tokens = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(tokens)
        if self.logprob_rows:
            for row, entry in zip(self.logprob_rows, token_logprobs(
                    [tokens[row] for row in self.logprob_rows], chosen, ranks, top_values, top_ids, self.numbers)):
                logprobs[row] = entry
        return tokens, logprobs


def token_logprobs(token_ids: list[int], chosen: torch.Tensor, ranks: torch.Tensor, top_values: torch.Tensor,
                   top_ids: torch.Tensor, numbers: list[int]) -> list[TokenLogprobs]:
    """`logprob_tensors`' results, read back, as one TokenLogprobs per token (with its row's
    `numbers[i]` best alternatives)."""
    return [TokenLogprobs(token_id, logprob, list(zip(ids[:number], values[:number])), rank)
            for token_id, logprob, rank, ids, values, number in zip(
                token_ids, chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), numbers)]
