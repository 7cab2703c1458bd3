"""Turns one step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds, logprobs."""

from dataclasses import dataclass
import itertools

import torch

from scheduler import Request, SamplingParams


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, best first


class Sampler:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # A seeded request draws from its own generator, so its tokens do not depend on
        # which other requests share the batch.
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [len(requests), vocab], in the model's dtype or float32."""
        params = [r.sampling_params for r in requests]
        if all(p.is_greedy and p.logprobs is None and not p.has_penalties for p in params):
            # The common case needs no float copy of the logits: widening is exact, so the
            # largest is the same token. `max` rather than `argmax`: on CPU, argmax over
            # bfloat16 takes twice as long (both give the first of equal largest values).
            return logits.max(dim=-1).indices.tolist(), [None] * len(params)
        logits = logits.float()
        # Logprobs are reported from the model's own distribution, before any processing,
        # and computed for the rows that ask alone.
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits.clone(memory_format=torch.contiguous_format), requests)

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            chosen = self._sample_random(logits[rows], [requests[i] for i in random_rows])
            tokens[rows] = chosen
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        if logprob_rows:
            chosen = [token_list[i] for i in logprob_rows]
            numbers = [params[i].logprobs for i in logprob_rows]
            for i, token_logprobs in zip(logprob_rows, _token_logprobs(raw_logprobs, chosen, numbers)):
                logprobs[i] = token_logprobs
        return token_list, logprobs

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperature.unsqueeze(1)
        if any(p.top_k or p.top_p < 1.0 for p in params):
            logits = _apply_top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=logits.device)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with no copy to the host.
        # Unseeded rows share one draw (one kernel, not one per row); a seeded row draws from
        # its own generator, so its tokens do not depend on the batch.
        noise = torch.empty_like(probs).exponential_()
        for row, request in enumerate(requests):
            if request.sampling_params.seed is not None:
                noise[row].exponential_(generator=self._generator(request))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = generator
        return generator


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # The most likely token is always kept, whatever top_p says.
    drop = (mass_before > top_p.unsqueeze(1)) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


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
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    lengths = torch.tensor([len(ids) for ids in token_lists], device=device)
    return torch.repeat_interleave(torch.tensor(rows, device=device) * vocab, lengths) + tokens


def _by_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _token_logprobs(rows: torch.Tensor, token_ids: list[int], numbers: list[int]) -> list[TokenLogprobs]:
    """Each row's sampled token and its `numbers[i]` best, read back in one copy per kind."""
    index = torch.tensor(token_ids, device=rows.device).unsqueeze(1)
    chosen = rows.gather(1, index).squeeze(1).tolist()
    most = max(numbers)
    top_values, top_ids = rows.topk(most, dim=-1) if most else (rows[:, :0], rows[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprobs(token_id, logprob, list(zip(ids[:number], values[:number])))
            for token_id, logprob, ids, values, number in zip(token_ids, chosen, top_ids, top_values, numbers)]
