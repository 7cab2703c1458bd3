"""Prompt logprobs: how likely the model found each prompt token after the tokens before it.

vLLM's `prompt_logprobs`, and what `echo` with `logprobs` returns: scoring a text (the
loglikelihood tasks of lm-eval-harness) needs every prompt token's logprob. A prompt row's
hidden state predicts the next prompt token, so the rows of a prompt chunk are scored
against the tokens one ahead of them; the prompt's first token has nothing before it and
no logprob. The last prompt row predicts the first output token instead, and is sampled.
"""

from dataclasses import dataclass

import numpy as np
import torch

from engine.device_copy import copy_to_device, start_host_copy
from engine.sampler import TokenLogprobs, model_logprobs, token_logprobs
from scheduler import ScheduledRequest

# Prompt rows turned into logits at once: each is a float32 row over the whole vocabulary
# (49,152 entries for SmolLM2, 128,256 for Llama 3), so a long chunk is scored a slice at a
# time rather than through one chunk-by-vocabulary tensor.
ROWS_PER_SLICE = 256


@dataclass(slots=True)
class PromptSpan:
    """One scheduled request's prompt rows to score: the step's hidden rows `row_start`,
    `row_start + 1`, ... predict its prompt tokens `first_index`, `first_index + 1`, ..., whose
    ids are `targets`; `number` is how many alternatives it wants for each."""

    request_id: str
    first_index: int
    row_start: int
    targets: list[int]
    number: int


def prompt_spans(order: list[ScheduledRequest], query_start_loc: np.ndarray) -> list[PromptSpan]:
    """The spans of a step whose i-th request's rows start at `query_start_loc[i]`: the rows
    of requests that ask for prompt logprobs and whose next token is still a prompt token.

    A request recomputed after a preemption is not scored again once it has its first token
    (its scores went with it); preempted before, it is, and the engine keeps the first score
    of each token."""
    spans = []
    for scheduled, row_start in zip(order, query_start_loc.tolist()):
        request = scheduled.request
        number = request.sampling_params.prompt_logprobs
        if number is None or request.output_token_ids:
            continue
        start = scheduled.start_position
        end = min(start + scheduled.num_new_tokens, request.num_prompt_tokens - 1)
        if end > start:
            spans.append(PromptSpan(request.request_id, start + 1, row_start,
                                    request.prompt_token_ids[start + 1:end + 1], number))
    return spans


@dataclass(slots=True)
class PromptLogprobs:
    """A step's prompt scores where the hidden states were, and their way back to the host
    (as `SampledTokens`: queued without a sync, waited for alone)."""

    spans: list[PromptSpan]
    tensors: tuple  # chosen logprobs, ranks, top values, top ids: one row per scored token
    _host: tuple | None = None
    _copied: "torch.cuda.Event | None" = None

    def start_copy(self) -> None:
        self._host, self._copied = start_host_copy(self.tensors)

    def to_host(self) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """request id -> (the prompt index of its first scored token, one entry per token)."""
        if self._host is None:
            self.start_copy()
        if self._copied is not None:
            self._copied.synchronize()
        chosen, ranks, top_values, top_ids = self._host
        targets = [token for span in self.spans for token in span.targets]
        numbers = [span.number for span in self.spans for _ in span.targets]
        entries = token_logprobs(targets, chosen, ranks, top_values, top_ids, numbers)
        result, start = {}, 0
        for span in self.spans:
            result[span.request_id] = (span.first_index, entries[start:start + len(span.targets)])
            start += len(span.targets)
        return result


def score_prompts(model: torch.nn.Module, hidden: torch.Tensor, spans: list[PromptSpan],
                  kernel=None) -> PromptLogprobs:
    """Each span's rows of `hidden` turned into logprobs (in float32, from the model's own
    logits: no bias or penalty applies to a prompt) and read at the tokens they predict; by
    the CPU kernel where `kernel` is given (as `model_logprobs` takes it)."""
    rows = torch.from_numpy(np.concatenate([np.arange(s.row_start, s.row_start + len(s.targets)) for s in spans]))
    rows = copy_to_device(rows, hidden.device)
    targets = copy_to_device(torch.tensor([token for span in spans for token in span.targets]), hidden.device)
    most = max(span.number for span in spans)
    pieces = []
    for start in range(0, len(rows), ROWS_PER_SLICE):
        logits = model.compute_logits(hidden[rows[start:start + ROWS_PER_SLICE]])
        pieces.append(model_logprobs(logits, targets[start:start + ROWS_PER_SLICE], most, kernel))
    return PromptLogprobs(spans, tuple(torch.cat(parts) for parts in zip(*pieces)))
