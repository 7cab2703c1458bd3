"""The CPU's two draws as the sampler and draw tests run them: torch's ops, and the C++ kernel
in each build this CPU runs."""

import pytest

from engine import cpu_kernels


DRAWS = ["torch", *(build.isa for build in cpu_kernels.runnable_builds())]


def kernel_of(draw: str):
    if draw == "torch":
        return None
    kernel = cpu_kernels.load(draw)
    if kernel is None:
        pytest.skip("no compiler here: the engine samples with torch's ops")
    return kernel
