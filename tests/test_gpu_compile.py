"""The kernels compile for an H100 (sm_90) even on a machine without a GPU (see tests/gpu_compile.py): the
interpreter skips Triton's compiler front end, so this is the CPU suite's only guard against code that only the
compiler rejects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import ON_CUDA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="on a GPU every kernel test compiles its kernels for real")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.gpu_compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "0 failed" in done.stdout
