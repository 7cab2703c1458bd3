"""Giving freed memory back to the OS, so a long-running server's resident memory tracks what
it holds rather than the most it ever touched.

glibc's malloc keeps pages it has freed inside its arenas (the main heap, and one per thread
that allocates: the engine thread, torch's workers, the tokenizer thread). A page between
live chunks stays resident, so varying tensor and request sizes ratchet the resident set up
over hours although nothing leaks: in issue 13's 60-minute soak all growth after warm-up was
in the arenas, and one trim 40 minutes in released 192 MiB of it (BENCHMARKS.md).
`malloc_trim(0)` hands every whole free page of every arena back (madvise), in milliseconds;
the server calls it once a minute. Elsewhere (musl, macOS) it does nothing.

Python's collector is the other cost of a large heap: see `frozen_startup_heap`.
"""

import asyncio
from contextlib import contextmanager
import ctypes
import ctypes.util
from functools import cache
import gc
import logging
from typing import Iterator

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


@contextmanager
def frozen_startup_heap() -> Iterator[None]:
    """Within: every object alive at entry is out of the cyclic collector's reach.

    What start-up leaves (the model's modules, the tokenizer, the routes: some 340k objects in
    the front end, 380k in the engine process) lives as long as the server, yet every full
    collection walked all of it, 200+ ms with the GIL held: a stall every stream saw, twice
    in a 20-second burst (BENCHMARKS.md, session 15). Collecting first keeps start-up's
    garbage out of the frozen set; thawing at the end lets the interpreter free it all on
    the way out, as libraries checking for leaks at exit (nanobind's) expect.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
