"""Random admit / grow / free / abort sequences against KVCacheManager, checked after every rule.

The test keeps a shadow of what each block holds: when a request that was handed a
block fresh fills it, the block's whole prefix is recorded. A prefix-cache hit is
correct only if the recorded prefix equals the new request's tokens up to that block.
"""

from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fake_request import FakeRequest
from kvcache import KVCacheManager

# Two token ids and short blocks: prefixes collide all the time.
prompts = st.lists(st.integers(0, 1), min_size=1, max_size=12)
sampled_tokens = st.lists(st.integers(0, 1), min_size=1, max_size=3)


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kv: KVCacheManager | None = None
        self.live: dict[str, FakeRequest] = {}
        self.fresh: dict[str, set[int]] = {}  # blocks each live request was handed new, so writes
        self.written: dict[int, tuple[int, ...]] = {}  # block id -> the prefix it ends
        self.num_requests = 0

    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(1, 12), caching=st.booleans())
    def make_manager(self, block_size, num_blocks, caching):
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)

    # -- rules ---------------------------------------------------------------------------------

    @rule(prompt=prompts, data=st.data())
    def admit(self, prompt, data):
        self.num_requests += 1
        request = FakeRequest(f"r{self.num_requests}", list(prompt))
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        size = self.kv.block_size
        assert num_hit_tokens == len(hits) * size < len(prompt)
        for index, block in enumerate(hits):
            assert self.written.get(block.block_id) == tuple(prompt[:(index + 1) * size])
        # Like a chunked prefill, the first step may cover only part of the rest.
        num_new = data.draw(st.integers(1, len(prompt) - num_hit_tokens), label="num_new")
        before = self.snapshot()
        new_blocks = self.kv.allocate_slots(request, num_new, hits)
        if new_blocks is None:
            assert self.snapshot() == before
            assert self.kv.block_ids(request.request_id) == []
            self.kv.free(request.request_id)  # aborting a request that never got blocks
            assert self.snapshot() == before
            return
        request.num_computed_tokens = num_hit_tokens + num_new
        self.live[request.request_id] = request
        self.fresh[request.request_id] = set()
        self.after_step(request, new_blocks)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data):
        """One more step: the rest of a chunked prefill, or decode after appending sampled tokens."""
        request = self.live[data.draw(st.sampled_from(sorted(self.live)), label="request")]
        if request.num_computed_tokens == len(request.all_token_ids):
            request.all_token_ids += data.draw(sampled_tokens, label="sampled")
        num_new = data.draw(
            st.integers(1, len(request.all_token_ids) - request.num_computed_tokens), label="num_new")
        before = self.snapshot()
        new_blocks = self.kv.allocate_slots(request, num_new)
        if new_blocks is None:  # the scheduler would preempt someone; here the request just waits
            assert self.snapshot() == before
            return
        request.num_computed_tokens += num_new
        self.after_step(request, new_blocks)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), by_id=st.booleans())
    def free(self, data, by_id):
        """Finish or abort a request (free takes the request or only its id)."""
        request = self.live.pop(data.draw(st.sampled_from(sorted(self.live)), label="request"))
        del self.fresh[request.request_id]
        self.kv.free(request.request_id if by_id else request)
        assert self.kv.block_ids(request.request_id) == []

    @rule()
    def reset_prefix_cache(self):
        self.kv.reset_prefix_cache()
        assert self.kv.pool.num_cached_blocks == 0

    # -- bookkeeping -----------------------------------------------------------------------------

    def after_step(self, request: FakeRequest, new_blocks) -> None:
        for block in new_blocks:
            self.written.pop(block.block_id, None)  # evicted: whatever it held is gone
            self.fresh[request.request_id].add(block.block_id)
        size = self.kv.block_size
        for index, block_id in enumerate(self.kv.block_ids(request.request_id)):
            if block_id in self.fresh[request.request_id] and (index + 1) * size <= request.num_computed_tokens:
                self.written[block_id] = tuple(request.all_token_ids[:(index + 1) * size])

    def snapshot(self):
        blocks = self.kv.pool.blocks
        return ([b.ref_count for b in blocks], [b.block_hash for b in blocks], self.kv.pool.num_free_blocks,
                {request_id: self.kv.block_ids(request_id) for request_id in self.live})

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def reference_counts_match_block_tables(self):
        if self.kv is None:
            return
        holders = Counter(b for request_id in self.live for b in self.kv.block_ids(request_id))
        for block in self.kv.pool.blocks:
            # Equal counts mean no block is leaked, freed twice, or below zero.
            assert block.ref_count == holders[block.block_id] >= 0
        assert self.kv.pool.num_free_blocks == sum(1 for b in self.kv.pool.blocks if b.ref_count == 0)

    @invariant()
    def tables_cover_exactly_the_computed_tokens(self):
        for request_id, request in self.live.items():
            block_ids = self.kv.block_ids(request_id)
            assert len(set(block_ids)) == len(block_ids)
            assert all(self.kv.pool.blocks[b].ref_count >= 1 for b in block_ids)
            assert len(block_ids) == -(-request.num_computed_tokens // self.kv.block_size)

    @invariant()
    def hash_index_is_consistent(self):
        if self.kv is None:
            return
        hashed = [b for b in self.kv.pool.blocks if b.block_hash is not None]
        assert all(self.kv.pool.lookup(b.block_hash) is b for b in hashed)
        assert self.kv.pool.num_cached_blocks == len(hashed)
        assert all(b.block_id in self.written for b in hashed)  # only filled blocks are indexed

    def teardown(self):
        if self.kv is None:
            return
        for request_id in list(self.live):
            self.kv.free(request_id)
        assert self.kv.pool.num_free_blocks == self.kv.pool.num_blocks
        assert all(block.ref_count == 0 for block in self.kv.pool.blocks)


KVCacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestKVCacheMachine = KVCacheMachine.TestCase
