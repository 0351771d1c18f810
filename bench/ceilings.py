"""The device's two ceilings, measured at the start of every run on the same device as the kernels:

- compute: a large bf16 matmul (torch.matmul, i.e. cuBLAS), in FLOP/s counted as 2·n³;
- bandwidth: a large device-to-device copy (``Tensor.copy_``), in bytes/s counted as bytes read plus written.

Every kernel figure of the run is also given as a fraction of these, so results from different devices compare.
"""

from __future__ import annotations

import torch

from bench import timing
from bench.results import Ceilings, measurement
from disagg import roofline


def measure_ceilings(device: torch.device, *, smoke: bool, warmup_ms: float, rep_ms: float) -> tuple[Ceilings, list]:
    """Measure both ceilings; return them and their two measurement entries for the results file."""
    n = 256 if smoke else 8192
    copy_elems = (4 << 20) if smoke else (1 << 30) // 4  # float32 elements: 16 MiB in smoke, 1 GiB on a GPU
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    src = torch.randn(copy_elems, device=device, dtype=torch.float32, generator=gen)
    dst = torch.empty_like(src)

    entries = []
    for name, fn, flops, nbytes, shape in (
        (
            "torch.matmul bf16",
            lambda: torch.matmul(a, b),
            roofline.gemm_flops(n, n, n),
            roofline.gemm_bytes(n, n, n, 2),
            {"m": n, "n": n, "k": n, "dtype": "bfloat16"},
        ),
        (
            "Tensor.copy_ device-to-device",
            lambda: dst.copy_(src),
            0.0,
            roofline.copy_bytes(src.numel() * src.element_size()),
            {"bytes": src.numel() * src.element_size()},
        ),
    ):
        _, first_s = timing.first_call(fn, device)
        t = timing.measure(fn, device, warmup_ms=warmup_ms, rep_ms=2 * rep_ms)
        entries.append(measurement("ceiling", name, "ceiling", shape, flops, nbytes, t, None, first_call_s=first_s))
    ceilings = Ceilings(
        matmul_flops=entries[0]["flops"] / (entries[0]["time_ms"] * 1e-3),
        copy_bandwidth=entries[1]["bytes"] / (entries[1]["time_ms"] * 1e-3),
    )
    return ceilings, entries
