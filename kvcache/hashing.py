"""Chained hashes of full token blocks, the keys of the prefix cache."""

from array import array
import hashlib
from typing import Sequence

# A block's hash covers its parent's hash and its own tokens, so equal hashes mean
# equal whole prefixes. SHA-256 makes a collision (one request reading another's KV)
# practically impossible, which Python's hash() would not.
ROOT_HASH = b""


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int) -> None:
    """Append the hashes of every full block of `token_ids` not yet in `hashes`."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(hashes), num_full_blocks):
        parent = hashes[index - 1] if index else ROOT_HASH
        start = index * block_size
        hashes.append(hash_block_tokens(parent, token_ids[start:start + block_size]))
