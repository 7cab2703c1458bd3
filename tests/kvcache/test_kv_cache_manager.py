"""KVCacheManager and BlockPool by hand: prefix hits, LRU eviction, refusals, stats, hashing."""

import pytest

from fake_request import FakeRequest
from kvcache import BlockPool, KVCacheManager, KVCacheStats, hash_block_tokens
from kvcache.hashing import ROOT_HASH


def admit(kv: KVCacheManager, request_id: str, token_ids: list[int], cache_salt: str = "") -> FakeRequest:
    """Look up the prefix cache and allocate the whole prompt, as the scheduler admits a request."""
    request = FakeRequest(request_id, list(token_ids), cache_salt=cache_salt)
    hits, num_hit_tokens = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, len(token_ids) - num_hit_tokens, hits) is not None
    request.num_computed_tokens = len(token_ids)
    return request


def num_hit_tokens(kv: KVCacheManager, token_ids: list[int], cache_salt: str = "") -> int:
    _, num_hits = kv.get_computed_blocks(FakeRequest("probe", list(token_ids), cache_salt=cache_salt))
    kv.free("probe")  # the manager remembers a request's block hashes until it is freed
    return num_hits


def pool_state(kv: KVCacheManager, *request_ids: str):
    blocks = kv.pool.blocks
    return ([b.ref_count for b in blocks], [b.block_hash for b in blocks], kv.pool.num_free_blocks,
            kv.pool.num_cached_blocks, [kv.block_ids(r) for r in request_ids])


# -- hashing ------------------------------------------------------------------------------


def test_block_hash_covers_parent_and_tokens():
    parent_a = hash_block_tokens(ROOT_HASH, [3, 4])
    parent_b = hash_block_tokens(ROOT_HASH, [5, 6])
    assert hash_block_tokens(parent_a, [1, 2]) == hash_block_tokens(parent_a, [1, 2])
    assert hash_block_tokens(parent_a, [1, 2]) != hash_block_tokens(parent_b, [1, 2])
    assert hash_block_tokens(parent_a, [1, 2]) != hash_block_tokens(parent_a, [2, 1])
    assert hash_block_tokens(ROOT_HASH, [1, 2]) != hash_block_tokens(parent_a, [1, 2])


def test_equal_block_after_different_parent_is_not_a_hit():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    kv.free(admit(kv, "a", [3, 4, 1, 2, 9]))
    # The second block [1, 2] is equal, but its prefix is not: nothing may be shared.
    assert num_hit_tokens(kv, [5, 6, 1, 2, 9]) == 0
    assert num_hit_tokens(kv, [3, 4, 1, 2, 9]) == 4


def test_a_salt_shares_blocks_only_with_the_same_salt():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    prompt = [3, 4, 1, 2, 9]
    kv.free(admit(kv, "a", prompt, cache_salt="tenant-a"))
    assert num_hit_tokens(kv, prompt, cache_salt="tenant-a") == 4
    assert num_hit_tokens(kv, prompt, cache_salt="tenant-b") == 0
    assert num_hit_tokens(kv, prompt) == 0  # unsalted requests do not see salted blocks either


# -- prefix hits ----------------------------------------------------------------------------


def test_freed_cached_blocks_are_reused_by_an_identical_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = admit(kv, "a", list(range(9)))
    first_blocks = kv.block_ids("a")
    kv.free(first)
    assert kv.pool.num_free_blocks == 8

    second = FakeRequest("b", list(range(9)))
    hits, num_hits = kv.get_computed_blocks(second)
    assert num_hits == 8
    assert [b.block_id for b in hits] == first_blocks[:2]
    new_blocks = kv.allocate_slots(second, 1, hits)
    assert len(new_blocks) == 1
    assert kv.block_ids("b")[:2] == first_blocks[:2]
    assert [kv.pool.blocks[i].ref_count for i in first_blocks[:2]] == [1, 1]


def test_blocks_shared_by_live_requests_are_freed_with_the_last_holder():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    admit(kv, "a", [1, 2, 3, 4, 5])
    admit(kv, "b", [1, 2, 3, 4, 6])
    shared = kv.block_ids("a")[:2]
    assert kv.block_ids("b")[:2] == shared
    assert [kv.pool.blocks[i].ref_count for i in shared] == [2, 2]
    kv.free("a")
    assert [kv.pool.blocks[i].ref_count for i in shared] == [1, 1]
    assert kv.pool.num_free_blocks == 6 - 3
    kv.free("b")
    assert kv.pool.num_free_blocks == 6


@pytest.mark.parametrize("prompt_len, expected_hit_tokens", [(4, 0), (5, 4), (8, 4), (9, 8)])
def test_last_prompt_token_is_never_served_from_cache(prompt_len, expected_hit_tokens):
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(prompt_len))
    kv.free(admit(kv, "a", prompt))
    # Everything is cached, yet the last token is left to compute: its logits are sampled.
    again = FakeRequest("b", prompt)
    hits, num_hits = kv.get_computed_blocks(again)
    assert num_hits == expected_hit_tokens < prompt_len
    assert kv.allocate_slots(again, prompt_len - num_hits, hits) is not None
    assert len(kv.block_ids("b")) == -(-prompt_len // 4)


# -- eviction ----------------------------------------------------------------------------------


def test_least_recently_freed_is_evicted_first_and_tails_before_heads():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.free(admit(kv, "a", [0, 1, 2, 3]))
    kv.free(admit(kv, "b", [4, 5, 6, 7]))
    a_blocks, b_blocks = [0, 1], [2, 3]  # handed out in order from a fresh pool
    evicted = []
    for index in range(4):
        admit(kv, f"new{index}", [9, 9])  # each new request takes one block
        evicted.append(kv.block_ids(f"new{index}")[0])
        kv.free(f"new{index}")
    assert evicted == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]


def test_hit_then_free_makes_a_prefix_most_recently_used():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.free(admit(kv, "a", [0, 1, 2, 3, 4, 5]))  # three blocks
    kv.free(admit(kv, "b", [6, 7]))
    kv.free(admit(kv, "a-again", [0, 1, 2, 3, 4, 5]))  # hits a's first two blocks, frees them last
    admit(kv, "c", [9, 9, 9])  # takes two blocks: b's (freed before a's), then a's tail
    assert num_hit_tokens(kv, [0, 1, 2, 3, 4, 5, 9]) == 4
    assert num_hit_tokens(kv, [6, 7, 9]) == 0


# -- refusals -----------------------------------------------------------------------------------


def test_allocate_slots_refuses_a_new_request_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    admit(kv, "a", [0, 1, 2, 3])
    before = pool_state(kv, "a", "b")
    assert kv.allocate_slots(FakeRequest("b", [7, 7, 7, 7]), 4) is None
    assert pool_state(kv, "a", "b") == before
    assert kv.block_ids("b") == []


def test_allocate_slots_refuses_growth_and_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=2)
    request = admit(kv, "a", [0, 1, 2, 3])
    request.all_token_ids.append(4)
    before = pool_state(kv, "a")
    assert kv.allocate_slots(request, 1) is None
    assert pool_state(kv, "a") == before


def test_free_hits_are_not_counted_as_room_for_new_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    kv.free(admit(kv, "a", [0, 1, 2, 3, 4]))
    request = FakeRequest("b", [0, 1, 2, 3, 5, 6, 7])
    hits, num_hits = kv.get_computed_blocks(request)
    assert num_hits == 4 and kv.pool.num_free_blocks == 3
    before = pool_state(kv, "b")
    # Two new blocks are needed; three are free, but two of those are the hits themselves.
    assert kv.allocate_slots(request, 3, hits) is None
    assert pool_state(kv, "b") == before
    assert num_hit_tokens(kv, [0, 1, 2, 3, 5]) == 4


def test_pool_rejects_bad_sizes_and_double_release():
    with pytest.raises(ValueError):
        BlockPool(0)
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=4, block_size=0)
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.allocate(3)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(RuntimeError):
        pool.release(blocks)
    assert pool.num_free_blocks == 2 and blocks[0].ref_count == 0


# -- stats ----------------------------------------------------------------------------------------


def test_usage_and_prefix_cache_stats_count_tokens():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    assert kv.usage == 0.0
    admit(kv, "a", [0, 1, 2])
    assert kv.usage == 0.5
    admit(kv, "b", [0, 1, 5])
    assert kv.stats() == KVCacheStats(
        num_blocks=4, num_free_blocks=1, usage=0.75, prefix_cache_queries=6, prefix_cache_hits=2)
    kv.free("a")
    kv.free("b")
    assert kv.usage == 0.0


def test_a_refused_admission_is_not_counted_as_a_query():
    kv = KVCacheManager(num_blocks=2, block_size=2)
    admit(kv, "a", [0, 1, 2])
    blocks, _ = kv.get_computed_blocks(FakeRequest("b", [0, 1, 2, 3, 4, 5]))
    assert kv.allocate_slots(FakeRequest("b", [0, 1, 2, 3, 4, 5]), 4, blocks) is None
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (3, 0)


def test_disabled_prefix_cache_never_hits_nor_counts():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    kv.free(admit(kv, "a", [0, 1, 2, 3, 4]))
    assert num_hit_tokens(kv, [0, 1, 2, 3, 4]) == 0
    assert kv.pool.num_cached_blocks == 0
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)


def test_reset_prefix_cache_forgets_every_prefix():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.free(admit(kv, "a", [0, 1, 2, 3, 4]))
    kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 0
    assert num_hit_tokens(kv, [0, 1, 2, 3, 4]) == 0
    assert kv.pool.num_free_blocks == 4


# -- the swap pool --------------------------------------------------------------------------


def test_swap_out_and_in_move_a_request_between_the_pools():
    kv = KVCacheManager(num_blocks=6, block_size=2, num_host_blocks=4)
    request = admit(kv, "a", [1, 2, 3, 4, 5])
    device_blocks = kv.block_ids("a")
    assert kv.can_swap_out(request)
    pairs = kv.swap_out(request)
    assert [device for device, _ in pairs] == device_blocks and len({host for _, host in pairs}) == 3
    assert kv.is_swapped("a") and kv.block_ids("a") == []
    assert kv.pool.num_free_blocks == 6 and kv.num_free_host_blocks == 1
    back = kv.swap_in(request)
    assert [host for host, _ in back] == [host for _, host in pairs]  # the same host blocks, in order
    assert [device for _, device in back] == kv.block_ids("a")
    assert not kv.is_swapped("a") and kv.num_free_host_blocks == 4 and kv.pool.num_free_blocks == 3
    request.num_computed_tokens = 5
    assert kv.allocate_slots(request, 1) == []  # the swapped-in table serves the next token
    kv.free(request)
    assert kv.pool.num_free_blocks == 6 and kv.num_free_host_blocks == 4


def test_swap_refusals_change_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=2, num_host_blocks=2)
    big = admit(kv, "big", [1, 2, 3, 4, 5])  # three blocks: more than the swap pool holds
    assert not kv.can_swap_out(big)
    small = admit(kv, "small", [7, 8])
    kv.swap_out(small)
    admit(kv, "filler", [9, 9])  # the device pool is full again
    assert kv.swap_in(small) is None and kv.is_swapped("small")
    kv.free("small")  # an abort while swapped out returns its host blocks
    assert kv.num_free_host_blocks == 2 and not kv.is_swapped("small")
