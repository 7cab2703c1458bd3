"""Attention over the paged KV cache, for a flat batch of decodes and prompt chunks.

The cache of one layer is a flat tensor of slots, `[num_blocks * block_size, kv_heads,
head_dim]`; a token at position p of a request lives in slot
`block_ids[p // block_size] * block_size + p % block_size`. The batch puts all decode
tokens first (one per request) and prompt chunks after (each attended on its own,
causally, over its cached prefix).

On the CPU, decodes go to our C++ kernel (engine/csrc/paged_attention.cpp, the build
engine/cpu_kernels.py picked for this CPU), which reads
each context's keys and values in place through its block table. Elsewhere, or where
the kernel cannot be built, decodes are sorted by context length and attended in groups
whose lengths are within a factor of two, each group padded to its longest context:
padding every decode to the batch's longest context made one 2,000-token request cost
256 short ones eight times their own reads.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
class PagedDecodes:
    """All decodes of the step for the CPU kernel: rows [0, num_rows) of the batch."""
    num_rows: int
    block_tables: torch.Tensor  # int32 [num_rows, max_blocks], padded with block 0
    context_lens: torch.Tensor  # int32 [num_rows]
    block_size: int
    kernel: object  # the build's operators, from engine.cpu_kernels.load()


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's key and value go
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSpan]
    paged_decodes: PagedDecodes | None = None  # instead of decode_groups, when the CPU kernel is in use


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
    # another request fills in this same step then sees that request's keys.
    key_cache.index_copy_(0, meta.slot_mapping, key)
    value_cache.index_copy_(0, meta.slot_mapping, value)
    output = torch.empty_like(query)

    if meta.paged_decodes is not None:
        decodes = meta.paged_decodes
        rows = slice(0, decodes.num_rows)
        output[rows] = decodes.kernel.paged_decode_attention(
            query[rows], key_cache, value_cache, decodes.block_tables, decodes.context_lens, decodes.block_size, scale)
    for group in meta.decode_groups:
        rows = slice(group.start, group.end)
        keys = key_cache[group.slots].transpose(1, 2)  # [rows, kv_heads, context, head_dim]
        values = value_cache[group.slots].transpose(1, 2)
        output[rows] = decode_attention(query[rows], keys, values, group.mask, scale)

    for span in meta.prefills:
        chunk = slice(span.query_start, span.query_end)
        q = query[chunk].transpose(0, 1).unsqueeze(0)
        if span.context_slots is None:
            k, v = key[chunk], value[chunk]
        else:
            k, v = key_cache[span.context_slots], value_cache[span.context_slots]
        k = k.transpose(0, 1).unsqueeze(0)
        v = v.transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True
        )
        output[chunk] = attended.squeeze(0).transpose(0, 1)
    return output


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
