"""Pure-decode steps on static, padded buffers, replayed as CUDA graphs.

A step in which every request adds one token is padded to a batch bucket, so its shapes
repeat and its kernels can be captured once per bucket and replayed (torch.cuda.graphs;
vLLM and gpt-fast capture decode the same way). Logits and sampling stay eager, on the
real rows only. Keys are (batch, variant):
- With the Triton backend the kernel reads each row's length and block table from device
  memory, so a graph serves every context: the variant is only the number of KV splits
  (1, or the split-KV launch for long contexts), and a step is padded in rows alone.
- With the gather backends attention reads a dense [batch, context] index, so steps are
  padded to a context bucket as well: the variant is that bucket.

Padding rows must not touch a real request's KV. They attend to one slot of a scratch block
at the end of the KV tensor, which the block pool never hands out (a row with no key would
give NaN); on the gather path they also write their key there, on the Triton path their
slot is -1 and the store kernel writes nothing. Masked lanes of real rows read the scratch
block too.

Without capture the same buffers run the model eagerly, so everything but the capture
itself is tested on CPU (the Triton path under TRITON_INTERPRET=1).
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from engine.attention import AttentionMetadata, DecodeGroup, FlatBatch, context_slots, num_kv_splits
from engine.input_batch import InputBatch, known_token
from engine.model import LlamaForCausalLM
from scheduler import ScheduledRequest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CONTEXT_BUCKET = 256
# Decode attention gathers every row's context into a [batch, context] tensor per layer;
# a graph keeps its peak memory reserved in the pool, so wider steps run eagerly.
MAX_GRAPH_SLOTS = 256 * 2048
NUM_WARMUP_RUNS = 2


def batch_buckets(max_batch: int, sizes: tuple[int, ...] | None = None) -> list[int]:
    """`sizes` (default: powers of two up to 256), the largest cut to `max_batch`; bigger
    batches run eagerly."""
    return sorted({min(bucket, max_batch) for bucket in sizes or BATCH_BUCKETS})


def context_buckets(max_context: int) -> list[int]:
    """Powers of two from 256, the last one cut to `max_context`."""
    buckets, bucket = [], MIN_CONTEXT_BUCKET
    while bucket < max_context:
        buckets.append(bucket)
        bucket *= 2
    return buckets + [max_context]


def _first_fit(buckets: list[int], size: int) -> int | None:
    return next((bucket for bucket in buckets if bucket >= size), None)


@dataclass(slots=True)
class DecodeInputs:
    """One pure-decode step padded to `batch` rows and `context` slots."""

    input_ids: torch.Tensor  # [batch]
    positions: torch.Tensor  # [batch]
    slot_mapping: torch.Tensor  # [batch]
    slots: torch.Tensor  # [batch, context]
    mask: torch.Tensor  # [batch, 1, 1, context]

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping, [DecodeGroup(0, len(self.input_ids), self.slots, self.mask)], [])


def pad_decodes(decodes: list[ScheduledRequest], batch: int, context: int, block_size: int,
                scratch_block: int, input_batch: InputBatch) -> DecodeInputs:
    """Host tensors for `decodes` in rows [0, len(decodes)), then padding rows up to `batch`."""
    num_padding = batch - len(decodes)
    num_table_blocks = -(-context // block_size)
    positions = torch.tensor([s.start_position for s in decodes] + [0] * num_padding)
    input_ids = torch.tensor([known_token(s) for s in decodes] + [0] * num_padding)
    tables = input_batch.tables(input_batch.rows(decodes), width=num_table_blocks, pad=scratch_block)
    padding = np.full((num_padding, num_table_blocks), scratch_block, dtype=np.int32)
    block_table = torch.from_numpy(np.concatenate([tables, padding]).astype(np.int64))
    context_positions = torch.arange(context).unsqueeze(0)
    slots = context_slots(block_table, context_positions, block_size)
    # A padding row sits at position 0 of the scratch block: it writes and reads that slot alone.
    slot_mapping = slots.gather(1, positions.unsqueeze(1)).squeeze(1)
    mask = (context_positions <= positions.unsqueeze(1)).view(batch, 1, 1, context)
    return DecodeInputs(input_ids, positions, slot_mapping, slots, mask)


@dataclass(slots=True)
class PagedDecodeInputs:
    """One pure-decode step padded to `batch` rows, for the Triton kernels: rows read their
    context through their block table, as long as their length says."""

    input_ids: torch.Tensor  # [batch]
    positions: torch.Tensor  # [batch]
    slot_mapping: torch.Tensor  # [batch], -1 for padding rows
    seq_lens: torch.Tensor  # int32 [batch]
    block_tables: torch.Tensor  # int32 [batch, width]: a prefix of the buffer's columns


def pad_paged_decodes(decodes: list[ScheduledRequest], batch: int, block_size: int,
                      scratch_block: int, input_batch: InputBatch) -> PagedDecodeInputs:
    """Host tensors for `decodes` in rows [0, len(decodes)), then padding rows up to `batch`,
    whose one key is slot 0 of the scratch block. The table is as wide as the longest real
    row's blocks: columns past it in the device buffer keep earlier steps' block ids, which
    no row reads (its length bounds it)."""
    num_padding = batch - len(decodes)
    rows = input_batch.rows(decodes)
    positions = np.fromiter((s.start_position for s in decodes), dtype=np.int64, count=len(decodes))
    tables = input_batch.tables(rows, pad=scratch_block)
    padding = np.full((num_padding, tables.shape[1]), scratch_block, dtype=np.int32)
    return PagedDecodeInputs(
        input_ids=torch.tensor([known_token(s) for s in decodes] + [0] * num_padding),
        positions=torch.from_numpy(np.concatenate([positions, np.zeros(num_padding, dtype=np.int64)])),
        slot_mapping=torch.from_numpy(np.concatenate([input_batch.slot_mapping(rows, positions),
                                                      np.full(num_padding, -1, dtype=np.int64)])),
        seq_lens=torch.from_numpy(np.concatenate([positions + 1, np.ones(num_padding, dtype=np.int64)]).astype(np.int32)),
        block_tables=torch.from_numpy(np.concatenate([tables, padding])))


@dataclass(slots=True)
class StaticBatch:
    """Views of the shared device buffers for one (batch, context) bucket, and its graph."""

    inputs: DecodeInputs | PagedDecodeInputs
    meta: AttentionMetadata
    graph: "torch.cuda.CUDAGraph | None" = None
    hidden: torch.Tensor | None = None  # the graph's output, rewritten by every replay


class StaticDecodeRunner:
    """Runs pure-decode steps on padded static buffers; with `capture`, one CUDA graph per key.

    `triton_kernels` (engine.triton_attention): the attention backend's kernels, when it is
    Triton; steps are then padded in rows only.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: torch.Tensor, block_size: int,
                 max_batch: int, max_context: int, capture: bool, batch_sizes: tuple[int, ...] | None = None,
                 triton_kernels=None, input_batch: InputBatch | None = None):
        self.model = model
        self.input_batch = input_batch or InputBatch(block_size)  # the eager path's rows, shared
        self.kv_caches = kv_caches
        self.block_size = block_size
        # ModelRunner allocates one block more than the scheduler's pool holds.
        self.scratch_block = kv_caches.shape[2] // block_size - 1
        self.device = kv_caches.device
        self.capture = capture
        self.batch_buckets = batch_buckets(max_batch, batch_sizes)
        self.triton_kernels = triton_kernels
        self._batches: dict[tuple[int, int], StaticBatch] = {}
        self._pool = None  # one memory pool shared by every graph, made at the first capture
        if triton_kernels is not None:
            self._init_paged(max_context)
            return
        self.context_buckets = context_buckets(max_context)
        # One set of buffers, sliced per bucket: a graph records the addresses of its slices,
        # so these tensors live as long as the runner and are only ever written in place.
        largest_batch = self.batch_buckets[-1]
        largest_slots = max((b * c for b in self.batch_buckets for c in self.context_buckets
                             if b * c <= MAX_GRAPH_SLOTS), default=0)
        self._input_ids = torch.zeros(largest_batch, dtype=torch.long, device=self.device)
        self._positions = torch.zeros_like(self._input_ids)
        self._slot_mapping = torch.zeros_like(self._input_ids)
        self._slots = torch.zeros(largest_slots, dtype=torch.long, device=self.device)
        self._mask = torch.zeros(largest_slots, dtype=torch.bool, device=self.device)

    def _init_paged(self, max_context: int) -> None:
        largest_batch = self.batch_buckets[-1]
        int32 = dict(dtype=torch.int32, device=self.device)
        self._input_ids = torch.zeros(largest_batch, dtype=torch.long, device=self.device)
        self._positions = torch.zeros_like(self._input_ids)
        self._slot_mapping = torch.full_like(self._input_ids, -1)
        self._seq_lens = torch.ones(largest_batch, **int32)
        max_blocks = -(-max_context // self.block_size)
        self._block_tables = torch.full((largest_batch, max_blocks), self.scratch_block, **int32)
        self._query_start_loc = torch.arange(largest_batch + 1, **int32)  # one query row per sequence

    def bucket(self, scheduled: list[ScheduledRequest]) -> tuple[int, int] | None:
        """The (batch, variant) key of a pure-decode step (see the module docstring); None when
        the step runs eagerly."""
        if not scheduled or any(s.num_new_tokens != 1 for s in scheduled):
            return None
        batch = _first_fit(self.batch_buckets, len(scheduled))
        max_seq_len = max(s.start_position for s in scheduled) + 1
        if self.triton_kernels is not None:
            if batch is None:
                return None
            return batch, num_kv_splits(batch * self.model.args.num_kv_heads, 1, max_seq_len, self.device)
        context = _first_fit(self.context_buckets, max_seq_len)
        if batch is None or context is None or batch * context > MAX_GRAPH_SLOTS:
            return None
        return batch, context

    @property
    def num_graphs(self) -> int:
        return sum(static.graph is not None for static in self._batches.values())

    def run(self, decodes: list[ScheduledRequest], key: tuple[int, int],
            pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states of `decodes`, in their order: [len(decodes), hidden]. `pending`:
        (rows, device values) of input ids the step before this one sampled and the host
        has yet to see (async scheduling)."""
        static = self._static_batch(key)
        if self.capture and static.graph is None:
            # Warmed up and captured on padding rows alone, so only the scratch block is written.
            self._fill(static, [])
            self._capture(static)
        self._fill(static, decodes)
        if pending is not None:
            static.inputs.input_ids[pending[0]] = pending[1]
        if static.graph is None:
            return self._forward(static)[: len(decodes)]
        with torch.cuda.device(self.device):
            static.graph.replay()
        return static.hidden[: len(decodes)]

    def _static_batch(self, key: tuple[int, int]) -> StaticBatch:
        if key not in self._batches and self.triton_kernels is not None:
            batch, num_splits = key
            inputs = PagedDecodeInputs(self._input_ids[:batch], self._positions[:batch], self._slot_mapping[:batch],
                                       self._seq_lens[:batch], self._block_tables[:batch])
            flat = FlatBatch(self._query_start_loc[:batch + 1], inputs.seq_lens, inputs.block_tables,
                             max_query_len=1, block_size=self.block_size, num_splits=num_splits,
                             kernels=self.triton_kernels)
            self._batches[key] = StaticBatch(inputs, AttentionMetadata(inputs.slot_mapping, [], [], flat=flat))
        if key not in self._batches:
            batch, context = key
            inputs = DecodeInputs(
                input_ids=self._input_ids[:batch],
                positions=self._positions[:batch],
                slot_mapping=self._slot_mapping[:batch],
                slots=self._slots[: batch * context].view(batch, context),
                mask=self._mask[: batch * context].view(batch, 1, 1, context),
            )
            self._batches[key] = StaticBatch(inputs, inputs.metadata())
        return self._batches[key]

    def _fill(self, static: StaticBatch, decodes: list[ScheduledRequest]) -> None:
        if self.triton_kernels is not None:
            host = pad_paged_decodes(decodes, len(static.inputs.input_ids), self.block_size, self.scratch_block,
                                     self.input_batch)
        else:
            batch, context = static.inputs.slots.shape
            host = pad_decodes(decodes, batch, context, self.block_size, self.scratch_block, self.input_batch)
        for field in fields(host):
            source = getattr(host, field.name)
            if self.device.type == "cuda":
                # Pinned, so the copy is queued on the stream ahead of the replay without a sync.
                source = source.pin_memory()
            target = getattr(static.inputs, field.name)
            if field.name == "block_tables":  # only the columns this step's rows use
                target = target[:, :source.shape[1]]
            target.copy_(source, non_blocking=True)

    def _forward(self, static: StaticBatch) -> torch.Tensor:
        return self.model(static.inputs.input_ids, static.inputs.positions, self.kv_caches, static.meta)

    def _capture(self, static: StaticBatch) -> None:
        # As torch.cuda.graphs prescribes: warm up on a side stream, so lazy initialisation
        # (cuBLAS workspaces, kernel choice) happens before, not inside, the capture.
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(NUM_WARMUP_RUNS):
                    self._forward(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # Sharing the pool is safe because each graph keeps its output alive in `hidden`,
            # and that output is read right after its own replay, before any other graph runs.
            with torch.cuda.graph(graph, pool=self._pool):
                static.hidden = self._forward(static)
        static.graph = graph
