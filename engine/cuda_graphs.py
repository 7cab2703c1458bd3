"""Pure-decode steps on static, padded buffers, replayed as CUDA graphs.

A step in which every request adds one token is padded to a batch bucket and a context
bucket, so its shapes repeat and its kernels can be captured once per bucket and
replayed (torch.cuda.graphs; vLLM and gpt-fast capture decode the same way). Logits and
sampling stay eager, on the real rows only.

Padding rows must not touch a real request's KV: they write their key into a scratch
block at the end of the KV tensor, which the block pool never hands out, and attend to
that one slot (a row with every position masked would give NaN). Masked lanes of real
rows read the scratch block too.

Without capture the same buffers run the model eagerly, so everything but the capture
itself is tested on CPU.
"""

from dataclasses import dataclass, fields

import torch

from engine.attention import AttentionMetadata, DecodeGroup, context_slots
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
                scratch_block: int) -> DecodeInputs:
    """Host tensors for `decodes` in rows [0, len(decodes)), then padding rows up to `batch`."""
    num_padding = batch - len(decodes)
    num_table_blocks = -(-context // block_size)
    positions = torch.tensor([s.start_position for s in decodes] + [0] * num_padding)
    input_ids = torch.tensor([s.request.all_token_ids[s.start_position] for s in decodes] + [0] * num_padding)
    tables = [(s.block_ids + [scratch_block] * num_table_blocks)[:num_table_blocks] for s in decodes]
    block_table = torch.tensor(tables + [[scratch_block] * num_table_blocks] * num_padding, dtype=torch.long)
    context_positions = torch.arange(context).unsqueeze(0)
    slots = context_slots(block_table, context_positions, block_size)
    # A padding row sits at position 0 of the scratch block: it writes and reads that slot alone.
    slot_mapping = slots.gather(1, positions.unsqueeze(1)).squeeze(1)
    mask = (context_positions <= positions.unsqueeze(1)).view(batch, 1, 1, context)
    return DecodeInputs(input_ids, positions, slot_mapping, slots, mask)


@dataclass(slots=True)
class StaticBatch:
    """Views of the shared device buffers for one (batch, context) bucket, and its graph."""

    inputs: DecodeInputs
    meta: AttentionMetadata
    graph: "torch.cuda.CUDAGraph | None" = None
    hidden: torch.Tensor | None = None  # the graph's output, rewritten by every replay


class StaticDecodeRunner:
    """Runs pure-decode steps on padded static buffers; with `capture`, one CUDA graph per bucket."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: torch.Tensor, block_size: int,
                 max_batch: int, max_context: int, capture: bool, batch_sizes: tuple[int, ...] | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        # ModelRunner allocates one block more than the scheduler's pool holds.
        self.scratch_block = kv_caches.shape[2] // block_size - 1
        self.device = kv_caches.device
        self.capture = capture
        self.batch_buckets = batch_buckets(max_batch, batch_sizes)
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
        self._batches: dict[tuple[int, int], StaticBatch] = {}
        self._pool = None  # one memory pool shared by every graph, made at the first capture

    def bucket(self, scheduled: list[ScheduledRequest]) -> tuple[int, int] | None:
        """The (batch, context) bucket of a pure-decode step; None when the step runs eagerly."""
        if not scheduled or any(s.num_new_tokens != 1 for s in scheduled):
            return None
        batch = _first_fit(self.batch_buckets, len(scheduled))
        context = _first_fit(self.context_buckets, max(s.start_position for s in scheduled) + 1)
        if batch is None or context is None or batch * context > MAX_GRAPH_SLOTS:
            return None
        return batch, context

    @property
    def num_graphs(self) -> int:
        return sum(static.graph is not None for static in self._batches.values())

    def run(self, decodes: list[ScheduledRequest], key: tuple[int, int]) -> torch.Tensor:
        """Hidden states of `decodes`, in their order: [len(decodes), hidden]."""
        static = self._static_batch(key)
        if self.capture and static.graph is None:
            # Warmed up and captured on padding rows alone, so only the scratch block is written.
            self._fill(static, [])
            self._capture(static)
        self._fill(static, decodes)
        if static.graph is None:
            return self._forward(static)[: len(decodes)]
        with torch.cuda.device(self.device):
            static.graph.replay()
        return static.hidden[: len(decodes)]

    def _static_batch(self, key: tuple[int, int]) -> StaticBatch:
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
        batch, context = static.inputs.slots.shape
        host = pad_decodes(decodes, batch, context, self.block_size, self.scratch_block)
        for field in fields(DecodeInputs):
            source = getattr(host, field.name)
            if self.device.type == "cuda":
                # Pinned, so the copy is queued on the stream ahead of the replay without a sync.
                source = source.pin_memory()
            getattr(static.inputs, field.name).copy_(source, non_blocking=True)

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
