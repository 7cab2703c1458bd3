"""Our C++ CPU kernel (engine/csrc), compiled on first use and cached.

Compiled on the machine that runs it (`-march=native`), into `$ITERSERVE_CACHE/kernels`;
torch rebuilds it when the source changes. Where no compiler is available the engine
falls back to the pure-torch attention path and says so once.
"""

import logging
import os
from functools import cache
from pathlib import Path

from engine.embedded_model import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"


@cache
def load():
    """The compiled module, or None when it cannot be built (or ITERSERVE_CPU_KERNELS=0)."""
    if os.environ.get("ITERSERVE_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        build_dir = cache_dir() / "kernels"
        build_dir.mkdir(parents=True, exist_ok=True)
        return load_extension(
            name="iterserve_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, an unsupported platform
        log.warning("CPU attention kernel unavailable (%s); using the slower pure-torch path", error)
        return None
