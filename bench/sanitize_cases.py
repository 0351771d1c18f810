"""Small kernel launches for compute-sanitizer (memcheck): varlen GQA with odd lengths, every masking path.

Run: ``compute-sanitizer --tool memcheck python bench/sanitize_cases.py`` (with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so
each tensor is its own allocation and an out-of-bounds access cannot land silently in a neighbour).
"""

import torch

import kernels


def prefill_cases() -> None:
    lens_q, lens_k = [1, 37, 0, 129, 255], [3, 37, 5, 200, 255]
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    for head_dim in (64, 96, 128, 256):
        q = torch.randn(sum(lens_q), 8, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sum(lens_k), 2, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for kw in ({}, {"window": 33}, {"causal": False, "softcap": 5.0}):
            kernels.prefill_attention(q, k, v, cq, ck, return_lse=True, **kw)
    torch.cuda.synchronize()
    print("prefill cases ran")


if __name__ == "__main__":
    prefill_cases()
