"""Paged KV-cache block accounting with prefix caching.

Owns which physical blocks each request holds, their reference counts, and the
hash index that lets requests share full blocks of identical prefixes. It knows
nothing of tensors (the engine owns those) nor of scheduling (the scheduler
decides who gets blocks); it is pure Python and must not import torch or fastapi.
"""

from kvcache.block_pool import BlockPool, KVBlock
from kvcache.hashing import hash_block_tokens
from kvcache.manager import KVCacheManager, KVCacheStats

__all__ = ["BlockPool", "KVBlock", "KVCacheManager", "KVCacheStats", "hash_block_tokens"]
