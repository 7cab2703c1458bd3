"""Per-tenant token rate limits (`tokens_per_minute` in the tenants file), as OpenAI counts them.

A request is charged, when it is admitted, its prompt tokens plus its `max_tokens` for
every choice: what it may cost, known before it runs (OpenAI charges the same way and
refunds nothing). Each tenant has a bucket that refills continuously at its rate and
holds at most one minute's worth, so a tenant idle for a minute may send a minute's
tokens at once, and no more.
"""

from dataclasses import dataclass
import math
import time
from typing import Callable


class RateLimited(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class TokenBucket:
    tokens_per_minute: int
    clock: Callable[[], float] = time.monotonic
    level: float | None = None  # tokens available; full at first
    updated: float = 0.0

    def take(self, num_tokens: int, tenant: str) -> None:
        """Charge `num_tokens`, or raise RateLimited (charging nothing) with how long to wait."""
        if num_tokens > self.tokens_per_minute:
            raise RateLimited(f"this request may use {num_tokens} tokens (its prompt plus max_tokens for each "
                              f"choice), more than the limit of tenant {tenant!r}, {self.tokens_per_minute} tokens "
                              "per minute: lower max_tokens or shorten the prompt", retry_after_s=60)
        now = self.clock()
        rate_per_s = self.tokens_per_minute / 60
        if self.level is None:
            self.level = float(self.tokens_per_minute)
        else:
            self.level = min(float(self.tokens_per_minute), self.level + (now - self.updated) * rate_per_s)
        self.updated = now
        if num_tokens > self.level:
            wait_s = (num_tokens - self.level) / rate_per_s
            raise RateLimited(f"tenant {tenant!r} is over its limit of {self.tokens_per_minute} tokens per minute "
                              f"(this request may use {num_tokens}); retry in {wait_s:.1f} s",
                              retry_after_s=max(1, math.ceil(wait_s)))
        self.level -= num_tokens
