"""The scheduler's snapshot for metrics: what it says, and that it does not move with the scheduler."""

from collections import Counter

from scheduler.stats import snapshot
from tests.scheduler.scheduler_sim import make_request, make_scheduler, step


def test_a_snapshot_counts_by_tenant_and_stays_as_taken():
    scheduler = make_scheduler(max_num_seqs=2, num_blocks=32, block_size=4, enable_prefix_caching=False)
    for index, tenant in enumerate(["chat", "chat", "batch"]):
        request = make_request(f"r{index}", [1, 2, 3, 4, 5, 6], max_tokens=4)
        request.tenant = tenant
        scheduler.add_request(request)
    step(scheduler)
    stats = snapshot(scheduler, by_tenant=True)
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    assert stats.running_by_tenant == Counter(chat=2) and stats.waiting_by_tenant == Counter(batch=1)
    assert stats.kv_blocks_by_tenant == Counter(chat=4)  # 6 prompt slots each in blocks of 4; batch holds none
    assert stats.kv_cache.num_free_blocks == 28 and stats.token_budget == scheduler.token_budget
    while scheduler.has_unfinished_requests():
        step(scheduler)
    # Taken before: the scheduler has moved on, the snapshot has not.
    assert stats.num_running == 2 and stats.kv_cache.num_free_blocks == 28
    assert not snapshot(scheduler).running_by_tenant  # counted only when asked
