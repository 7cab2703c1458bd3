"""Freed memory goes back to the OS: what a fragmented heap keeps resident, a trim releases.
And start-up's objects stay out of the cyclic collector's walks while the server runs."""

import gc
import json
import subprocess
import sys
import weakref

import pytest

from server.memory import frozen_startup_heap, release_free_memory

FRAGMENT_AND_TRIM = """
import json, os
from server.memory import release_free_memory

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blocks = [bytearray(4000) for _ in range(50_000)]  # ~200 MB from malloc (over pymalloc's 512 bytes)
survivors = blocks[::64]  # one in 64 lives on, so the heap cannot shrink from its top
del blocks
before = resident()
released = release_free_memory()
print(json.dumps({"before": before, "after": resident(), "released": released, "kept": len(survivors)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not release_free_memory(),
                    reason="needs glibc's malloc_trim on Linux")
def test_a_trim_gives_a_fragmented_heaps_free_pages_back():
    result = json.loads(subprocess.run([sys.executable, "-c", FRAGMENT_AND_TRIM], capture_output=True, text=True,
                                       check=True).stdout)
    assert result["released"]
    # ~197 MB of the ~200 MB freed sat between survivors; most of it leaves the resident set.
    assert result["before"] - result["after"] > 100e6, result


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_the_startup_heap_is_frozen_without_its_garbage_and_thawed_after():
    garbage = Node()
    garbage_ref = weakref.ref(garbage)
    del garbage
    kept = Node()
    with frozen_startup_heap():
        assert garbage_ref() is None, "start-up's garbage was frozen instead of collected"
        assert gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects()), "a start-up object is still walked"
        kept_ref = weakref.ref(kept)
        del kept
        gc.collect()
        assert kept_ref() is not None  # frozen: out of reach until thawed
        fresh = Node()
        fresh_ref = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_ref() is None  # what the server makes later is collected as ever
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert kept_ref() is None
