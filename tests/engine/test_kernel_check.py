"""The Triton kernels compile for real GPUs, checked on any host (engine/kernel_check.py).

The interpreter (test_triton_attention.py) proves what the kernels compute; this proves that
ptxas takes every configuration the engine may launch for a Turing GPU (the oldest, with the
least shared memory per block: 64 KB) and a Hopper one (the GPUs of issue 9), and that no
program asks for more shared memory than one block may have there.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it)")

from engine.kernel_check import SHAPES, STEPS  # noqa: E402

ARCHS = (75, 90)


def test_every_kernel_compiles_for_turing_and_hopper_within_their_shared_memory(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    # One process per architecture: the two compile side by side.
    runs = {arch: subprocess.Popen([sys.executable, "-m", "engine.kernel_check", "--arch", str(arch),
                                    "--json", str(tmp_path / f"sm_{arch}.json")],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for arch in ARCHS}
    outputs = {arch: run.communicate(timeout=1200)[0] for arch, run in runs.items()}
    for arch, run in runs.items():
        assert run.returncode == 0, outputs[arch]
        report = json.loads((tmp_path / f"sm_{arch}.json").read_text())[str(arch)]
        assert report and all(kernel["ok"] for kernel in report)
        configs = {kernel["config"] for kernel in report}
        kernels = {kernel["kernel"] for kernel in report}
        assert kernels == {"store_kv_kernel", "unified_attention_kernel", "split_decode_kernel", "merge_splits_kernel"}
        float8 = {config for config in configs if "float8_e5m2 cache" in config}
        # The caches each model dtype allows: bfloat16 and float16 their own and float8; float32
        # its own, bfloat16, float16 and float8. Below Ampere, none of float8.
        caches = 8 if arch >= 80 else 5
        assert len(configs) == caches * len(SHAPES) * len(STEPS), sorted(configs)
        assert (len(float8) > 0) == (arch >= 80), "float8 caches are written from Ampere on (see select_backend)"

