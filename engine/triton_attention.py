"""Triton kernels for paged attention over a flat batch, and for writing new keys and values.

One launch attends every sequence of a step, decodes and prompt chunks alike: a query token
at absolute position p sees the keys at positions 0..p of its own sequence, read in place
through the block table, which covers a cached prefix, earlier chunks and the causal chunk
itself in one rule. The design follows vLLM's Triton unified attention and SGLang's
decode/extend kernels (`../shared/GPU.md`); the code is ours.

The kernels run natively on CUDA, and on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is imported), which is how CI proves them.

Shapes, as the engine holds them:
  query [num_tokens, heads, head_dim] (rows may be strided), caches [num_slots, kv_heads,
  head_dim] contiguous, slot = block * block_size + offset; block_tables int32
  [num_seqs, max_blocks]; seq_lens int32 [num_seqs], the context including this step's
  tokens; query_start_loc int32 [num_seqs + 1], sequence s owns query rows
  [query_start_loc[s], query_start_loc[s + 1]).
"""

import os

import torch
import triton
import triton.language as tl

from engine.attention import narrow


@triton.jit
def store_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                    key_token_stride, value_token_stride,
                    ROW: tl.constexpr, ROW_PADDED: tl.constexpr):
    """Grid (num_tokens,): program t copies token t's keys and values into slot_mapping[t].

    Reads ROW = kv_heads * head_dim contiguous elements of key and value at row t (a
    token's heads are contiguous even where tokens are strided) and writes them to the
    caches' row `slot`. A slot below 0 marks a padding row: it writes nothing.
    """
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offsets = tl.arange(0, ROW_PADDED)
    mask = offsets < tl.where(slot >= 0, ROW, 0)
    slot = tl.maximum(slot, 0)
    key = tl.load(key_ptr + token * key_token_stride + offsets, mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + offsets, mask=mask)
    # Rounded to the cache's dtype, which may be narrower than the model's (--kv-cache-dtype).
    tl.store(key_cache_ptr + slot * ROW + offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + slot * ROW + offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks hold global block `q_block`.

    Sequence s's blocks are numbered from query_start_loc[s] // BLOCK_Q + s: an upper bound
    on the blocks of the sequences before it, so the numbering needs no prefix sum on the
    host, and a binary search over query_start_loc finds the owner.
    """
    low = 0
    high = num_seqs
    while low < high:
        middle = (low + high) // 2
        first_block = tl.load(query_start_loc_ptr + middle) // BLOCK_Q + middle
        if first_block <= q_block:
            low = middle + 1
        else:
            high = middle
    return low - 1


@triton.jit
def attend_tiles(q, m, l, acc, key_cache_ptr, value_cache_ptr, block_table_ptr, kv_head, q_positions,
                 first_tile, end_tile, max_position, scale,
                 KV_ROW: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the rows of `q` over key tiles [first_tile, end_tile), positions < max_position.

    q [BLOCK_M, HEAD_DIM_PADDED] in the model's dtype; m, l, acc the running maximum, sum and
    weighted values (float32). A row sees the key at position k when k <= its q_position.
    Keys and values are read in the cache's dtype, the model's or a narrower one
    (--kv-cache-dtype), and widened. Dots take DOT_DTYPE operands: the model's dtype, or
    float32 under the interpreter, whose bfloat16 dot is wrong (float32 products of bfloat16
    values are exact, so only the summation order differs from the GPU).
    """
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dims_valid = dims < HEAD_DIM
    for tile in range(first_tile, end_tile):
        positions = tile * TILE_N + tl.arange(0, TILE_N)
        positions_valid = positions < max_position
        blocks = tl.load(block_table_ptr + positions // BLOCK_SIZE, mask=positions_valid, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        head_offset = slots * KV_ROW + kv_head * HEAD_DIM
        keys = tl.load(key_cache_ptr + head_offset[None, :] + dims[:, None],
                       mask=positions_valid[None, :] & dims_valid[:, None], other=0.0)  # [D, TILE_N]
        scores = tl.dot(q.to(DOT_DTYPE), keys.to(DOT_DTYPE), input_precision=DOT_PRECISION) * scale
        visible = (positions[None, :] <= q_positions[:, None]) & positions_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps exp finite.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        probs = tl.exp(scores - m_shift[:, None])
        alpha = tl.exp(m - m_shift)
        l = l * alpha + tl.sum(probs, axis=1)
        values = tl.load(value_cache_ptr + head_offset[:, None] + dims[None, :],
                         mask=positions_valid[:, None] & dims_valid[None, :], other=0.0)  # [TILE_N, D]
        probs = probs.to(q.dtype).to(DOT_DTYPE)  # rounded to the model's dtype, as on the GPU
        acc = acc * alpha[:, None] + tl.dot(probs, values.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def unified_attention_kernel(
    out_ptr, query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale, num_seqs, query_token_stride, query_head_stride, out_token_stride, out_head_stride, block_table_stride,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (num_tokens // BLOCK_Q + num_seqs, kv_heads): one block of query tokens x one KV head.

    Each program holds BLOCK_Q consecutive query tokens of one sequence times the GROUP query
    heads that share this KV head (BLOCK_M >= BLOCK_Q * GROUP rows), so one load of a key or
    value tile serves the whole group through one dot. It walks the sequence's keys up to its
    last token's position in TILE_N tiles through the block table, with an online softmax in
    float32. Programs past their sequence's query tokens (the grid is an upper bound) exit.
    Relies on: every real query row sees at least the key at position 0; seq_lens[s] >=
    query length of s.
    """
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_index = local_block * BLOCK_Q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    rows_valid = (rows < BLOCK_Q * GROUP) & (q_index < q_len)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    mask = rows_valid[:, None] & (dims < HEAD_DIM)[None, :]
    tokens = (q_start + q_index).to(tl.int64)
    q = tl.load(query_ptr + tokens[:, None] * query_token_stride + heads[:, None] * query_head_stride + dims[None, :],
                mask=mask, other=0.0)

    # Keys up to this block's last query token; later ones are masked for every row.
    max_position = tl.minimum(seq_len, num_cached + (local_block + 1) * BLOCK_Q)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    m, l, acc = attend_tiles(q, m, l, acc, key_cache_ptr, value_cache_ptr,
                             block_tables_ptr + seq.to(tl.int64) * block_table_stride, kv_head,
                             num_cached + q_index, 0, tl.cdiv(max_position, TILE_N), max_position, scale,
                             NUM_KV_HEADS * HEAD_DIM, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, TILE_N, DOT_DTYPE, DOT_PRECISION)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + tokens[:, None] * out_token_stride + heads[:, None] * out_head_stride + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def split_decode_kernel(
    partial_ptr, partial_max_ptr, partial_sum_ptr, query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr,
    seq_lens_ptr, scale, query_token_stride, query_head_stride, block_table_stride,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (num_seqs, kv_heads, NUM_SPLITS), decodes only (query row s is sequence s's one token).

    Program (s, h, i) attends the GROUP query heads of KV head h over the i-th of NUM_SPLITS
    equal runs of tiles of s's context, and writes its unnormalised values, row maximum
    and row sum to partial[s, head, i] for `merge_splits_kernel`. A split past the end of a
    short context writes maximum -inf and sum 0. Few long sequences then still fill the GPU.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    first_tile = split * tiles_per_split
    end_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)

    rows = tl.arange(0, BLOCK_M)
    heads = kv_head * GROUP + rows
    rows_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PADDED)
    mask = rows_valid[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(query_ptr + seq.to(tl.int64) * query_token_stride + heads[:, None] * query_head_stride
                + dims[None, :], mask=mask, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    q_positions = tl.full([BLOCK_M], 0, tl.int32) + seq_len - 1
    m, l, acc = attend_tiles(q, m, l, acc, key_cache_ptr, value_cache_ptr,
                             block_tables_ptr + seq.to(tl.int64) * block_table_stride, kv_head, q_positions,
                             first_tile, end_tile, seq_len, scale,
                             NUM_KV_HEADS * HEAD_DIM, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, TILE_N, DOT_DTYPE, DOT_PRECISION)
    heads_total = NUM_KV_HEADS * GROUP
    partial_row = (seq.to(tl.int64) * heads_total + heads) * NUM_SPLITS + split  # [BLOCK_M]
    tl.store(partial_max_ptr + partial_row, m, mask=rows_valid)
    tl.store(partial_sum_ptr + partial_row, l, mask=rows_valid)
    tl.store(partial_ptr + partial_row[:, None] * HEAD_DIM_PADDED + dims[None, :], acc, mask=mask)


@triton.jit
def merge_splits_kernel(out_ptr, partial_ptr, partial_max_ptr, partial_sum_ptr, out_token_stride, out_head_stride,
                        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                        NUM_SPLITS: tl.constexpr):
    """Grid (num_seqs, heads): out[s, h] = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i, M = max_i m_i.

    Splits that saw no key (m_i = -inf) weigh 0; a sequence with no key at all gets 0.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    row = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS
    maxima = tl.load(partial_max_ptr + row + splits)
    sums = tl.load(partial_sum_ptr + row + splits)
    partial = tl.load(partial_ptr + (row + splits)[:, None] * HEAD_DIM_PADDED + dims[None, :])
    overall = tl.max(maxima, axis=0)
    weights = tl.exp(maxima - tl.where(overall == float("-inf"), 0.0, overall))
    total = tl.sum(weights * sums, axis=0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq.to(tl.int64) * out_token_stride + head * out_head_stride + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# -- launchers ------------------------------------------------------------------------------

def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, kv_heads, head_dim], each token's heads contiguous; slot -1 skips a row.
    The caches may be narrower than key and value (--kv-cache-dtype)."""
    if key.dtype != key_cache.dtype and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter narrows float32 to bfloat16 by truncation, where the GPU rounds to
        # nearest even: narrowed here as the GPU would, the kernel copies what a GPU stores.
        key, value = narrow(key, key_cache.dtype), narrow(value, value_cache.dtype)
    num_tokens, kv_heads, head_dim = key.shape
    assert key.stride(1) == head_dim and key.stride(2) == 1 and value.stride(1) == head_dim and value.stride(2) == 1
    row = kv_heads * head_dim
    store_kv_kernel[(num_tokens,)](key, value, key_cache, value_cache, slot_mapping, key.stride(0), value.stride(0),
                                   ROW=row, ROW_PADDED=triton.next_power_of_2(row))


def dot_types(dtype: torch.dtype) -> dict:
    """DOT_DTYPE and DOT_PRECISION for the model's (the query's) dtype; see `attend_tiles`."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    dot_dtype = tl.float32 if dtype == torch.float32 or (interpreted and dtype == torch.bfloat16) else {
        torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    # float32 stays float32 (no TF32): the float32 engine is proved token for token against transformers.
    # 16-bit operands take Triton's default.
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": "ieee" if dot_dtype == tl.float32 else None}


def unified_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      max_query_len: int, block_size: int, scale: float, out: torch.Tensor | None = None,
                      num_splits: int = 1) -> torch.Tensor:
    """Attention of every query row over its sequence's paged context; see the module docstring.

    `num_splits` > 1 runs decodes (every query length 1) as split-KV: that many programs per
    (sequence, KV head), merged by a second kernel.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    kv_heads = key_cache.shape[1]
    group = num_heads // kv_heads
    out = torch.empty_like(query) if out is None else out
    head_dim_padded = triton.next_power_of_2(head_dim)
    common = dict(NUM_KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
                  BLOCK_SIZE=block_size, **dot_types(query.dtype))
    assert query.stride(2) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    # A program keeps its query, key, value and probability tiles in shared memory for the dots:
    # 16-bit 64-wide tiles take <= 57 KB at head_dim 128. A float32 model's tiles are half as
    # wide, so every program fits the smallest per-block limit of a GPU Triton targets (64 KB,
    # Turing); at 64 they took 115 KB, over a consumer Ampere's or Ada's 99 (engine/kernel_check.py).
    tile = 32 if query.dtype == torch.float32 else 64
    if num_splits > 1:
        assert max_query_len == 1, "split-KV runs decodes only"
        assert num_splits & (num_splits - 1) == 0, "the merge reads the splits as one power-of-two vector"
        block_m = max(16, triton.next_power_of_2(group))
        partial = torch.empty(num_seqs, num_heads, num_splits, head_dim_padded, dtype=torch.float32,
                              device=query.device)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
        split_decode_kernel[(num_seqs, kv_heads, num_splits)](
            partial, partial_max, partial_sum, query, key_cache, value_cache, block_tables, seq_lens, scale,
            query.stride(0), query.stride(1), block_tables.stride(0),
            BLOCK_M=block_m, TILE_N=tile, NUM_SPLITS=num_splits, **common)
        merge_splits_kernel[(num_seqs, num_heads)](
            out, partial, partial_max, partial_sum, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, NUM_SPLITS=num_splits)
        return out
    # Decodes want few rows per program (one token x the group); long prompt chunks want many.
    block_m = max(16 if max_query_len * group <= 16 else tile, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs, kv_heads)
    unified_attention_kernel[grid](
        out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=32 if block_m == 16 else tile, **common)
    return out
