"""The one place that decides how phaseattn's Triton kernels run: compiled on CUDA, or interpreted on CPU.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` *decorates* a function, so the decision has to be taken
before any kernel module of this package is imported: ``kernels/__init__.py`` imports this module first.

The rule: a ``TRITON_INTERPRET`` set by the user wins; otherwise kernels are compiled when a CUDA device is
present and interpreted on CPU tensors when not. Interpreter mode sets ``TRITON_INTERPRET=1`` for the process
(Triton itself consults it lazily, e.g. when importing its Gluon front end; compiled Triton cannot run without a
GPU anyway). In interpreter mode the numeric defects of Triton's interpreter for bfloat16 and fp8 are corrected
(see :mod:`kernels._interpreter_fixes`).
"""

from __future__ import annotations

import os

import torch

_TRUE = ("1", "true", "yes", "on")


def _decide_interpret() -> bool:
    user = os.environ.get("TRITON_INTERPRET")
    if user is not None and user.strip() != "":
        return user.strip().lower() in _TRUE
    return not torch.cuda.is_available()


INTERPRET: bool = _decide_interpret()
"""True when the kernels run in Triton's interpreter (on CPU tensors), False when compiled (CUDA tensors)."""

if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE_TYPE: str = "cpu" if INTERPRET else "cuda"
"""The torch device type the kernels accept in this process."""

_debug = os.environ.get("PHASEATTN_DEBUG", "").strip().lower() in _TRUE

AUTOTUNE: bool = not INTERPRET and os.environ.get("PHASEATTN_AUTOTUNE", "1").strip().lower() in _TRUE
"""Whether launchers autotune tile shapes on the GPU (the default). ``PHASEATTN_AUTOTUNE=0`` uses each kernel's
heuristic config instead: no benchmarking on first call (useful for tests and CUDA-graph warm-up)."""


def set_debug(enabled: bool) -> None:
    """Turn on checks that need a device-to-host sync (index ranges, cu_seqlens values) on CUDA tensors too."""
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    return _debug


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise a clear error when a tensor lives where this process's kernels cannot run."""
    if t.device.type != DEVICE_TYPE:
        if INTERPRET:
            raise ValueError(
                f"{name} is on {t.device}, but phaseattn runs its kernels in Triton's interpreter in this process "
                f"(no CUDA device was found at import, or TRITON_INTERPRET=1 was set): pass CPU tensors"
            )
        raise ValueError(f"{name} is on {t.device}: phaseattn's compiled kernels need CUDA tensors")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Host code uses this, not ``triton.next_power_of_2``: that is a
    Triton constexpr function (a wrapper that unwraps its arguments), several µs per call on a launch path."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints (``triton.cdiv`` is a constexpr-function wrapper too, see next_power_of_2)."""
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors (a nominal 132 when interpreting, so heuristics stay deterministic)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def arch(device: torch.device) -> int:
    """Compute capability as major * 10 + minor (90 for Hopper) of a CUDA device; 90 when interpreting."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def values_checkable(t: torch.Tensor) -> bool:
    """Whether checking a tensor's values costs nothing (CPU) or the user asked for syncs (debug mode). Never
    while torch.compile traces: values are unknown then, and reading them would break the graph."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _debug


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output. Every launcher allocates through here, so tests can poison outputs (NaN) and
    prove that each element is written."""
    return torch.empty(shape, dtype=dtype, device=device)
