"""Turns one step's logits into tokens: logit bias, penalties, structured outputs' masks,
temperature, top-k/top-p/min-p, seeds (the draws themselves in engine/draws.py), and the
logprobs of the model's own distribution."""

from dataclasses import dataclass, field
import itertools

import torch

from engine.device_copy import by_row, start_host_copy, to_device
from engine.draws import draw_by_inverse_cdf, draw_by_race, draw_with_kernel
from engine.structured_output import StructuredOutputs
from scheduler import Request


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, best first
    rank: int | None = None  # the token's place in its distribution: 1 for the most likely


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", kernel=None, structured: StructuredOutputs | None = None):
        """`kernel`: the CPU kernels' operators (engine.cpu_kernels.load()), whose `sample_tokens`
        then draws a CPU step's rows; without it torch's ops draw them. `structured`: the
        engine's grammar matchers, whose masks constrained rows get."""
        self.device = torch.device(device)
        self.kernel = kernel if self.device.type == "cpu" else None
        self.structured = structured
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
        if self.structured is not None:
            self.structured.release(request_id)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [len(requests), vocab], in the model's dtype or float32."""
        return self.draw(logits, requests).to_host()

    def draw(self, logits: torch.Tensor, requests: list[Request]) -> "SampledTokens":
        """`sample` without reading anything back: the tokens (and logprobs) stay where the
        logits are, so an engine can queue the next step before this one's tokens are known."""
        params = [r.sampling_params for r in requests]
        if self.kernel is None and all(p.is_greedy and p.logprobs is None and not p.has_penalties
                                       and not p.logit_bias and p.structured_output is None for p in params):
            # The common case needs no float copy of the logits: widening is exact, so the
            # largest is the same token. `max` rather than `argmax`: on CPU, argmax over
            # bfloat16 takes four times as long (both give the first of equal largest values).
            # The kernel below copies nothing either, and its argmax reads each row once (0.4 ms
            # for 64 rows of 49k bfloat16 logits, against max's 1.3).
            return SampledTokens(logits.max(dim=-1).indices)
        model_logits = logits  # processing below works on a copy
        biased, penalised = any(p.logit_bias for p in params), any(p.has_penalties for p in params)
        constrained = self.structured is not None and any(p.structured_output is not None for p in params)
        if biased or penalised or constrained:  # on a float copy: the model's own stay as they are
            logits = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if biased:
            apply_logit_bias(logits, requests)
        if penalised:
            apply_penalties(logits, requests)
        if constrained:
            self.structured.apply_masks(logits, requests)

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


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Each asking row's biases added to its tokens' logits, addressed as row * vocab + token
    over the flat logits (as the penalties are); `logits` is contiguous and changed in place."""
    vocab, keys, biases = logits.shape[-1], [], []
    for row, request in enumerate(requests):
        for token, bias in (request.sampling_params.logit_bias or {}).items():
            keys.append(row * vocab + token)
            biases.append(bias)
    logits.view(-1).index_add_(0, to_device(keys, torch.long, logits.device), by_row(biases, logits))
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
        penalty = by_row([r.sampling_params.repetition_penalty for r in requests], logits)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    row_of = keys // vocab
    frequency = by_row([r.sampling_params.frequency_penalty for r in requests], logits)[row_of]
    presence = by_row([r.sampling_params.presence_penalty for r in requests], logits)[row_of]
    flat[keys] = flat[keys] - frequency * counts.to(logits.dtype) - presence
    return logits


def _token_keys(rows: list[int], token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """row * vocab + token for every token of each row's list, in one tensor on `device`."""
    flat = list(itertools.chain.from_iterable(token_lists))
    lengths = to_device([len(ids) for ids in token_lists], torch.long, device)
    # output_size given: otherwise a GPU would have to report the sum of lengths back first.
    starts = torch.repeat_interleave(to_device(rows, torch.long, device) * vocab, lengths, output_size=len(flat))
    return starts + to_device(flat, torch.long, device)


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
