"""The mode switch (compiled vs interpreted) and the interpreter's bf16/fp8 corrections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import prefill_attention
from kernels.reference import prefill_attention_ref
from tests.util import ON_CUDA, cu_seqlens, randn, rel_err

ROOT = Path(__file__).resolve().parents[1]
interpreter_only = pytest.mark.skipif(ON_CUDA, reason="the corrections exist only in interpreter mode")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


def test_mode_follows_the_hardware_without_any_variable():
    done = _python("import torch, kernels; print(kernels.INTERPRET, torch.cuda.is_available())")
    assert done.returncode == 0, done.stderr
    interpret, cuda = done.stdout.split()
    assert interpret == str(cuda == "False")


@pytest.mark.skipif(ON_CUDA, reason="on a GPU machine TRITON_INTERPRET=0 is the normal mode")
def test_user_setting_wins_and_gives_a_clear_error():
    code = (
        "import torch, kernels\n"
        "assert not kernels.INTERPRET\n"
        "q = torch.randn(4, 1, 32); cu = torch.tensor([0, 4], dtype=torch.int32)\n"
        "try:\n    kernels.prefill_attention(q, q, q, cu, cu)\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    done = _python(code, TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr
    assert "ERR q is on cpu" in done.stdout and "CUDA tensors" in done.stdout


@interpreter_only
def test_triton_imported_before_kernels_still_works():
    # triton.language's own @jit helpers (tl.zeros, tl.sum) were decorated before interpreter mode was chosen.
    code = (
        "import triton, triton.language, torch, kernels\n"
        "q = torch.randn(70, 2, 32); cu = torch.tensor([0, 70], dtype=torch.int32)\n"
        "print(kernels.prefill_attention(q, q, q, cu, cu).isfinite().all().item())\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


@interpreter_only
def test_corrections_are_active_in_interpreter_mode():
    from kernels import _interpreter_fixes

    assert kernels.INTERPRET and _interpreter_fixes.is_active()


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bf16_attention_is_wrong_without_the_corrections(gen, dtype):
    """The same call is right with the corrections and garbage without: the fix is what makes CPU bf16 work."""
    from kernels import _interpreter_fixes

    q = randn(40, 2, 64, dtype=dtype, generator=gen)
    cu = cu_seqlens([40])
    ref, _ = prefill_attention_ref(q, q, q, cu, cu)
    assert rel_err(prefill_attention(q, q, q, cu, cu), ref) < 1e-2
    _interpreter_fixes.remove()
    try:
        broken = prefill_attention(q, q, q, cu, cu)
    finally:
        assert _interpreter_fixes.apply()
    assert not rel_err(broken, ref) < 1e-2
    assert rel_err(prefill_attention(q, q, q, cu, cu), ref) < 1e-2


@interpreter_only
def test_rounding_helpers_match_torch():
    from kernels._interpreter_fixes import bf16_bits_to_f32, f32_to_bf16_bits

    x = torch.cat(
        [
            torch.randn(10000) * 10 ** torch.randint(-30, 30, (10000,)).float(),
            torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), 3.3895e38]),
        ]
    )
    ours = torch.from_numpy(f32_to_bf16_bits(x.numpy()).view("int16")).view(torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    back = bf16_bits_to_f32(ours.view(torch.int16).numpy().view("uint16"))
    assert torch.equal(torch.from_numpy(back), ours.float())


def test_kernels_demo_runs_and_agrees_with_the_references():
    done = subprocess.run(
        [sys.executable, "-m", "kernels"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    errors = [
        float(line.split("rel. error ")[1].split()[0]) for line in done.stdout.splitlines() if "rel. error" in line
    ]
    assert len(errors) == 3 and all(e < 1e-2 for e in errors), done.stdout
