"""The Triton kernels (engine/triton_attention.py) against dense attention over each sequence.

On CUDA they run natively; elsewhere under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so CI on a CPU proves the same kernels a GPU runs.
"""

from dataclasses import dataclass
import itertools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it)")
from engine.triton_attention import store_kv, unified_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KV_HEADS = 2
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass
class PagedBatch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    tables: list[list[int]]
    sequences: list[tuple[int, int]]  # (context length including the new tokens, new tokens)
    block_size: int

    def run(self, **kwargs) -> torch.Tensor:
        max_query_len = max(q for _, q in self.sequences)
        return unified_attention(self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                                 self.query_start_loc, max_query_len, self.block_size, self.scale, **kwargs)

    @property
    def scale(self) -> float:
        return self.query.shape[-1] ** -0.5

    def slots(self, seq: int, length: int) -> torch.Tensor:
        table = torch.tensor(self.tables[seq])
        positions = torch.arange(length)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def reference(self) -> torch.Tensor:
        """Each sequence's new tokens attend causally to its whole context, in float32."""
        rows = []
        for seq, (length, new) in enumerate(self.sequences):
            slots = self.slots(seq, length).to(DEVICE)
            keys = self.key_cache[slots].transpose(0, 1)[None].float()
            values = self.value_cache[slots].transpose(0, 1)[None].float()
            start = int(self.query_start_loc[seq])
            q = self.query[start:start + new].transpose(0, 1)[None].float()
            mask = torch.arange(length, device=DEVICE)[None] <= torch.arange(length - new, length, device=DEVICE)[:, None]
            rows.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)[0]
                        .transpose(0, 1))
        return torch.cat(rows)


def paged_batch(sequences, group: int, head_dim: int, block_size: int, dtype, seed: int = 0,
                cache_dtype=None) -> PagedBatch:
    """Random caches (of `cache_dtype`, default the query's) with each sequence's blocks scattered
    over the pool, as a real pool leaves them."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-length // block_size) for length, _ in sequences]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, start = [], 0
    for count in blocks_needed:
        tables.append(order[start:start + count])
        start += count
    width = max(blocks_needed)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    cache_shape = (num_blocks * block_size, KV_HEADS, head_dim)
    new_tokens = [new for _, new in sequences]
    return PagedBatch(
        query=torch.randn(sum(new_tokens), KV_HEADS * group, head_dim, generator=generator).to(DEVICE, dtype),
        key_cache=torch.randn(cache_shape, generator=generator).to(DEVICE, cache_dtype or dtype),
        value_cache=torch.randn(cache_shape, generator=generator).to(DEVICE, cache_dtype or dtype),
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor([length for length, _ in sequences], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, *itertools.accumulate(new_tokens)], dtype=torch.int32, device=DEVICE),
        tables=tables, sequences=list(sequences), block_size=block_size)


# Decodes at block edges and inside blocks, a fresh prompt, chunks over a cached prefix (one ending
# mid-block, one longer than a query block), all in one launch.
MIXED = [(1, 1), (15, 1), (16, 1), (17, 1), (70, 1), (23, 23), (40, 9), (100, 37), (33, 1)]


def check(out: torch.Tensor, batch: PagedBatch, dtype) -> None:
    tolerance = TOLERANCE[dtype]
    assert torch.allclose(out.float(), batch.reference(), atol=tolerance, rtol=tolerance), \
        (out.float() - batch.reference()).abs().max()


@pytest.mark.parametrize("head_dim, group", [(64, 1), (64, 3), (64, 4), (64, 8), (128, 1), (128, 3), (128, 4),
                                             (128, 8)])
def test_mixed_batch_matches_dense_attention(head_dim, group):
    batch = paged_batch(MIXED, group, head_dim, block_size=16, dtype=torch.float32)
    check(batch.run(), batch, torch.float32)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_block_sizes(dtype, block_size):
    batch = paged_batch(MIXED, 3, 64, block_size, dtype, seed=1)
    check(batch.run(), batch, dtype)


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                (torch.float32, torch.float8_e5m2),
                                                (torch.bfloat16, torch.float8_e5m2)])
def test_queries_read_a_narrower_cache(dtype, cache_dtype):
    """--kv-cache-dtype: keys and values kept narrower than the model, widened as read; the
    reference reads the same stored values, so the query dtype's tolerance holds."""
    batch = paged_batch(MIXED, 4, 64, 16, dtype, seed=6, cache_dtype=cache_dtype)
    check(batch.run(), batch, dtype)
    decodes = paged_batch([(1, 1), (40, 1), (300, 1)], 4, 64, 16, dtype, seed=7, cache_dtype=cache_dtype)
    check(decodes.run(num_splits=4), decodes, dtype)


def test_head_dim_that_is_not_a_power_of_two():
    batch = paged_batch([(5, 1), (30, 30), (50, 7)], 2, 80, 16, torch.float32, seed=2)
    check(batch.run(), batch, torch.float32)


@pytest.mark.parametrize("num_splits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decodes_match_dense_attention(dtype, num_splits):
    # Contexts shorter than one split (some splits see no key), and long ones split many ways.
    batch = paged_batch([(1, 1), (33, 1), (300, 1), (700, 1)], 4, 64, 16, dtype, seed=3)
    check(batch.run(num_splits=num_splits), batch, dtype)


def test_output_rows_may_be_a_strided_view():
    batch = paged_batch(MIXED, 3, 64, 16, torch.float32, seed=4)
    wide = torch.zeros(batch.query.shape[0], batch.query.shape[1] + 2, 64, device=DEVICE)
    out = batch.run(out=wide[:, 1:-1])
    check(out, batch, torch.float32)
    assert not wide[:, 0].any() and not wide[:, -1].any(), "only the view's rows are written"


def test_store_kv_writes_each_slot_and_skips_padding_rows():
    torch.manual_seed(5)
    tokens, kv_heads, head_dim, heads = 6, 2, 64, 6
    # Keys and values as the model has them: views into one fused projection output.
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE)
    key = fused[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = fused[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    key_cache = torch.zeros(40, kv_heads, head_dim, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.tensor([3, 17, -1, 0, 39, -1], device=DEVICE)
    store_kv(key, value, key_cache, value_cache, slot_mapping)
    real = slot_mapping >= 0
    assert torch.equal(key_cache[slot_mapping[real]], key[real])
    assert torch.equal(value_cache[slot_mapping[real]], value[real])
    untouched = torch.ones(40, dtype=torch.bool, device=DEVICE)
    untouched[slot_mapping[real]] = False
    assert not key_cache[untouched].any() and not value_cache[untouched].any()

    # A narrower cache (--kv-cache-dtype): rounded to nearest even, as torch rounds. Under the
    # interpreter the launcher narrows first (its own conversion truncates); on CUDA the kernel does.
    for keys, values in ((key, value), (key.to(torch.bfloat16), value.to(torch.bfloat16))):
        for narrow in (torch.bfloat16, torch.float8_e5m2):
            if narrow == keys.dtype:
                continue
            narrow_keys = torch.zeros_like(key_cache, dtype=narrow)
            narrow_values = torch.zeros_like(narrow_keys)
            store_kv(keys, values, narrow_keys, narrow_values, slot_mapping)
            # Compared as bytes: float8 has no torch.equal on the CPU.
            stored_keys, stored_values = narrow_keys.view(torch.uint8), narrow_values.view(torch.uint8)
            assert torch.equal(stored_keys[slot_mapping[real]], keys[real].to(narrow).view(torch.uint8))
            assert torch.equal(stored_values[slot_mapping[real]], values[real].to(narrow).view(torch.uint8))
            assert not stored_keys[untouched].any() and not stored_values[untouched].any()
