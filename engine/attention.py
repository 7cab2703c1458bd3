"""Attention over the paged KV cache, for a flat batch of decodes and prompt chunks.

The cache of one layer is a flat tensor of slots, `[num_blocks * block_size, kv_heads,
head_dim]`; a token at position p of a request lives in slot
`block_ids[p // block_size] * block_size + p % block_size`. The batch puts all decode
tokens first (one per request) and prompt chunks after (each attended on its own,
causally, over its cached prefix).

Three backends (`--attention-backend`, chosen once by `select_backend`):
- `cpu-kernel`: the whole flat batch, decodes and prompt chunks, in one call of our C++
  kernel (engine/csrc/paged_attention.cpp, the build engine/cpu_kernels.py picked for
  this CPU), which reads each context's keys and values in place through its block table:
  a chunk over a cached prefix gathers nothing.
- `torch`, the reference: decodes are sorted by context length and attended in groups
  whose lengths are within a factor of two, each group gathered and padded to its longest
  context (padding every decode to the batch's longest made one 2,000-token request cost
  256 short ones eight times their own reads); each prompt chunk is one SDPA call.
- `triton`: the whole flat batch in one launch of engine/triton_attention.py.
"""

from dataclasses import dataclass
import importlib.util
import os

import torch
import torch.nn.functional as F

from engine import cpu_kernels, host

# Split-KV only pays where each split still reads a few tiles; not yet tuned on a GPU.
SPLIT_KV_MIN_CONTEXT = 1024
MAX_KV_SPLITS = 16


@dataclass(slots=True)
class PrefillSpan:
    query_start: int
    query_end: int
    num_cached: int  # context tokens before this chunk (prefix hits and earlier chunks)
    context_slots: torch.Tensor | None  # [num_cached + chunk] slots, None when num_cached == 0
    mask: torch.Tensor | None  # [chunk, num_cached + chunk] causal mask with the prefix visible


@dataclass(slots=True)
class DecodeGroup:
    start: int  # rows [start, end) of the batch, one decode token each
    end: int
    slots: torch.Tensor  # [end - start, max_context] gather index, padded
    mask: torch.Tensor  # [end - start, 1, 1, max_context] True where real


@dataclass(slots=True)
class PagedBatch:
    """Every sequence of the step for the CPU kernel, one call (the layout of `FlatBatch`)."""
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: sequence s owns rows [loc[s], loc[s + 1])
    seq_lens: torch.Tensor  # int32 [num_seqs], context including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    block_size: int
    kernel: object  # the build's operators, from engine.cpu_kernels.load()


@dataclass(slots=True)
class FlatBatch:
    """Every sequence of the step for the Triton kernels (engine/triton_attention.py), one launch."""
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: sequence s owns rows [loc[s], loc[s + 1])
    seq_lens: torch.Tensor  # int32 [num_seqs], context including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    max_query_len: int
    block_size: int
    num_splits: int  # > 1: decodes as split-KV
    kernels: object  # the engine.triton_attention module


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's key and value go
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSpan]
    paged: PagedBatch | None = None  # instead of decode_groups and prefills, with the CPU kernel
    flat: FlatBatch | None = None  # instead of all the above, with the Triton backend


ATTENTION_BACKENDS = ("auto", "triton", "cpu-kernel", "torch")


def select_backend(name: str, device: torch.device, kv_cache_dtype: torch.dtype | None = None) -> str:
    """The backend to run: `auto` is the C++ kernel on CPU (torch where it cannot be built), and
    torch on CUDA until the Triton kernels are measured there (issue 9)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "auto":
        return "cpu-kernel" if device.type == "cpu" and cpu_kernels.load() is not None else "torch"
    if name == "cpu-kernel" and (device.type != "cpu" or cpu_kernels.load() is None):
        raise ValueError("the cpu-kernel attention backend needs a CPU device and a C++ compiler")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("the triton attention backend needs the triton package")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("on a CPU the triton attention backend runs only under TRITON_INTERPRET=1 "
                             "(Triton's interpreter: slow, for checking the GPU kernels)")
        cuda = host.current().cuda
        if (device.type == "cuda" and cuda is not None and kv_cache_dtype is not None
                and not triton_writes_cache(cuda.capability, kv_cache_dtype)):
            raise ValueError(f"the triton attention backend writes a float8 KV cache with instructions of compute "
                             f"capability 8.0 and later; this GPU ({cuda.name}) is "
                             f"{'.'.join(map(str, cuda.capability))}: use --kv-cache-dtype auto or "
                             f"--attention-backend torch")
    return name


def triton_writes_cache(capability: tuple[int, int], kv_cache_dtype: torch.dtype) -> bool:
    """Whether the Triton store kernel compiles for a GPU of `capability`: ptxas refuses its
    conversion to float8 below 8.0 (Turing, Volta), as engine/kernel_check.py shows."""
    return kv_cache_dtype.itemsize > 1 or capability >= (8, 0)


def num_kv_splits(num_programs: int, max_query_len: int, max_seq_len: int, device: torch.device) -> int:
    """KV splits per (sequence, KV head) for the Triton decode: more than 1 only on CUDA, for
    decodes alone, with a long context and too few programs (sequences x KV heads) to fill
    every multiprocessor twice; a power of two, as the merge reads them as one vector."""
    cuda = host.current().cuda
    if (device.type != "cuda" or cuda is None or max_query_len > 1 or max_seq_len < SPLIT_KV_MIN_CONTEXT
            or num_programs >= cuda.multiprocessors):
        return 1
    wanted = -(-2 * cuda.multiprocessors // num_programs)
    return min(MAX_KV_SPLITS, 1 << (wanted - 1).bit_length())


def context_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot of each position; `block_table` is [..., num_blocks], positions broadcast against it."""
    block_index = positions // block_size
    blocks = torch.gather(block_table, -1, block_index.expand(*block_table.shape[:-1], -1))
    return blocks * block_size + positions % block_size


def paged_attention(
    query: torch.Tensor,  # [num_tokens, heads, head_dim]
    key: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    # Every new key is written before any query reads: a prefix-cache hit on a block that
    # another request fills in this same step then sees that request's keys. A cache narrower
    # than the model (--kv-cache-dtype) rounds keys and values as they are stored, and every
    # query reads them as stored, the chunk's own tokens included, so a prompt attends alike
    # whether its prefix came from the cache or not.
    if meta.flat is not None:
        flat = meta.flat
        flat.kernels.store_kv(key, value, key_cache, value_cache, meta.slot_mapping)
        return flat.kernels.unified_attention(query, key_cache, value_cache, flat.block_tables, flat.seq_lens,
                                              flat.query_start_loc, flat.max_query_len, flat.block_size, scale,
                                              num_splits=flat.num_splits)
    store(key_cache, meta.slot_mapping, key)
    store(value_cache, meta.slot_mapping, value)
    if meta.paged is not None:
        paged = meta.paged
        return paged.kernel.paged_attention(query, key_cache, value_cache, paged.block_tables, paged.query_start_loc,
                                            paged.seq_lens, paged.block_size, scale)
    output = torch.empty_like(query)
    for group in meta.decode_groups:
        rows = slice(group.start, group.end)
        keys = key_cache[group.slots].to(query.dtype).transpose(1, 2)  # [rows, kv_heads, context, head_dim]
        values = value_cache[group.slots].to(query.dtype).transpose(1, 2)
        output[rows] = decode_attention(query[rows], keys, values, group.mask, scale)

    for span in meta.prefills:
        chunk = slice(span.query_start, span.query_end)
        q = query[chunk].transpose(0, 1).unsqueeze(0)
        if span.context_slots is None:
            k, v = as_stored(key[chunk], key_cache.dtype), as_stored(value[chunk], value_cache.dtype)
        else:
            k, v = key_cache[span.context_slots].to(query.dtype), value_cache[span.context_slots].to(query.dtype)
        k = k.transpose(0, 1).unsqueeze(0)
        v = v.transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True
        )
        output[chunk] = attended.squeeze(0).transpose(0, 1)
    return output


def narrow(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` rounded to `dtype` (to nearest even), values past its range held at its largest
    finite one as the GPU's conversion does (`satfinite`): float16 and float8 e5m2 end near
    65,504 and 57,344, and one infinite key would turn a whole softmax to NaN."""
    if dtype == tensor.dtype:
        return tensor
    largest = torch.finfo(dtype).max
    if largest < torch.finfo(tensor.dtype).max:
        tensor = tensor.clamp(-largest, largest)
    return tensor.to(dtype)


def store(cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """`rows` into the cache's slots, narrowed to the cache's dtype."""
    rows = narrow(rows, cache.dtype)
    if cache.dtype.itemsize == 1:  # float8 has no index_copy_ on the CPU: its bytes are copied
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.index_copy_(0, slot_mapping, rows)


def as_stored(tensor: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as a cache of `cache_dtype` holds it, in its own dtype."""
    return tensor if tensor.dtype == cache_dtype else narrow(tensor, cache_dtype).to(tensor.dtype)


def decode_attention(query, keys, values, mask, scale: float) -> torch.Tensor:
    """One query token per row: query [rows, heads, head_dim], keys/values [rows, kv_heads, context, head_dim]."""
    if query.dtype == torch.float32:
        return F.scaled_dot_product_attention(
            query.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True).squeeze(2)
    # Torch's CPU flash kernel is 4-5x slower than two batched matmuls for a single query
    # in bfloat16 (measured here; BENCHMARKS.md). Query heads are grouped per KV head.
    rows, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.view(rows, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # [rows, kv_heads, group, context]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(rows, heads, head_dim)
