"""The smallest thing KVCacheManager reads of a request, so kvcache tests need no scheduler."""

from dataclasses import dataclass, field


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    cache_salt: str = ""
