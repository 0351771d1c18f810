"""The paged KV cache layout: the one place that knows it, on the host (checks) and on the device (address math).

One K and one V tensor per layer, each (num_pages, page_size, num_kv_heads, head_dim) ("NHD" pages, as in vLLM's
flash backend and FlashInfer). Token ``t`` of a sequence lives in page ``block_table[b, t // page_size]`` at
offset ``t % page_size``; a *slot* is the flat index ``page * page_size + offset``. page_size is a power of two
from 1 to 256 (1 as in SGLang's radix cache, where a page is a token). Both caches share one shape, dtype, device and strides (any strides: a cache may be a view into a
larger pool); addresses are computed in int64 because a pool can hold more than 2**31 elements.

fp8 caches (float8_e4m3fn) hold ``x / scale`` saturated to ±448 (infinities included; NaN stays NaN), with one float32 scale per tensor (K and V each).
A scale is either a Python number or a 1-element float32 tensor on the cache's device; the tensor form is read
in-kernel, so a launch never copies a scale to the host (scales that change at run time stay CUDA-graph safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _runtime, _validate

PAGE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn magnitude: stored values saturate here."""
_FP8_MAX = tl.constexpr(FP8_MAX)  # jit code may read only tl.constexpr instances (see kernels._jit)

Scale = float | torch.Tensor | None


@dataclass(frozen=True)
class CacheLayout:
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    strides: tuple[int, int, int, int]

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size


def cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> CacheLayout:
    """Check that k_cache and v_cache form a valid pair of paged caches and return their layout."""
    _validate.tensor("k_cache", k_cache, 4, CACHE_DTYPES)
    _validate.tensor("v_cache", v_cache, 4, CACHE_DTYPES)
    _validate.same_dtype(k_cache=k_cache, v_cache=v_cache)
    _validate.same_device(k_cache=k_cache, v_cache=v_cache)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if v_cache.stride() != k_cache.stride():
        raise ValueError(
            f"k_cache and v_cache must have the same strides, got {k_cache.stride()} and {v_cache.stride()}"
        )
    num_pages, page_size, num_kv_heads, head_dim = k_cache.shape
    if page_size not in PAGE_SIZES:
        raise ValueError(
            f"k_cache has page_size {page_size} (dim 1 of (num_pages, page_size, num_kv_heads, head_dim)); "
            f"supported page sizes are {PAGE_SIZES}"
        )
    fp8_on_gpu = k_cache.dtype == torch.float8_e4m3fn and k_cache.device.type == "cuda"
    if fp8_on_gpu and torch.cuda.get_device_capability(k_cache.device) < (8, 9):
        raise ValueError(
            f"float8_e4m3fn caches need compute capability 8.9 or newer (Ada, Hopper); {k_cache.device} is older"
        )
    if num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"k_cache must have num_kv_heads >= 1 and head_dim >= 1, got shape {tuple(k_cache.shape)}")
    return CacheLayout(num_pages, page_size, num_kv_heads, head_dim, k_cache.dtype, tuple(k_cache.stride()))


def scale_args(layout: CacheLayout, k_scale: Scale, v_scale: Scale, device: torch.device) -> tuple:
    """Check the fp8 scales against the cache and return the kernel arguments
    ``(k_scale, v_scale, K_SCALE_IN_MEMORY, V_SCALE_IN_MEMORY)``; non-fp8 caches get (1.0, 1.0, False, False)."""
    if not layout.is_fp8:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} applies only to float8_e4m3fn caches; this cache is {layout.dtype}")
        return 1.0, 1.0, False, False
    args = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} is required with a float8_e4m3fn cache (per-tensor float32 dequant scale)")
        if isinstance(scale, torch.Tensor):
            _validate.tensor(name, scale, None, (torch.float32,))
            if scale.numel() != 1:
                raise ValueError(f"{name} must hold exactly one value, got shape {tuple(scale.shape)}")
            if scale.device != device:
                raise ValueError(f"{name} is on {scale.device} but the cache is on {device}")
            if _runtime.values_checkable(scale):
                _validate.positive_finite(name, float(scale.reshape(()).cpu()))
            args.append(scale)
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            _validate.positive_finite(name, float(scale))
            args.append(float(scale))
        else:
            raise TypeError(f"{name} must be a float or a 1-element float32 tensor, got {type(scale).__name__}")
    return args[0], args[1], isinstance(args[0], torch.Tensor), isinstance(args[1], torch.Tensor)


def check_lengths(layout: CacheLayout, block_table: torch.Tensor, seq_lens: torch.Tensor, pages: bool) -> int:
    """Copy seq_lens to the host (a sync on CUDA), check them against the block table and the cache, and with
    ``pages`` also check that every page id a sequence uses is a page of the cache. Returns the longest length.
    Sequences of length 0 are allowed (they read no page)."""
    lens = seq_lens.cpu().long()
    if lens.numel() == 0:
        return 0
    shortest, longest = int(lens.min()), int(lens.max())
    if shortest < 0:
        i = int(torch.argmin(lens))
        raise ValueError(f"seq_lens must be >= 0, got seq_lens[{i}] = {shortest}")
    width, page_size = block_table.shape[1], layout.page_size
    if longest > width * page_size:
        raise ValueError(
            f"block_table is too narrow: {width} columns hold {width * page_size} tokens at page_size {page_size}, "
            f"but seq_lens holds a sequence of {longest}"
        )
    if longest > layout.num_slots:
        raise ValueError(
            f"seq_lens has a sequence of {longest} tokens, longer than the cache's {layout.num_pages} pages of "
            f"{page_size} hold"
        )
    if pages:
        table = block_table.cpu()
        used = torch.arange(width)[None, :] < ((lens + page_size - 1) // page_size)[:, None]
        bad = used & ((table < 0) | (table >= layout.num_pages))
        if bool(bad.any()):
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(
                f"block_table[{row}, {col}] = {int(table[row, col])} is not a page of the cache "
                f"(0..{layout.num_pages - 1})"
            )
    return longest


def scale_op_args(scale: float | torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """A scale from :func:`scale_args` as two custom-op arguments (a schema has no float-or-tensor type)."""
    return (scale, 1.0) if isinstance(scale, torch.Tensor) else (None, scale)


def scale_from_op_args(tensor: torch.Tensor | None, value: float) -> tuple[float | torch.Tensor, bool]:
    """The kernel's (scale, SCALE_IN_MEMORY) arguments from :func:`scale_op_args`'s pair."""
    return (tensor, True) if tensor is not None else (value, False)


def attention_constexprs(
    layout: CacheLayout,
    q_dtype: torch.dtype,
    ks_in_memory: bool,
    vs_in_memory: bool,
    window: int | None,
    softcap: float | None,
    with_sinks: bool,
    num_splits: int,
    return_lse: bool,
) -> dict:
    """The constexpr arguments the paged attention kernels (decode, paged prefill) share: the cache's geometry
    and dtype, where the fp8 scales live, and which options, split partials and LSE output the launch has."""
    return {
        "HEAD_DIM": layout.head_dim,
        "BLOCK_D": _runtime.next_power_of_2(layout.head_dim),
        "PAGE_SIZE": layout.page_size,
        "IS_FP8": layout.is_fp8,
        "K_SCALE_IN_MEMORY": ks_in_memory,
        "V_SCALE_IN_MEMORY": vs_in_memory,
        "HAS_WINDOW": window is not None,
        "HAS_SOFTCAP": softcap is not None,
        "HAS_SINKS": with_sinks,
        "SPLIT": num_splits > 1,
        "STORE_LSE": return_lse,
        "PRECISION": "ieee" if q_dtype == torch.float32 else "tf32",
    }


@triton.jit
def load_scale(scale, IN_MEMORY: tl.constexpr):
    """A per-tensor scale passed either as a pointer to one float32 (IN_MEMORY) or as a float argument."""
    if IN_MEMORY:
        value = tl.load(scale)
    else:
        value = scale
    return value


@triton.jit
def fp8_saturate(x, scale):
    """The fp8 storage rule before the final cast: x / scale in fp32, saturated to ±448 (the cast to
    float8_e4m3fn then rounds to nearest even). NaN stays NaN: the compiled min/max would return the other
    operand (PTX min/max drop a NaN), saturating it to -448, so NaN is selected explicitly."""
    y = x.to(tl.float32) / scale
    return tl.where(y != y, y, tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX))


@triton.jit
def slot_offsets(slots, PAGE_SIZE: tl.constexpr, stride_page, stride_token):
    """Element offsets (int64) of the token rows at flat ``slots`` (non-negative) in a cache."""
    slots = slots.to(tl.int64)
    return (slots // PAGE_SIZE) * stride_page + (slots % PAGE_SIZE) * stride_token


@triton.jit
def tile_rows(
    k_base, v_base, block_table_row, stride_col, start, lo, hi,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, stride_page, stride_token, HOIST_ROWS: tl.constexpr,
):  # fmt: skip
    """Pointers (BLOCK_N,) to the K and V rows of a sequence's tokens ``start .. start + BLOCK_N - 1`` in caches
    whose element (page 0, token 0, this head, dim 0) is at ``k_base`` / ``v_base``: token t sits in page
    ``block_table_row[t // PAGE_SIZE]`` at offset ``t % PAGE_SIZE``. ``start`` must be a multiple of BLOCK_N
    (the kernels' key tiles are), so a tile covers whole pages or lies inside one.

    The block table is read once per page, not per token (a gather per token costs ~20 integer instructions per
    row loaded, see bench/NOTES.md "Decode addressing"), and rows within a page are affine: with
    BLOCK_N <= PAGE_SIZE one scalar page id per tile, otherwise the tile's BLOCK_N / PAGE_SIZE page ids as one
    small vector broadcast over a (pages, PAGE_SIZE) view. Pages with no token in ``[lo, hi)`` are not read
    (their tokens point into page 0; the caller masks those tokens' loads). Offsets are int64 (a pool can hold
    more than 2**31 elements).

    HOIST_ROWS writes the in-page row offsets as ``arange * stride_token``, loop-invariant: the compiler keeps
    them in registers across the key loop (two per row) and a tile's rows cost one 64-bit add each. Without it
    they are recomputed from ``start % PAGE_SIZE`` per tile (~6 more instructions a row, no registers held):
    for kernels with no registers to spare (paged prefill's tiles spilled on sm_80 with them hoisted)."""
    in_page = start % PAGE_SIZE  # 0 when BLOCK_N > PAGE_SIZE
    if BLOCK_N <= PAGE_SIZE:
        # The tile's one page holds a token of [lo, hi) (no tile without one is visited), so its block-table
        # entry is in use and needs no mask.
        page = tl.load(block_table_row + (start // PAGE_SIZE) * stride_col).to(tl.int64)
        if HOIST_ROWS:
            tile = page * stride_page + in_page.to(tl.int64) * stride_token
            rows = tl.arange(0, BLOCK_N).to(tl.int64) * stride_token
        else:
            tile = page * stride_page
            rows = (in_page + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_token
        k_rows = (k_base + tile) + rows
        v_rows = (v_base + tile) + rows
    else:
        page_starts = start + tl.arange(0, BLOCK_N // PAGE_SIZE) * PAGE_SIZE
        used = (page_starts < hi) & (page_starts + PAGE_SIZE > lo)
        pages = tl.load(block_table_row + (page_starts // PAGE_SIZE) * stride_col, mask=used, other=0)
        if HOIST_ROWS:
            offsets = tl.arange(0, PAGE_SIZE).to(tl.int64) * stride_token
        else:
            offsets = (in_page + tl.arange(0, PAGE_SIZE)).to(tl.int64) * stride_token
        rows = tl.reshape(pages.to(tl.int64)[:, None] * stride_page + offsets[None, :], [BLOCK_N])
        k_rows = k_base + rows
        v_rows = v_base + rows
    return k_rows, v_rows
