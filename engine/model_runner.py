"""Runs one scheduled step: builds the flat batch, runs the model, samples."""

from dataclasses import dataclass, field
import importlib

import numpy as np
import torch

from engine import cpu_kernels
from engine.attention import (
    AttentionMetadata, DecodeGroup, FlatBatch, PagedBatch, PrefillSpan, context_slots, num_kv_splits,
    select_backend,
)
from engine.cuda_graphs import StaticDecodeRunner
from engine.device_copy import copy_to_device
from engine.input_batch import InputBatch, known_token, step_positions
from engine.model import LlamaForCausalLM
from engine.prompt_logprobs import PromptLogprobs, PromptSpan, prompt_spans, score_prompts
from engine.sampler import SampledTokens, Sampler, TokenLogprobs
from engine.structured_output import StructuredOutputs
from scheduler import Request, ScheduledRequest, SchedulerOutput


# Short contexts are grouped together regardless of ratio: an extra attention call per
# layer costs more than reading a few dozen padded slots.
MIN_DECODE_GROUP_CONTEXT = 128


@dataclass(slots=True)
class StepResult:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> (prompt index of the first token scored, an entry per token scored)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: what it will sample, for whom, read back by `collect`."""

    requests: list[Request] = field(default_factory=list)  # the sampling rows' requests, in row order
    sampled: SampledTokens | None = None
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that sample
    sampling: list[ScheduledRequest]  # the requests those rows belong to, in the same order
    prompt_spans: list[PromptSpan] = field(default_factory=list)  # prompt rows to score (prompt_logprobs)


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    args = model.args
    element_size = torch.empty((), dtype=dtype).element_size()
    return args.num_layers * 2 * block_size * args.num_kv_heads * args.head_dim * element_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 attention_backend: str = "auto", num_host_blocks: int = 0, kv_cache_dtype: torch.dtype | None = None,
                 structured: StructuredOutputs | None = None):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.kv_cache_dtype = kv_cache_dtype or self.dtype
        args = model.args
        # One tensor for every layer's keys and values. Zeroed, not empty: padded decode
        # lanes read slots that are masked out, and 0 * NaN from stale memory is still NaN.
        # One block more than the scheduler's pool: the scratch block that padding rows of
        # static decode steps write into (engine/cuda_graphs.py), never given to a request.
        self.kv_caches = torch.zeros(
            args.num_layers, 2, (num_blocks + 1) * block_size, args.num_kv_heads, args.head_dim,
            dtype=self.kv_cache_dtype, device=device,
        )
        # The swap pool: preempted requests' blocks, in host memory (pinned, so copies to and
        # from a GPU run at full bandwidth). Empty, not zeroed: a host block is always written
        # by a swap-out before a swap-in reads it, so untouched pages cost no memory.
        self.host_kv_caches = torch.empty(
            args.num_layers, 2, num_host_blocks * block_size, args.num_kv_heads, args.head_dim,
            dtype=self.kv_cache_dtype, device="cpu", pin_memory=device.type == "cuda" and num_host_blocks > 0,
        )
        # Built (or found in the cache) now, not in the middle of the first step.
        kernels = cpu_kernels.load() if device.type == "cpu" else None
        self.sampler = Sampler(device, kernels, structured)
        self.attention_backend = select_backend(attention_backend, device, self.kv_cache_dtype)
        self.cpu_kernel = kernels if self.attention_backend == "cpu-kernel" else None
        self.triton_kernels = (importlib.import_module("engine.triton_attention")
                               if self.attention_backend == "triton" else None)
        self.attention_path = {"torch": "torch, gathered groups", "triton": "triton, one launch per layer"}.get(
            self.attention_backend) or f"C++ kernel, {self.cpu_kernel.isa()} build"
        self.static_decode: StaticDecodeRunner | None = None
        self.batch = InputBatch(block_size)
        # The last launched step's sampled tokens on the device, and the request of each of
        # their rows: under async scheduling the next step is built before they are read
        # back, and a decode whose input is one of them takes it from here (`_pending_input_ids`).
        self._last_sampled: torch.Tensor | None = None
        self._last_sampled_requests: list[Request] = []

    def forget(self, request_id: str, preempted: bool = False) -> None:
        """`request_id` finished, or was preempted: its row goes (its blocks will change). A
        preempted request keeps its sampler state, so a seeded one draws on where it left off."""
        self.batch.forget(request_id)
        if not preempted:
            self.sampler.release(request_id)

    def swap_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        swap_blocks(self.kv_caches, self.host_kv_caches, self.block_size, swap_out, swap_in)

    def use_static_decode(self, max_batch: int, max_context: int, capture: bool,
                          batch_sizes: tuple[int, ...] | None = None) -> None:
        """Pad pure-decode steps to static shapes (`batch_sizes` rows, default powers of two);
        with `capture`, replay them as CUDA graphs."""
        self.static_decode = StaticDecodeRunner(
            self.model, self.kv_caches, self.block_size, max_batch, max_context, capture, batch_sizes,
            self.triton_kernels, self.batch)

    def execute(self, output: SchedulerOutput) -> StepResult:
        return self.collect(self.launch(output))

    @torch.inference_mode()
    def launch(self, output: SchedulerOutput) -> LaunchedStep:
        """Queue the step's model run and sampling on the device, and the copy of its tokens
        back; on a GPU this returns before the step has run."""
        static_key = self.static_decode.bucket(output.scheduled) if self.static_decode is not None else None
        if static_key is None:
            batch = self.prepare(output)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            logits_indices, sampling, spans = batch.logits_indices, batch.sampling, batch.prompt_spans
        else:
            # The eager path's row order, so the sampler sees the requests in the same order.
            decodes = sorted(output.scheduled, key=lambda s: s.start_position)
            hidden = self.static_decode.run(decodes, static_key, self._pending_input_ids(decodes))
            sampling = [s for s in decodes if s.samples]
            logits_indices = self._tensor([row for row, s in enumerate(decodes) if s.samples])
            spans = prompt_spans(decodes, np.arange(len(decodes)))  # a one-token prompt chunk may be here
        launched = LaunchedStep([s.request for s in sampling])
        if spans:
            launched.prompt_logprobs = score_prompts(self.model, hidden, spans, self.sampler.kernel)
            launched.prompt_logprobs.start_copy()
        if not sampling:
            return launched
        logits = self.model.compute_logits(hidden[logits_indices])
        launched.sampled = self.sampler.draw(logits, launched.requests)
        launched.sampled.start_copy()
        self._last_sampled, self._last_sampled_requests = launched.sampled.token_ids, launched.requests
        return launched

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens and read them (and any logprobs) back."""
        result = StepResult()
        if launched.prompt_logprobs is not None:
            result.prompt_logprobs = launched.prompt_logprobs.to_host()
        if launched.sampled is None:
            return result
        tokens, logprobs = launched.sampled.to_host()
        for request, token, token_logprobs in zip(launched.requests, tokens, logprobs):
            result.sampled_token_ids[request.request_id] = token
            if token_logprobs is not None:
                result.logprobs[request.request_id] = token_logprobs
        return result

    def _pending_input_ids(self, order: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of the step's input ids, their values on the device) for the decodes whose
        input token was sampled by the step still in flight, or None when every input is known."""
        rows = [row for row, scheduled in enumerate(order) if scheduled.start_position >= scheduled.request.num_tokens]
        if not rows:
            return None
        # Built only here: a synchronous engine, every step read back, never gets this far.
        sampled_row = {request.request_id: row for row, request in enumerate(self._last_sampled_requests)}
        sources = [sampled_row[order[row].request.request_id] for row in rows]
        return self._tensor(rows), self._last_sampled[self._tensor(sources)]

    def prepare(self, output: SchedulerOutput) -> ModelInput:
        # Decodes first, shortest context first (the torch path groups similar lengths as
        # contiguous rows; the CPU kernel starts from the longest), then prompt chunks.
        decodes = sorted((s for s in output.scheduled if s.num_new_tokens == 1), key=lambda s: s.start_position)
        chunks = [s for s in output.scheduled if s.num_new_tokens > 1]
        order = decodes + chunks
        rows = self.batch.rows(order)
        starts = np.fromiter((s.start_position for s in order), dtype=np.int64, count=len(order))
        num_new = np.fromiter((s.num_new_tokens for s in order), dtype=np.int64, count=len(order))
        query_start_loc, sequence, positions = step_positions(starts, num_new)
        input_ids = [known_token(s) for s in decodes]
        for scheduled in chunks:
            start = scheduled.start_position
            input_ids.extend(scheduled.request.all_token_ids[start:start + scheduled.num_new_tokens])
        samples = np.fromiter((s.samples for s in order), dtype=bool, count=len(order))

        meta = AttentionMetadata(slot_mapping=self._to_device(self.batch.slot_mapping(rows[sequence], positions)),
                                 decode_groups=[], prefills=[])
        if self.triton_kernels is not None:
            meta.flat = self._flat_batch(rows, starts + num_new, query_start_loc, int(num_new.max()))
        elif self.cpu_kernel is not None:
            meta.paged = PagedBatch(*self._sequences(rows, starts + num_new, query_start_loc), self.block_size,
                                    self.cpu_kernel)
        else:
            meta.prefills = [self._prefill_span(s, int(query_start_loc[len(decodes) + i]),
                                                int(query_start_loc[len(decodes) + i + 1]))
                             for i, s in enumerate(chunks)]
            meta.decode_groups = self._decode_groups(rows[:len(decodes)], starts[:len(decodes)] + 1)
        input_ids = self._tensor(input_ids)
        pending = self._pending_input_ids(decodes)  # only a decode's input can be in flight
        if pending is not None:
            input_ids[pending[0]] = pending[1]
        return ModelInput(
            input_ids=input_ids,
            positions=self._to_device(positions),
            meta=meta,
            logits_indices=self._to_device(query_start_loc[1:][samples] - 1),
            sampling=[s for s, sample in zip(order, samples) if sample],
            prompt_spans=prompt_spans(order, query_start_loc),
        )

    def _sequences(self, rows: np.ndarray, seq_lens: np.ndarray,
                   query_start_loc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flat batch's layout, as both kernels read it: int32 query start locations,
        sequence lengths and block tables, on the device."""
        return (self._to_device(query_start_loc.astype(np.int32)), self._to_device(seq_lens.astype(np.int32)),
                self._to_device(self.batch.tables(rows)))

    def _flat_batch(self, rows: np.ndarray, seq_lens: np.ndarray, query_start_loc: np.ndarray,
                    max_query_len: int) -> FlatBatch:
        return FlatBatch(
            *self._sequences(rows, seq_lens, query_start_loc), max_query_len=max_query_len, block_size=self.block_size,
            num_splits=num_kv_splits(len(rows) * self.model.args.num_kv_heads, max_query_len,
                                     int(seq_lens.max()), self.device),
            kernels=self.triton_kernels)

    def _decode_groups(self, rows: np.ndarray, context_lens: np.ndarray) -> list[DecodeGroup]:
        """Split decodes (sorted by context) where a context is over twice its group's shortest."""
        groups, start = [], 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or context_lens[end] > 2 * max(context_lens[start], MIN_DECODE_GROUP_CONTEXT):
                groups.append(self._decode_group(rows[start:end], context_lens[start:end], start, end))
                start = end
        return groups

    def _decode_group(self, rows: np.ndarray, context_lens: np.ndarray, start: int, end: int) -> DecodeGroup:
        max_context = int(context_lens.max())
        max_blocks = -(-max_context // self.block_size)
        block_table = torch.from_numpy(self.batch.block_table[rows, :max_blocks].astype(np.int64))
        positions = torch.arange(max_context).unsqueeze(0)
        slots = context_slots(block_table, positions, self.block_size)
        mask = (positions < torch.from_numpy(context_lens).unsqueeze(1)).view(len(rows), 1, 1, max_context)
        return DecodeGroup(start, end, self._to_device(slots), self._to_device(mask))

    def _prefill_span(self, scheduled: ScheduledRequest, query_start: int, query_end: int) -> PrefillSpan:
        num_cached = scheduled.start_position
        if num_cached == 0:
            return PrefillSpan(query_start, query_end, 0, None, None)
        context = num_cached + scheduled.num_new_tokens
        block_table = torch.tensor(scheduled.block_ids)
        slots = context_slots(block_table, torch.arange(context), self.block_size)
        query_positions = torch.arange(num_cached, context).unsqueeze(1)
        mask = torch.arange(context).unsqueeze(0) <= query_positions
        return PrefillSpan(query_start, query_end, num_cached, self._to_device(slots), self._to_device(mask))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return self._to_device(torch.tensor(values, dtype=torch.long))

    def _to_device(self, tensor: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(tensor, np.ndarray):
            tensor = torch.from_numpy(tensor)
        return copy_to_device(tensor, self.device)


def swap_blocks(kv_caches: torch.Tensor, host_kv_caches: torch.Tensor, block_size: int,
                swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
    """Copy whole blocks device -> host (`swap_out`: (device, host) pairs) and host -> device
    (`swap_in`: (host, device) pairs), as if every copy read its source before any wrote.

    Within one step the two may trade blocks either way: a swapped-out request can be given
    the host blocks a request swapped in earlier in the same schedule gave up, and a
    swapped-in request the device blocks a swapped-out one gave up. So the ins are read
    first, the outs copied, and the ins written last.
    """
    if not swap_out and not swap_in:
        return
    device_blocks = kv_caches.unflatten(2, (-1, block_size))
    host_blocks = host_kv_caches.unflatten(2, (-1, block_size))
    if swap_in:
        in_source, in_target = zip(*swap_in)
        # Indexing with a list gathers a copy: the blocks as they are now, whatever the outs write.
        incoming = host_blocks[:, :, list(in_source)].to(kv_caches.device)
    if swap_out:
        source, target = zip(*swap_out)
        host_blocks[:, :, list(target)] = device_blocks[:, :, list(source)].to("cpu")
    if swap_in:
        device_blocks[:, :, list(in_target)] = incoming
