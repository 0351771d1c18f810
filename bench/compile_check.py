"""Compile phaseattn's kernels for NVIDIA targets on a machine without a GPU, and read the compiler's report.

Triton ships ptxas and cuobjdump, so a kernel can be lowered all the way to a cubin for sm_90 (Hopper) or sm_80
(Ampere) with no device present. That catches what the interpreter cannot: code that does not compile (e.g. jit
globals that are not constexpr), register spills, shared memory over the limit, and whether the matrix products
became Hopper ``wgmma`` instructions. The arguments are specialised the way Triton's JIT specialises a real launch
(pointers and ints divisible by 16 get a divisibility hint, ints equal to 1 become constants).

It also reads the SASS of Triton's cubin (``nvdisasm``, shipped with Triton) and measures each innermost loop
(a backward branch with no other loop inside it): instructions per iteration, tensor-core FLOPs per iteration (from
the ``HGMMA``/``HMMA`` shapes), their ratio (instructions per tensor kFLOP, per warp: on sm_90 one SM's tensor
cores do 4096 dense bf16 FLOPs a clock and four schedulers issue one instruction each, so ratio × 1.024 is the
issue slots used per tensor-core cycle: near or above 1, the non-tensor work cannot hide behind the products),
integer/address and FMUL instructions, and TMA use. Counts are static (the loop's instructions, each once).

Run in a process of its own with ``TRITON_INTERPRET=0`` (kernels must be decorated in compiled mode):
``TRITON_INTERPRET=0 python bench/compile_check.py`` prints a table of every kernel's default configs (``--tuned``:
also the autotuning spaces on the benchmark shapes; ``--loops``: only the headline configs' loop metrics).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
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


_INTEGER_OPS = frozenset(
    [
        "IMAD",
        "IADD3",
        "IADD",
        "VIADD",
        "VIADDMNMX",
        "IMNMX",
        "IABS",
        "LEA",
        "LOP3",
        "LOP",
        "SHF",
        "SHL",
        "SHR",
        "SEL",
        "ISETP",
        "PRMT",
        "MOV",
        "SGXT",
        "BMSK",
        "POPC",
        "FLO",
        "BREV",
        "P2R",
        "R2P",
    ]
)  # integer ALU, address arithmetic and moves; their uniform-datapath forms (UIADD3, UMOV, ...) count too


@dataclass(frozen=True)
class Loop:
    """One innermost loop of a kernel's SASS, per warp and iteration (static counts)."""

    instructions: int
    tensor_flops: int  # dense tensor-core FLOPs one warp's share of the loop's HGMMA/HMMA instructions performs
    integer: int  # integer / address / move instructions (see _INTEGER_OPS)
    fmul: int
    ffma: int
    mufu: int
    tma_loads: int  # UTMALDG
    cp_async: int  # LDGSTS
    global_loads: int  # LDG
    branches: int  # forward branches inside the loop (then a static count overstates what one iteration runs)
    path_instructions: int  # the shortest way through one iteration (a rarely taken branch skipped)
    path_flops: int  # the tensor-core FLOPs on that way

    @property
    def per_kflop(self) -> float:
        """Instructions per tensor-core kFLOP (inf for a loop without tensor-core instructions)."""
        return self.instructions * 1000 / self.tensor_flops if self.tensor_flops else float("inf")

    @property
    def path_per_kflop(self) -> float:
        """The same along the shortest way through an iteration (equal to per_kflop for a loop without branches
        inside; below it where a rare case, e.g. a tile holding Inf/NaN, has a block of its own)."""
        return self.path_instructions * 1000 / self.path_flops if self.path_flops else float("inf")

    def line(self) -> str:
        path = f" (shortest way {self.path_instructions} instr {self.path_per_kflop:.2f}/kFLOP)"
        return (
            f"{self.instructions:5d} instr {self.per_kflop:5.2f}/kFLOP"
            + (path if self.path_instructions != self.instructions else "")
            + f" int {self.integer:3d} fmul {self.fmul:3d} "
            f"ffma {self.ffma:3d} mufu {self.mufu:3d} tma {self.tma_loads:2d} cp.async {self.cp_async:2d} "
            f"ldg {self.global_loads:2d}" + (f" fwd-branches {self.branches}" if self.branches else "")
        )


def _tensor_flops(op: str) -> int:
    """Dense FLOPs one warp's copy of a tensor-core instruction performs (0 for anything else). ``HGMMA.MxNxK``
    is a warpgroup (4 warps) instruction; ``HMMA.MNK`` (e.g. 16816) a per-warp one."""
    hgmma = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if hgmma:
        m, n, k = map(int, hgmma.groups())
        return 2 * m * n * k // 4
    hmma = re.match(r"HMMA\.(16)(8)(8|16)\b", op)
    if hmma:
        m, n, k = map(int, hmma.groups())
        return 2 * m * n * k
    return 0


def sass_loops(sass: str) -> list[Loop]:
    """The innermost loops of ``nvdisasm -c`` output, in code order."""
    labels: dict[str, int] = {}
    code: list[tuple[int, str, str, bool]] = []  # (address, opcode, operands, predicated)
    pending: list[str] = []
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);", line)
        if ins:
            addr = int(ins.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            code.append((addr, ins.group(3), ins.group(4), ins.group(2) is not None))
    # A loop's back edge is a backward branch inside the kernel's body: the blocks placed after its last EXIT
    # (mbarrier wait retries, divergent shuffle paths) jump back into it without being loops.
    end = max((addr for addr, op, _, _ in code if op == "EXIT"), default=code[-1][0] if code else 0)
    spans = []
    for addr, op, operands, _ in code:
        target = re.search(r"(\.L_x_\d+)", operands) if op.startswith("BRA") and addr < end else None
        if target and target.group(1) in labels and labels[target.group(1)] < addr:
            spans.append((labels[target.group(1)], addr))
    spans = [(lo, hi) for lo, hi in spans if hi - lo >= 16 * 4]  # not the 2-4 instruction mbarrier retry spins
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for lo, hi in sorted(innermost):
        inside = [(addr, op, operands, predicated) for addr, op, operands, predicated in code if lo <= addr <= hi]
        body = [(op, operands) for _, op, operands, _ in inside]
        path_instructions, path_flops = _shortest_way(inside, labels)
        base = [op.split(".")[0] for op, _ in body]
        loops.append(
            Loop(
                instructions=len(body),
                tensor_flops=sum(_tensor_flops(op) for op, _ in body),
                integer=sum(b in _INTEGER_OPS or (b[:1] == "U" and b[1:] in _INTEGER_OPS) for b in base),
                fmul=base.count("FMUL"),
                ffma=base.count("FFMA"),
                mufu=base.count("MUFU"),
                tma_loads=base.count("UTMALDG"),
                cp_async=base.count("LDGSTS"),
                global_loads=base.count("LDG"),
                branches=sum(b == "BRA" for b in base) - 1,
                path_instructions=path_instructions,
                path_flops=path_flops,
            )
        )
    return loops


def _shortest_way(inside: list[tuple[int, str, str, bool]], labels: dict[str, int]) -> tuple[int, int]:
    """(instructions, tensor FLOPs) of the shortest way from a loop's head to its back edge: the loop's code is a
    DAG once the back edge is dropped; branches that leave the loop (out-of-line retries) are taken as not taken."""
    inf = (1 << 62, 0)
    best = {inside[0][0]: (0, 0)}
    for index, (addr, op, operands, predicated) in enumerate(inside):
        here = best.get(addr, inf)
        after = (here[0] + 1, here[1] + _tensor_flops(op))
        if index == len(inside) - 1:
            return after
        target = re.search(r"(\.L_x_\d+)", operands) if op.startswith("BRA") else None
        if target and addr < labels.get(target.group(1), -1) <= inside[-1][0]:
            to = labels[target.group(1)]
            best[to] = min(best.get(to, inf), after)
        if not (op == "BRA" and not predicated):  # BRA.DIV / BRA.CONV fall through too
            nxt = inside[index + 1][0]
            best[nxt] = min(best.get(nxt, inf), after)
    return inf


def _disassemble(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {done.stderr[-2000:]}")
    return done.stdout


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
    tma: int = 0  # TMA instructions (UTMALDG/UTMASTG/...) anywhere in the kernel's SASS
    loops: tuple[Loop, ...] = ()  # innermost loops in code order
    sass: str = field(default="", repr=False)  # nvdisasm's listing, for reading what the counts count

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
    scalar, anything else (str, bool, or an int for a ``tl.constexpr`` parameter) as a compile-time constant; a
    callable is called with ``arch`` for its value (e.g. the launcher's per-architecture choice of a path).
    """
    args = {name: value(arch) if callable(value) else value for name, value in args.items()}
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
    sass = _disassemble(compiled.asm["cubin"])
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
        tma=len(re.findall(r"\bUTMA(?:LDG|STG|REDG|PF)\b", sass)),
        loops=tuple(sass_loops(sass)),
        sass=sass,
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
    """Example arguments of ``kernels.prefill._prefill_kernel`` for a contiguous (tokens, heads, dim) layout; the
    path is the launcher's (tensor descriptors for 16-bit inputs on sm_90) unless ``desc`` says which."""
    hq, hkv = 32, 8
    return {
        "Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Lse": torch.float32,
        "cu_seqlens_q": torch.int32, "cu_seqlens_k": torch.int32,
        "stride_qt": hq * head_dim, "stride_qh": head_dim, "stride_qd": 1,
        "stride_kt": hkv * head_dim, "stride_kh": head_dim, "stride_kd": 1,
        "stride_vt": hkv * head_dim, "stride_vh": head_dim, "stride_vd": 1,
        "stride_ot": hq * head_dim, "stride_oh": head_dim, "stride_od": 1,
        "Sinks": torch.float32,
        "num_q_heads": hq, "qk_scale": 0.1, "softcap": 0.0, "window": 7, "seqlen_bucket": 4096,
        "GROUP": hq // hkv, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_M": block_m, "BLOCK_N": block_n,
        "CAUSAL": flags.get("causal", True), "HAS_WINDOW": flags.get("window", False),
        "HAS_SOFTCAP": flags.get("softcap", False), "HAS_SINKS": flags.get("sinks", False), "STORE_LSE": True,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32", "USE_DESC": flags.get("desc", lambda arch: arch >= 90 and dtype != torch.float32),
    }  # fmt: skip


def prefill_reports(arch: int, tuned: bool) -> list[Report]:
    import kernels.prefill as prefill

    reports = []
    for head_dim in prefill.HEAD_DIMS:
        for dtype in (torch.bfloat16, torch.float32):
            cfg = prefill.default_config(head_dim, dtype, arch)
            configs = [(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])]
            if tuned and dtype == torch.bfloat16 and head_dim in (64, 128, 256):
                configs += [
                    c for c in prefill.TUNING_SPACE
                    if c not in configs and prefill._fits(
                        triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3]),
                        triton.next_power_of_2(head_dim), 2, arch >= 90)
                ]  # fmt: skip
            for bm, bn, warps, stages in configs:
                args = prefill_args(head_dim, dtype, bm, bn)
                name = f"prefill d{head_dim} {str(dtype)[6:]}"
                reports.append(compile_kernel(prefill._prefill_kernel, args, arch, warps, stages, name))
    return reports


def decode_args(head_dim: int, group: int, dtype: torch.dtype, block_n: int, fp8: bool = False, split: bool = False):
    """Example arguments of ``kernels.decode._decode_kernel``: contiguous q (batch, Hq, D), caches with 8 KV heads
    and page_size 16, an int32 block table of 256 columns; fp8 scales in memory (k) and as a float (v)."""
    hkv, page, hq = 8, 16, 8 * group
    cache = torch.float8_e4m3fn if fp8 else dtype
    return {
        "Q": dtype, "KCache": cache, "VCache": cache, "BlockTable": torch.int32, "SeqLens": torch.int32,
        "Out": dtype, "Lse": torch.float32, "PartOut": torch.float32, "PartLse": torch.float32, "Sinks": torch.float32,
        "k_scale": torch.float32 if fp8 else 1.0, "v_scale": 0.5 if fp8 else 1.0,
        "stride_qb": hq * head_dim, "stride_qh": head_dim, "stride_qd": 1,
        "stride_page": page * hkv * head_dim, "stride_token": hkv * head_dim, "stride_head": head_dim,
        "stride_cd": 1, "stride_btb": 256, "stride_btp": 1, "stride_sl": 1,
        "stride_ob": hq * head_dim, "stride_oh": head_dim, "stride_od": 1,
        "num_q_heads": hq, "qk_scale": 0.1, "softcap": 0.0, "window": 7, "occupancy": 1,
        "GROUP": group, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_H": max(16, triton.next_power_of_2(group)), "BLOCK_N": block_n, "PAGE_SIZE": page,
        "IS_FP8": fp8, "K_SCALE_IN_MEMORY": fp8, "V_SCALE_IN_MEMORY": False,
        "HAS_WINDOW": False, "HAS_SOFTCAP": False, "HAS_SINKS": True, "SPLIT": split, "STORE_LSE": True,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }  # fmt: skip


def decode_reports(arch: int, tuned: bool) -> list[Report]:
    """The decode kernel's default configs (every head dim, GQA 4 and MQA-like 32, bf16/fp8/fp32), the tuning
    space on the benchmark shape with ``tuned``, and the small kernels around it (KV write, the two merges)."""
    import kernels.decode as decode
    import kernels.kv_cache as kv_cache
    import kernels.merge as merge

    reports = []
    cases = [(d, 4, torch.bfloat16, False) for d in decode.HEAD_DIMS]
    cases += [(128, 4, torch.bfloat16, True), (256, 32, torch.bfloat16, True), (128, 32, torch.bfloat16, False)]
    cases += [(d, 4, torch.float32, fp8) for d in (64, 128, 256) for fp8 in (False, True)]
    for head_dim, group, dtype, fp8 in cases:
        if fp8 and arch < 89:  # float8_e4m3fn needs Ada/Hopper
            continue
        cfg = decode.default_config(head_dim, group, dtype)
        configs = [(cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])]
        if tuned and (head_dim, group, dtype) == (128, 4, torch.bfloat16):
            configs += [c for c in decode.TUNING_SPACE if c not in configs]
        for block_n, warps, stages in configs:
            args = decode_args(head_dim, group, dtype, block_n, fp8=fp8, split=True)
            name = f"decode d{head_dim} g{group} {str(dtype)[6:]}{' fp8' if fp8 else ''}"
            reports.append(compile_kernel(decode._decode_kernel, args, arch, warps, stages, name))
    for head_dim in (128, 256):
        block_d = triton.next_power_of_2(head_dim)
        merge_args = {
            "PartOut": torch.float32, "PartLse": torch.float32, "Out": torch.bfloat16, "Lse": torch.float32,
            "Sinks": torch.float32, "num_splits": 33, "num_q_heads": 32, "stride_ob": 32 * head_dim, "stride_oh": head_dim, "stride_od": 1,
            "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_S": max(16, 4096 // block_d), "HAS_SINKS": True,
            "STORE_LSE": True,
        }  # fmt: skip
        reports.append(compile_kernel(merge.merge_splits_kernel, merge_args, arch, 4, 1, f"merge splits d{head_dim}"))
        cache = torch.float8_e4m3fn if arch >= 89 else torch.bfloat16
        write_args = {
            "K": torch.bfloat16, "V": torch.bfloat16, "KCache": cache, "VCache": cache,
            "SlotMapping": torch.int64, "k_scale": torch.float32, "v_scale": 0.5, "num_tokens": 4096,
            "stride_kt": 8 * head_dim, "stride_kh": head_dim, "stride_kd": 1,
            "stride_vt": 8 * head_dim, "stride_vh": head_dim, "stride_vd": 1,
            "stride_page": 16 * 8 * head_dim, "stride_token": 8 * head_dim, "stride_head": head_dim, "stride_cd": 1,
            "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_T": max(8, 4096 // block_d), "PAGE_SIZE": 16,
            "IS_FP8": arch >= 89, "K_SCALE_IN_MEMORY": arch >= 89, "V_SCALE_IN_MEMORY": False,
        }  # fmt: skip
        name = f"write_kv_cache {str(cache)[6:]} d{head_dim}"
        reports.append(compile_kernel(kv_cache._write_kernel, write_args, arch, 4, 1, name))
        states_args = {
            "OutA": torch.bfloat16, "LseA": torch.float32, "OutB": torch.bfloat16, "LseB": torch.float32,
            "Out": torch.bfloat16, "Lse": torch.float32, "num_rows": 4096, "num_heads": 32,
            "stride_at": 32 * head_dim, "stride_ah": head_dim, "stride_ad": 1, "stride_lat": 32, "stride_lah": 1,
            "stride_bt": 32 * head_dim, "stride_bh": head_dim, "stride_bd": 1, "stride_lbt": 32, "stride_lbh": 1,
            "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_R": max(1, min(64, 4096 // block_d)),
        }  # fmt: skip
        reports.append(compile_kernel(merge._merge_states_kernel, states_args, arch, 4, 1, f"merge states d{head_dim}"))
    return reports


def paged_prefill_args(
    head_dim: int, group: int, dtype: torch.dtype, config: dict, fp8: bool = False, split: bool = False, **flags
) -> dict[str, object]:
    """Example arguments of ``kernels.paged_prefill._paged_prefill_kernel``: contiguous q (tokens, Hq, D), caches
    with 8 KV heads and page_size 16, an int32 block table of 2048 columns; ``config`` from ``launch_config``."""
    hkv, page, hq = 8, 16, 8 * group
    cache = torch.float8_e4m3fn if fp8 else dtype
    return {
        "Q": dtype, "KCache": cache, "VCache": cache, "BlockTable": torch.int32, "SeqLens": torch.int32,
        "CuSeqlensQ": torch.int32, "Sinks": torch.float32, "Out": dtype, "Lse": torch.float32,
        "PartOut": torch.float32, "PartLse": torch.float32,
        "k_scale": torch.float32 if fp8 else 1.0, "v_scale": 0.5 if fp8 else 1.0,
        "stride_qt": hq * head_dim, "stride_qh": head_dim, "stride_qd": 1,
        "stride_page": page * hkv * head_dim, "stride_token": hkv * head_dim, "stride_head": head_dim,
        "stride_cd": 1, "stride_btb": 2048, "stride_btp": 1, "stride_sl": 1,
        "stride_ot": hq * head_dim, "stride_oh": head_dim, "stride_od": 1,
        "batch": 4, "num_q_heads": hq, "qk_scale": 0.1, "softcap": 0.0, "window": 7,
        "GROUP": group, "GROUP_P": triton.next_power_of_2(group), "HEAD_DIM": head_dim,
        "BLOCK_D": triton.next_power_of_2(head_dim), "BLOCK_Q": config["BLOCK_Q"], "BLOCK_M": config["BLOCK_M"],
        "BLOCK_N": config["BLOCK_N"], "PAGE_SIZE": page, "IS_FP8": fp8, "K_SCALE_IN_MEMORY": fp8,
        "V_SCALE_IN_MEMORY": False, "CAUSAL": True, "HAS_WINDOW": flags.get("window", False),
        "HAS_SOFTCAP": flags.get("softcap", False), "HAS_SINKS": flags.get("sinks", True), "SPLIT": split,
        "STORE_LSE": True, "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }  # fmt: skip


PAGED_PREFILL_CASES = [  # (max_seqlen_q, group, head_dim, dtype, fp8): short (<= 16) and long query runs
    (4, 4, 128, torch.bfloat16, False),
    (16, 4, 128, torch.bfloat16, False),
    (16, 8, 256, torch.bfloat16, False),
    (512, 4, 128, torch.bfloat16, False),
    (512, 4, 64, torch.bfloat16, False),
    (512, 1, 256, torch.bfloat16, False),
    (512, 4, 96, torch.bfloat16, False),
    (512, 4, 128, torch.bfloat16, True),
    (4, 4, 128, torch.bfloat16, True),
    (512, 4, 128, torch.float32, False),
    (4, 4, 64, torch.float32, False),
]


def paged_prefill_reports(arch: int) -> list[Report]:
    """The paged prefill kernel at its launch configurations: short and long query runs, GQA 1/4/8, head dims
    64-256, bf16 / fp8 KV / fp32, window and sinks on (the most registers), split partials."""
    import kernels.paged_prefill as pp

    reports = []
    for max_q, group, head_dim, dtype, fp8 in PAGED_PREFILL_CASES:
        if fp8 and arch < 89:
            continue
        cfg = pp.launch_config(max_q, group, head_dim, dtype)
        args = paged_prefill_args(head_dim, group, dtype, cfg, fp8=fp8, split=True, window=True)
        name = f"paged_prefill q{max_q} g{group} d{head_dim} {str(dtype)[6:]}{' fp8' if fp8 else ''}"
        reports.append(compile_kernel(pp._paged_prefill_kernel, args, arch, cfg["num_warps"], cfg["num_stages"], name))
    return reports


HEADLINE_LOOPS = {"prefill": ("body", "masked"), "decode": ("loop",)}


def headline_reports(arch: int) -> list[Report]:
    """The headline configs whose innermost loops ``bench/NOTES.md`` tracks: bf16 causal prefill at head_dim 64,
    128 and 256 (no window, softcap or sinks) and bf16 decode (head_dim 128, GQA 4, split), default configs.
    A prefill report's loops are, in order, the unmasked body loop and the masked loop (diagonal, window edge)."""
    import kernels.decode as decode
    import kernels.prefill as prefill

    reports = []
    for head_dim in (64, 128, 256):
        cfg = prefill.default_config(head_dim, torch.bfloat16, arch)
        args = prefill_args(head_dim, torch.bfloat16, cfg["BLOCK_M"], cfg["BLOCK_N"])
        name = f"prefill d{head_dim} bf16 causal"
        reports.append(compile_kernel(prefill._prefill_kernel, args, arch, cfg["num_warps"], cfg["num_stages"], name))
    cfg = decode.default_config(128, 4, torch.bfloat16)
    args = decode_args(128, 4, torch.bfloat16, cfg["BLOCK_N"], split=True)
    reports.append(
        compile_kernel(decode._decode_kernel, args, arch, cfg["num_warps"], cfg["num_stages"], "decode d128 g4 bf16")
    )
    return reports


def loop_lines(report: Report) -> list[str]:
    """One line per innermost loop of ``report``, named as in HEADLINE_LOOPS where the kernel is known."""
    names = HEADLINE_LOOPS.get(report.kernel.split()[0], ())
    head = f"{report.kernel:24} sm_{report.arch} {report.config:14} regs {report.registers:3d} spills {report.spill_bytes:3d}"
    head += f" tma {report.tma:2d}"
    if not report.loops:
        return [f"{head}  (no loop)"]
    return [
        f"{head}  {names[i] if i < len(names) else f'loop{i}':6} {loop.line()}" for i, loop in enumerate(report.loops)
    ]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "0"})
    tuned = "--tuned" in sys.argv
    if "--loops" in sys.argv:  # only the headline configs' innermost-loop metrics
        for arch in (90, 80):
            for report in headline_reports(arch):
                print("\n".join(loop_lines(report)), flush=True)
        return 0
    failures = 0
    for arch in (90, 80):
        for report in prefill_reports(arch, tuned) + decode_reports(arch, tuned) + paged_prefill_reports(arch):
            print(report.line(), flush=True)
            failures += not report.ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
