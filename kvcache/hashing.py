"""Chained hashes of full token blocks, the keys of the prefix cache."""

from array import array
import hashlib
from typing import Sequence

# A block's hash covers its parent's hash and its own tokens, so equal hashes mean
# equal whole prefixes. SHA-256 makes a collision (one request reading another's KV)
# practically impossible, which Python's hash() would not.
ROOT_HASH = b""


def root_hash(cache_salt: str) -> bytes:
    """The parent of a request's first block: a salt makes its whole chain its own.

    Requests with different salts never share a block, so one tenant cannot learn
    from a fast first token that another sent the same prefix (vLLM's `cache_salt`).
    """
    return hashlib.sha256(b"salt\0" + cache_salt.encode()).digest() if cache_salt else ROOT_HASH


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        cache_salt: str = "") -> None:
    """Append the hashes of every full block of `token_ids` not yet in `hashes`."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(hashes), num_full_blocks):
        parent = hashes[index - 1] if index else root_hash(cache_salt)
        start = index * block_size
        hashes.append(hash_block_tokens(parent, token_ids[start:start + block_size]))
