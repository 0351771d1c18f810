"""Correct bfloat16 and fp8 arithmetic in Triton's CPU interpreter (interpreter mode only).

Triton's interpreter (3.6 through 3.9) stores bfloat16 values as their raw uint16 bit patterns and fp8 values
as uint8, then runs numpy on those patterns: ``+ * - max sum exp`` and ``tl.dot`` on bfloat16 operands return
garbage, fp32 -> bf16 casts truncate instead of rounding to nearest even, and fp32 -> fp8 casts mis-round and do
not saturate (upstream: triton-lang/triton#11584, closed as unsupported).

:func:`apply` patches the interpreter's builder so that every floating-point operation on bfloat16 operands is
computed in float32 and rounded back to bfloat16 (round to nearest even), and fp8 conversions go through torch's
conversions with the GPU's saturating semantics. It also skips a redundant per-call re-patching of
triton.language that made device-function calls slow (see :func:`_patch_language_once_per_launch`). The compiled
(CUDA) path never imports or touches this module.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

SUPPORTED_TRITON = ((3, 6), (3, 9))
"""Inclusive range of triton (major, minor) versions whose interpreter internals this patch was written for."""

_FP8_TORCH = {
    tl.float8e4nv: torch.float8_e4m3fn,
    tl.float8e5: torch.float8_e5m2,
    tl.float8e4b8: torch.float8_e4m3fnuz,
    tl.float8e5b16: torch.float8_e5m2fnuz,
}

_originals: dict[tuple[type, str], object] = {}


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _is_bf16(dtype) -> bool:
    return dtype.scalar == tl.bfloat16


def _is_fp8(dtype) -> bool:
    return dtype.scalar in _FP8_TORCH


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> uint16 bfloat16 bit patterns, rounded to nearest even as the GPU does (NaN kept)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    if nan.any():
        out = np.where(nan, (bits >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040), out)
    return out


def _fp8_to_f32(bits: np.ndarray, dtype) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint8)).view(_FP8_TORCH[dtype.scalar])
    return t.to(torch.float32).numpy()


def _f32_to_fp8(x: np.ndarray, dtype) -> np.ndarray:
    torch_dtype = _FP8_TORCH[dtype.scalar]
    limit = torch.finfo(torch_dtype).max
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = torch.where(torch.isnan(t), t, t.clamp(-limit, limit))  # the GPU's cvt.satfinite saturates
    return t.to(torch_dtype).view(torch.uint8).numpy()


def _decode(handle) -> np.ndarray:
    """A TensorHandle's values as numpy numbers (bf16/fp8 decoded to float32)."""
    if _is_bf16(handle.dtype):
        return bf16_bits_to_f32(handle.data)
    if _is_fp8(handle.dtype):
        return _fp8_to_f32(handle.data, handle.dtype)
    return handle.data


def _encode(values: np.ndarray, dtype) -> np.ndarray:
    """numpy values -> the interpreter's storage for ``dtype`` (bf16/fp8 rounded the way the GPU rounds)."""
    if _is_bf16(dtype):
        return f32_to_bf16_bits(np.asarray(values, dtype=np.float32))
    if _is_fp8(dtype):
        return _f32_to_fp8(np.asarray(values, dtype=np.float32), dtype)
    from triton.runtime.interpreter import _get_np_dtype

    return np.asarray(values).astype(_get_np_dtype(dtype))


def _patch(cls: type, name: str):
    def decorator(fn):
        original = getattr(cls, name)
        _originals.setdefault((cls, name), original)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(original, *args, **kwargs)

        setattr(cls, name, wrapper)
        return wrapper

    return decorator


def interpret_stdlib() -> None:
    """Make triton.language's own ``@jit`` helpers (tl.zeros, tl.sum, tl.cdiv, ...) interpretable.

    They are decorated when triton.language is first imported. If that happened before interpreter mode was
    chosen (a user who imported triton before phaseattn on a machine without a GPU), they are compiled-mode
    JITFunctions that the interpreter cannot call; re-wrap them as InterpretedFunctions.
    """
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    converted: dict[int, InterpretedFunction] = {}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("triton.language") or module is None:
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in converted:
                    converted[id(value)] = InterpretedFunction(value.fn)
                setattr(module, name, converted[id(value)])


def apply() -> bool:
    """Patch the interpreter (idempotent). Returns whether the corrections are active."""
    interpret_stdlib()
    if _originals:
        return True
    lo, hi = SUPPORTED_TRITON
    if not lo <= _triton_version() <= hi:
        return False
    from triton.runtime import interpreter as interp

    builder, handle_cls = interp.InterpreterBuilder, interp.TensorHandle
    needed = (
        "binary_op",
        "unary_op",
        "ternary_op",
        "create_fma",
        "create_dot",
        "cast_impl",
        "create_fp_to_fp",
    )
    if not all(hasattr(builder, n) for n in needed) or not hasattr(interp.ReduceOps, "sum"):
        return False

    @_patch(builder, "binary_op")
    def binary_op(original, self, lhs, rhs, op):
        if not (_is_bf16(lhs.dtype) or _is_bf16(rhs.dtype)):
            return original(self, lhs, rhs, op)
        out = op(_decode(lhs), _decode(rhs))
        if out.dtype == np.bool_:
            return handle_cls(out, tl.int1)
        return handle_cls(_encode(out, lhs.dtype), lhs.dtype.scalar)

    @_patch(builder, "unary_op")
    def unary_op(original, self, arg, op):
        if not _is_bf16(arg.dtype):
            return original(self, arg, op)
        return handle_cls(_encode(op(_decode(arg)), arg.dtype), arg.dtype.scalar)

    @_patch(builder, "ternary_op")
    def ternary_op(original, self, lhs, rhs, other, op):
        if not _is_bf16(other.dtype):
            return original(self, lhs, rhs, other, op)
        out = op(_decode(lhs), _decode(rhs), _decode(other))
        return handle_cls(_encode(out, other.dtype), other.dtype.scalar)

    @_patch(builder, "create_fma")
    def create_fma(original, self, x, y, z):
        if not _is_bf16(z.dtype):
            return original(self, x, y, z)
        out = _decode(x).astype(np.float64) * _decode(y) + _decode(z)
        return handle_cls(_encode(out.astype(np.float32), z.dtype), z.dtype.scalar)

    @_patch(builder, "create_dot")
    def create_dot(original, self, a, b, d, input_precision, max_num_imprecise_acc):
        if not any(_is_bf16(t.dtype) or _is_fp8(t.dtype) for t in (a, b, d)):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = _decode(d).astype(np.float32)
        out = np.matmul(_decode(a).astype(np.float32), _decode(b).astype(np.float32)) + acc
        return handle_cls(_encode(out, d.dtype), d.dtype.scalar)

    @_patch(builder, "cast_impl")
    def cast_impl(original, self, src, dst_type):
        if not (_is_bf16(src.dtype) or _is_bf16(dst_type) or _is_fp8(src.dtype) or _is_fp8(dst_type)):
            return original(self, src, dst_type)
        return handle_cls(_encode(_decode(src), dst_type), dst_type.scalar)

    # create_fp_trunc / create_fp_ext / *_to_fp / fp_to_* are class-level lambdas calling self.cast_impl.

    @_patch(builder, "create_fp_to_fp")
    def create_fp_to_fp(original, self, src, dst_type, rounding_mode):
        return handle_cls(_encode(_decode(src).astype(np.float32), dst_type), dst_type.scalar)

    def _reduce_patch(cls, name):
        @_patch(cls, name)
        def reduce(original, self, input, *args, **kwargs):
            value = input[0] if isinstance(input, tuple) else input
            if not _is_bf16(value.dtype):
                return original(self, input, *args, **kwargs)
            decoded = self.to_tensor(_decode(value.handle), tl.float32)
            result = original(self, decoded, *args, **kwargs)
            return _cast_results(self, result, value.dtype.scalar)

        return reduce

    def _cast_results(self, result, dtype):
        if isinstance(result, (tuple, list)):
            return type(result)(_cast_results(self, r, dtype) for r in result)
        if result.dtype.scalar == tl.float32:
            data = result.handle.data
            return tl.core.tensor(handle_cls(_encode(data, dtype), dtype), result.type.with_element_ty(dtype))
        return result

    _reduce_patch(interp.ReduceOps, "sum")
    _reduce_patch(interp.ReduceOps, "min_max")
    if hasattr(interp.ScanOps, "cumsum"):
        _reduce_patch(interp.ScanOps, "cumsum")
        _reduce_patch(interp.ScanOps, "cumprod")
    if hasattr(interp, "_patch_lang") and hasattr(interp, "_LangPatchScope"):
        _patch_language_once_per_launch(interp)
    return True


def _patch_language_once_per_launch(interp) -> None:
    """Speed, not numerics: the interpreter re-patches triton.language (an ``inspect.getmembers`` scan of several
    modules, ~5-10 ms) on *every* call of a ``@triton.jit`` device function, although within a launch the same
    language modules were already patched (by the launch or by an earlier call) and a nested patch is never
    undone. Kernels built from shared helpers call several per loop iteration, which made the patching most of
    their interpreted run time. Within a launch, a device function whose language modules (``tl``, ``tl.core``
    as visible from its globals) were already patched now skips the scan; everything else is unchanged."""
    patched: set[frozenset[int]] = set()
    in_launch = [False]

    def langs(fn) -> frozenset[int]:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    @_patch(interp, "_patch_lang")
    def patch_lang(original, fn):
        key = langs(fn)
        if in_launch[0] and key in patched:
            return interp._LangPatchScope()
        scope = original(fn)
        patched.add(key)
        if not in_launch[0]:  # the launch's own patch: forget everything when it is undone
            in_launch[0] = True
            restore = scope.restore

            def leave() -> None:
                in_launch[0] = False
                patched.clear()
                restore()

            scope.restore = leave
        return scope


def remove() -> None:
    """Undo :func:`apply` (tests use it to show the corrections matter)."""
    for (cls, name), original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()


def is_active() -> bool:
    return bool(_originals)
