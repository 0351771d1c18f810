"""The kernels compile for Hopper (sm_90) and Ampere (sm_80) with no GPU present, without spills.

Triton ships ptxas, so each kernel's default config is lowered to a cubin here and the compiler's resource report is
read (see bench/compile_check.py). This catches what the interpreter cannot: code that only fails when compiled,
register spills, shared memory over the limit, and whether the products became Hopper wgmma instructions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compile(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("arch", [90, 80])
def test_prefill_default_configs_compile_without_spills(arch):
    out = _compile(
        "import torch, kernels.prefill as P\n"
        "from compile_check import compile_kernel, prefill_args\n"
        "for d in (64, 96, 128, 256):  # 96: a head dim below its power-of-two tile, masked along d\n"
        "    for dtype in (torch.bfloat16, torch.float32):\n"
        f"        c = P.default_config(d, dtype, {arch})\n"
        "        r = compile_kernel(P._prefill_kernel, prefill_args(d, dtype, c['BLOCK_M'], c['BLOCK_N'], window=True),\n"
        f"                           {arch}, c['num_warps'], c['num_stages'], f'd{{d}} {{dtype}}')\n"
        "        print(r.line())\n"
    )
    lines = out.strip().splitlines()
    assert len(lines) == 8 and all(line.endswith(" ok") for line in lines), out
    bf16 = [line for line in lines if "bfloat16" in line]
    if arch == 90:  # Hopper's tensor-core instructions, not the Ampere fallback
        assert all(" wgmma   0 " not in line for line in bf16), out
    else:
        assert all(" mma.sync   0 " not in line for line in bf16), out


@pytest.mark.parametrize("arch", [90, 80])
def test_decode_default_configs_compile_without_spills(arch):
    # The benchmark shape (GQA 4, head_dim 128) direct and split, a large q tile (MQA-like group 32, head_dim 256),
    # fp32 (the CPU tests' dtype), fp8 KV where the architecture has it, and the KV write and split merge.
    out = _compile(
        "import torch, kernels.decode as D, kernels.kv_cache as W, kernels.merge as M\n"
        "from compile_check import compile_kernel, decode_args\n"
        "cases = [(128, 4, torch.bfloat16, False, False), (128, 4, torch.bfloat16, False, True),\n"
        "         (256, 32, torch.bfloat16, False, True), (128, 4, torch.float32, False, True)]\n"
        f"if {arch} >= 89:\n"
        "    cases += [(128, 4, torch.bfloat16, True, True), (128, 4, torch.float32, True, True)]\n"
        "for d, g, dtype, fp8, split in cases:\n"
        "    c = D.default_config(d, g, dtype)\n"
        "    r = compile_kernel(D._decode_kernel, decode_args(d, g, dtype, c['BLOCK_N'], fp8=fp8, split=split),\n"
        f"                       {arch}, c['num_warps'], c['num_stages'], f'd{{d}} g{{g}} {{dtype}} fp8={{fp8}}')\n"
        "    print(r.line())\n"
    )
    lines = out.strip().splitlines()
    assert len(lines) == (6 if arch >= 89 else 4) and all(line.endswith(" ok") for line in lines), out
    bf16 = [line for line in lines if "bfloat16" in line]
    assert all(" mma.sync   0 " not in line for line in bf16), out  # scores and P·V on tensor cores
    assert all(" cp.async   0 " not in line for line in bf16), out  # K/V tiles loaded asynchronously


@pytest.mark.parametrize("arch", [90, 80])
def test_paged_prefill_launch_configs_compile_without_spills(arch):
    # Short (<= 16 queries: decode-like packed tiles) and long (prefill-like) query runs, GQA 1/4/8, head dims
    # 64-256, bf16, fp8 KV where the architecture has it, fp32; window and sinks on, split partials.
    out = _compile(
        "from compile_check import paged_prefill_reports\n"
        f"for r in paged_prefill_reports({arch}):\n"
        "    print(r.line())\n"
    )
    lines = out.strip().splitlines()
    assert len(lines) == (11 if arch >= 89 else 9) and all(line.endswith(" ok") for line in lines), out
    assert all(" mma.sync   0 " not in line or " wgmma   0 " not in line for line in lines if "bfloat16" in line), out


@pytest.mark.parametrize("arch", [90, 80])
def test_headline_loops_are_measured_from_sass(arch):
    # bench/compile_check.py --loops: the innermost loops of the headline prefill configs (unmasked body, masked)
    # and of decode, found in the SASS, with their tensor-core work; the numbers themselves live in bench/NOTES.md.
    # Prefill on sm_90 loads K/V by TMA in both loops (the descriptor path), on sm_80 by cp.async; no spills.
    out = _compile(
        "from compile_check import headline_reports\n"
        f"for r in headline_reports({arch}):\n"
        "    print(r.kernel, r.spill_bytes, len(r.loops), *(f'{x.path_per_kflop:.3f}' for x in r.loops),\n"
        "          *(x.integer for x in r.loops), *(x.fmul for x in r.loops), *(x.tma_loads for x in r.loops),\n"
        "          *(x.cp_async for x in r.loops), sep=',')\n"
    )
    rows = [line.split(",") for line in out.strip().splitlines()]
    assert [r[0] for r in rows] == [*(f"prefill d{d} bf16 causal" for d in (64, 128, 256)), "decode d128 g4 bf16"], out
    for row in rows:
        loops = int(row[2])
        assert row[1] == "0" and loops == (2 if row[0].startswith("prefill") else 1), out
        per_kflop = [float(x) for x in row[3 : 3 + loops]]
        assert all(0.05 < x < 20 for x in per_kflop), out  # a loop of tensor-core products, a few ops per kFLOP
        integer, fmul, tma, cp_async = (row[3 + loops * i : 3 + loops * (i + 1)] for i in range(1, 5))
        assert all(int(x) > 0 for x in integer + fmul), out  # integer and FMUL work is found and counted
        if row[0].startswith("prefill"):
            assert all(int(x) > 0 for x in (tma if arch == 90 else cp_async)), out
            assert all(int(x) == 0 for x in (cp_async if arch == 90 else tma)), out
