"""Elementwise bf16 / fp8 semantics in interpreter mode match what the GPU computes (torch's CPU ops as judge)."""

from __future__ import annotations

import pytest
import torch

from tests import numerics_kernels as nk
from tests.util import ON_CUDA

pytestmark = pytest.mark.skipif(ON_CUDA, reason="checks the interpreter's corrections")


def test_bf16_elementwise_reductions_and_dot(gen):
    n = 32
    x = torch.randn(n, n, generator=gen).bfloat16()
    y = torch.randn(n, n, generator=gen).bfloat16()
    out = torch.empty(n, n, dtype=torch.bfloat16)
    rows = torch.empty(n, dtype=torch.float32)
    nk.bf16_ops[(1,)](x, y, out, rows, N=n)
    xf, yf = x.float(), y.float()
    w = ((xf * yf).bfloat16().float() + xf).bfloat16().float()
    w = (w - yf).bfloat16().float()
    w = torch.maximum(w, -yf).bfloat16()
    expect = ((xf @ yf) + w.float()).bfloat16()
    assert torch.equal(out.view(torch.int16), expect.view(torch.int16))
    # Row max of negative and positive values compares values, not bit patterns.
    assert torch.equal(rows, w.float().max(1).values + w.float().min(1).values)


def test_fp32_to_fp8_rounds_to_nearest_and_saturates(gen):
    n = 64
    x = torch.cat([torch.randn(n - 6, generator=gen) * 50, torch.tensor([1.97, 500.0, -1000.0, 2e-3, 448.0, 0.0])])
    out = torch.empty(n, dtype=torch.float8_e4m3fn)
    back = torch.empty(n, dtype=torch.float32)
    nk.to_fp8[(1,)](x, out, back, N=n)
    expect = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8))
    assert torch.equal(back, expect.float())
