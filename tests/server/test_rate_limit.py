"""The per-tenant token bucket on a fake clock: a minute's worth at first, refilled at the rate,
never above a minute's worth, and nothing charged for a refused request."""

import pytest

from server.rate_limit import RateLimited, TokenBucket


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_refills_at_its_rate_and_caps_at_a_minute():
    clock = Clock()
    bucket = TokenBucket(600, clock)  # 10 tokens a second
    bucket.take(600, "t")
    with pytest.raises(RateLimited) as refused:
        bucket.take(50, "t")
    assert refused.value.retry_after_s == 5
    clock.now += 5
    bucket.take(50, "t")  # exactly refilled
    clock.now += 3600
    bucket.take(600, "t")  # an hour idle still buys only a minute's worth
    with pytest.raises(RateLimited):
        bucket.take(1, "t")


def test_a_refused_request_is_not_charged():
    clock = Clock()
    bucket = TokenBucket(60, clock)
    bucket.take(50, "t")
    with pytest.raises(RateLimited):
        bucket.take(20, "t")
    bucket.take(10, "t")  # the 20 refused left the 10 in place


def test_a_request_larger_than_a_minute_is_refused_for_what_it_is():
    with pytest.raises(RateLimited, match="more than the limit of tenant 'batch', 60 tokens per minute"):
        TokenBucket(60, Clock()).take(61, "batch")
