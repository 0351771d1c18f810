"""``python -m kernels``: a short demonstration of the kernels on random inputs, checked against the float64
reference. Runs compiled on a GPU, or through Triton's interpreter on CPU."""

from __future__ import annotations

import time

import torch

import kernels
from kernels.reference import prefill_attention_ref


def main() -> None:
    device = "cpu" if kernels.INTERPRET else "cuda"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    lengths = [5, 130, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total, hq, hkv, d = sum(lengths), 8, 2, 128
    q = torch.randn(total, hq, d, device=device, dtype=dtype)
    k = torch.randn(total, hkv, d, device=device, dtype=dtype)
    v = torch.randn(total, hkv, d, device=device, dtype=dtype)
    start = time.perf_counter()
    out = kernels.prefill_attention(q, k, v, cu, cu, causal=True)
    elapsed = time.perf_counter() - start
    ref, _ = prefill_attention_ref(q, k, v, cu, cu, causal=True)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    mode = "Triton interpreter (CPU)" if kernels.INTERPRET else f"compiled on {torch.cuda.get_device_name()}"
    print(f"prefill_attention: {len(lengths)} sequences {lengths}, {hq}/{hkv} heads, head_dim {d}, {dtype}")
    print(f"  mode: {mode}; first call {elapsed:.2f} s (includes compilation)")
    print(f"  relative error vs float64 reference: {err:.2e}")


if __name__ == "__main__":
    main()
