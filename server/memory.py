"""Giving freed memory back to the OS, so a long-running server's resident memory tracks what
it holds rather than the most it ever touched.

glibc's malloc keeps pages it has freed inside its arenas (the main heap, and one per thread
that allocates: the engine thread, torch's workers, the tokenizer thread). A page between
live chunks stays resident, so varying tensor and request sizes ratchet the resident set up
over hours although nothing leaks: in issue 13's 60-minute soak all growth after warm-up was
in the arenas, and one trim 40 minutes in released 192 MiB of it (BENCHMARKS.md).
`malloc_trim(0)` hands every whole free page of every arena back (madvise), in milliseconds;
the server calls it once a minute. Elsewhere (musl, macOS) it does nothing.
"""

import asyncio
import ctypes
import ctypes.util
from functools import cache
import logging

logger = logging.getLogger(__name__)

TRIM_INTERVAL_S = 60.0


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):  # no libc found, or one without malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return malloc's free pages to the OS; whether this libc can (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def release_periodically(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Until cancelled: every `interval_s`, `release_free_memory` off the event loop."""
    if _malloc_trim() is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(release_free_memory)
