"""Compile phaseattn's kernels for NVIDIA targets on a machine without a GPU, and read the compiler's report.

Triton ships ptxas and cuobjdump, so a kernel can be lowered all the way to a cubin for sm_90 (Hopper) or sm_80
(Ampere) with no device present. That catches what the interpreter cannot: code that does not compile (e.g. jit
globals that are not constexpr), register spills, shared memory over the limit, and whether the matrix products
became Hopper ``wgmma`` instructions. The arguments are specialised the way Triton's JIT specialises a real launch
(pointers and ints divisible by 16 get a divisibility hint, ints equal to 1 become constants).

Run in a process of its own with ``TRITON_INTERPRET=0`` (kernels must be decorated in compiled mode):
``TRITON_INTERPRET=0 python bench/compile_check.py`` prints a table of every kernel's default and tuned configs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (H100, A100)
_TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass
class Report:
    kernel: str
    arch: int
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: int
    mma_sync: int
    cp_async: int

    @property
    def ok(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= SMEM_LIMIT[self.arch]

    def line(self) -> str:
        return (
            f"{self.kernel:28} sm_{self.arch} {self.config:34} regs {self.registers:3d} spills {self.spill_bytes:4d} "
            f"smem {self.shared_bytes // 1024:4d} KiB wgmma {self.wgmma:3d} mma.sync {self.mma_sync:3d} "
            f"cp.async {self.cp_async:3d} {'ok' if self.ok else 'SPILLS/SMEM'}"
        )


def compile_kernel(
    fn, args: dict[str, object], arch: int, num_warps: int, num_stages: int, name: str | None = None
) -> Report:
    """Compile ``fn`` (a JITFunction) for sm_``arch``.

    ``args`` maps every parameter name to an example: a torch dtype for a pointer argument, an int or float for a
    scalar, anything else (str, bool, or an int for a ``tl.constexpr`` parameter) as a compile-time constant.
    """
    constexpr_params = {p.name for p in fn.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = args[param.name]
        if param.name in constexpr_params or isinstance(value, (str, bool)):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.dtype):
            signature[param.name] = "*" + _TRITON_DTYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1:
            signature[param.name] = "constexpr"
            constexprs[param.name] = 1
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    usage = _ptxas_report(ptx, arch)
    consts = {k: v for k, v in constexprs.items() if k.isupper()}
    return Report(
        kernel=name or fn.__name__,
        arch=arch,
        config=f"{consts.get('BLOCK_M', '')}x{consts.get('BLOCK_N', '')} w{num_warps} s{num_stages}",
        registers=usage["REG"],
        spill_bytes=usage["SPILL"],
        shared_bytes=compiled.metadata.shared,
        wgmma=ptx.count("wgmma.mma_async"),
        mma_sync=ptx.count("mma.sync"),
        cp_async=ptx.count("cp.async."),
    )


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes as ptxas reports them (``ptxas -v``) for the PTX Triton generated."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch).path  # the same ptxas Triton itself used for this arch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch_flag = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        done = subprocess.run(
            [str(tool), f"-arch={arch_flag}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    text = done.stdout + done.stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    registers = re.search(r"Used (\d+) registers", text)
    if done.returncode != 0 or registers is None:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    return {"REG": int(registers.group(1)) if registers else -1, "SPILL": spills}


def prefill_args(head_dim: int, dtype: torch.dtype, block_m: int, block_n: int, **flags) -> dict[str, object]:
    """Example arguments of ``kernels.prefill._prefill_kernel`` for a contiguous (tokens, heads, dim) layout."""
    hq, hkv = 32, 8
    return {
        "Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Lse": torch.float32,
        "cu_seqlens_q": torch.int32, "cu_seqlens_k": torch.int32,
        "stride_qt": hq * head_dim, "stride_qh": head_dim, "stride_qd": 1,
        "stride_kt": hkv * head_dim, "stride_kh": head_dim, "stride_kd": 1,
        "stride_vt": hkv * head_dim, "stride_vh": head_dim, "stride_vd": 1,
        "stride_ot": hq * head_dim, "stride_oh": head_dim, "stride_od": 1,
        "num_q_heads": hq, "qk_scale": 0.1, "softcap": 0.0, "window": 7, "seqlen_bucket": 4096,
        "GROUP": hq // hkv, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_M": block_m, "BLOCK_N": block_n,
        "CAUSAL": flags.get("causal", True), "HAS_WINDOW": flags.get("window", False),
        "HAS_SOFTCAP": flags.get("softcap", False), "STORE_LSE": True,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }  # fmt: skip


def prefill_reports(arch: int, tuned: bool) -> list[Report]:
    import kernels.prefill as prefill

    reports = []
    for head_dim in prefill.HEAD_DIMS:
        for dtype in (torch.bfloat16, torch.float32):
            cfg = prefill.default_config(head_dim, dtype)
            configs = [(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])]
            if tuned and dtype == torch.bfloat16 and head_dim in (64, 128, 256):
                configs += [
                    c for c in prefill.TUNING_SPACE
                    if c not in configs and prefill._fits(
                        triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_stages=c[3]),
                        triton.next_power_of_2(head_dim), 2)
                ]  # fmt: skip
            for bm, bn, warps, stages in configs:
                args = prefill_args(head_dim, dtype, bm, bn)
                name = f"prefill d{head_dim} {str(dtype)[6:]}"
                reports.append(compile_kernel(prefill._prefill_kernel, args, arch, warps, stages, name))
    return reports


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "0"})
    tuned = "--tuned" in sys.argv
    failures = 0
    for arch in (90, 80):
        for report in prefill_reports(arch, tuned):
            print(report.line(), flush=True)
            failures += not report.ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
