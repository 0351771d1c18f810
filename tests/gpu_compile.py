"""Compile the kernels' launches for an H100 (sm_90) on a machine without a GPU: ``python -m tests.gpu_compile``.

The interpreter never runs Triton's compiler front end, so code that only the compiler rejects (a global that is not
a ``tl.constexpr`` instance, branches returning different types, a shape the tensor cores cannot take) passes every
interpreted test. This script runs the public launchers in compiled mode on CPU tensors with the kernel objects
replaced by recorders, then compiles each recorded launch (the first autotune config that survives pruning) to a
cubin with the same signature, constants and 16-byte divisibility hints Triton's JIT would derive. Exit status 1
if any launch fails to compile.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before kernels is imported: its kernels must be compiled-mode JITFunctions

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels
import kernels.decode
import kernels.kv_cache
import kernels.merge
import kernels.prefill
from kernels import _runtime

TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int32: "i32",
    torch.int64: "i64",
}
KERNELS = [
    (kernels.decode, "_kernel"),
    (kernels.decode, "merge_splits_kernel"),
    (kernels.merge, "_merge_states_kernel"),
    (kernels.kv_cache, "_write_kernel"),
    (kernels.prefill, "_kernel"),
]


class Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def specialize(fn, bound):
    """(signature, constexprs, attrs) as Triton's JIT derives them from the arguments."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif type(value) is int:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        else:
            signature[param.name], aligned = "fp32", False
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def prepare(kernel, args, kwargs):
    """(fn, signature, constexprs, attrs, options) of one recorded launch; an autotuned kernel gets the first
    config that survives its pruning."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    fn = kernel
    if isinstance(kernel, triton.runtime.Autotuner):
        fn = kernel.fn
        configs = kernel.configs
        prune = getattr(kernel, "early_config_prune", None)
        if prune:
            configs = prune(configs, dict(zip(fn.arg_names, args, strict=False)), **kwargs)
        kwargs |= configs[0].kwargs
        options = {"num_warps": configs[0].num_warps, "num_stages": configs[0].num_stages}
    signature, constexprs, attrs = specialize(fn, dict(zip(fn.arg_names, args, strict=False)) | kwargs)
    return fn, signature, constexprs, attrs, options


def run_launchers() -> None:
    """One call per distinct kernel specialisation worth compiling (dtypes, fp8, split, window/softcap)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    table = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    seq_lens = torch.tensor([3, 30], dtype=torch.int32)
    for dtype, d, group, page, fp8, splits, options in [
        (torch.bfloat16, 128, 4, 16, False, 1, {}),
        (torch.bfloat16, 128, 4, 16, False, 3, {}),
        (torch.float16, 96, 8, 8, False, 2, {"window": 30, "softcap": 5.0}),
        (torch.bfloat16, 128, 4, 16, True, 1, {}),
        (torch.float32, 64, 1, 256, False, 1, {}),
    ]:
        cache_dtype = torch.float8_e4m3fn if fp8 else dtype
        k_cache, v_cache = (rand(8, page, 2, d, dtype=cache_dtype) for _ in range(2))
        scales = {"k_scale": torch.ones(1), "v_scale": 0.5} if fp8 else {}
        q = rand(2, 2 * group, d, dtype=dtype)
        kernels.paged_decode_attention(
            q, k_cache, v_cache, table, seq_lens, num_splits=splits, return_lse=True, **scales, **options
        )
        if dtype == torch.bfloat16:
            new = rand(5, 2, d, dtype=torch.float16 if fp8 else dtype)
            kernels.write_kv_cache(new, new, k_cache, v_cache, torch.arange(5, dtype=torch.int32), **scales)
        if dtype == torch.bfloat16 and not fp8:
            lse = torch.randn(2, 2 * group, generator=g)
            kernels.merge_attention_states(q, lse, q, lse)
            cu = torch.tensor([0, 30], dtype=torch.int32)
            qkv = rand(30, 2 * group, d, dtype=dtype)
            kernels.prefill_attention(qkv, qkv[:, :2], qkv[:, :2], cu, cu, window=options.get("window"))


def main() -> int:
    assert not kernels.INTERPRET
    _runtime.DEVICE_TYPE = "cpu"  # let the launchers accept CPU tensors; nothing is ever launched
    launches = []
    for module, name in KERNELS:
        setattr(module, name, Recorder(getattr(module, name), launches))
    run_launchers()
    target = GPUTarget("cuda", 90, 32)
    seen, errors = set(), []
    for kernel, args, kwargs in launches:
        fn, signature, constexprs, attrs, options = prepare(kernel, args, kwargs)
        key = repr((fn.__name__, signature, constexprs, attrs, options))
        if key in seen:
            continue
        seen.add(key)
        try:
            triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            print(f"ok   {fn.__name__} {constexprs}", flush=True)
        except Exception as e:  # report every failure, not only the first
            errors.append(f"{fn.__name__} {constexprs}: {e}")
            print("FAIL " + errors[-1], flush=True)
    print(f"{len(seen)} launches compiled for sm_90, {len(errors)} failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
