"""Paged KV cache write: scatter new keys/values into their cache slots (the layout is in :mod:`kernels._paged`).

Each program copies a block of BLOCK_T tokens of one KV head: it loads the tokens' slots, turns them into page and
offset, and stores the (BLOCK_T, head_dim) rows there. Negative slots are padding and are skipped. For fp8 caches
the values are divided by the per-tensor scale in fp32, saturated to ±448 and rounded to float8_e4m3fn; other
caches store the values unchanged (their dtype must match).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import _paged, _plan, _runtime, _validate
from kernels._paged import fp8_saturate, load_scale, slot_offsets


@triton.jit
def _store_rows(Src, Cache, rows_src, rows_cache, offs_d, mask, stride_sd, stride_cd, scale, IS_FP8: tl.constexpr):
    x = tl.load(Src + rows_src[:, None] + offs_d[None, :] * stride_sd, mask=mask)
    if IS_FP8:
        x = fp8_saturate(x, scale).to(Cache.dtype.element_ty)
    tl.store(Cache + rows_cache[:, None] + offs_d[None, :] * stride_cd, x, mask=mask)


@triton.jit
def _write_kernel(
    K,
    V,
    KCache,
    VCache,
    SlotMapping,
    k_scale,
    v_scale,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_page,
    stride_token,
    stride_head,
    stride_cd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
    K_SCALE_IN_MEMORY: tl.constexpr,
    V_SCALE_IN_MEMORY: tl.constexpr,
):
    head = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    slots = tl.load(SlotMapping + tokens, mask=tokens < num_tokens, other=-1)
    keep = slots >= 0
    mask = keep[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows_cache = slot_offsets(tl.where(keep, slots, 0), PAGE_SIZE, stride_page, stride_token) + head * stride_head
    t64 = tokens.to(tl.int64)
    ks = 1.0
    vs = 1.0
    if IS_FP8:
        ks = load_scale(k_scale, K_SCALE_IN_MEMORY)
        vs = load_scale(v_scale, V_SCALE_IN_MEMORY)
    _store_rows(
        K, KCache, t64 * stride_kt + head * stride_kh, rows_cache, offs_d, mask, stride_kd, stride_cd, ks, IS_FP8
    )
    _store_rows(
        V, VCache, t64 * stride_vt + head * stride_vh, rows_cache, offs_d, mask, stride_vd, stride_cd, vs, IS_FP8
    )


def _block_tokens(block_d: int) -> int:
    """Tokens per program: big blocks for the interpreter (its cost is per program), ~4k elements on a GPU."""
    return 128 if _runtime.INTERPRET else max(8, 4096 // block_d)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Scatter new keys and values into a paged KV cache, in place.

    Args:
        k, v: (num_tokens, num_kv_heads, head_dim), float16 / bfloat16 / float32, any strides. Their num_kv_heads
            and head_dim must match the cache's. For a float16/bfloat16/float32 cache they must have the cache's
            dtype (stored unchanged); for a float8_e4m3fn cache any of the three.
        k_cache, v_cache: (num_pages, page_size, num_kv_heads, head_dim) ("NHD" pages), same shape, dtype,
            strides and device; dtype float16, bfloat16, float32 or float8_e4m3fn (GPUs: compute capability
            >= 8.9); page_size a power of two from 1 to 256. Written in place.
        slot_mapping: int32 or int64 (num_tokens,), contiguous: token i goes to page ``slot // page_size`` at offset
            ``slot % page_size``. A negative slot skips the token (padding). Slots must be < num_pages *
            page_size; two tokens with the same slot leave either one's values.
        k_scale, v_scale: required exactly for float8_e4m3fn caches: per-tensor float32 dequant scales, each a
            Python number or a 1-element float32 tensor on the cache's device (read in-kernel: no host sync).
            The cache stores ``x / scale`` computed in fp32, saturated to ±448 (±inf too), rounded to nearest
            even; NaN is stored as NaN.

    Slot values are checked (range) only where that needs no device-to-host sync: CPU tensors, or CUDA with
    ``kernels.set_debug(True)``. On CUDA without debug an out-of-range slot writes outside the cache.

    Raises:
        TypeError / ValueError before any launch, naming the argument; the caches are then unchanged.
    """
    layout = _paged.cache_layout(k_cache, v_cache)
    _validate.tensor("k", k, 3, _validate.FLOAT_DTYPES)
    _validate.tensor("v", v, 3, _validate.FLOAT_DTYPES)
    _validate.same_dtype(k=k, v=v)
    _validate.same_device(k_cache=k_cache, k=k, v=v)
    _validate.index_tensor("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64), like=k_cache)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if (num_kv_heads, head_dim) != (layout.num_kv_heads, layout.head_dim):
        raise ValueError(
            f"k has {num_kv_heads} heads of head_dim {head_dim} but the cache has {layout.num_kv_heads} of "
            f"{layout.head_dim} (shape {tuple(k_cache.shape)})"
        )
    if not layout.is_fp8 and k.dtype != layout.dtype:
        raise TypeError(f"k has dtype {k.dtype} but the cache has {layout.dtype}; a non-fp8 cache stores values as-is")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must have one slot per token ({num_tokens}), got {slot_mapping.shape[0]}")
    ks, vs, _, _ = _paged.scale_args(layout, k_scale, v_scale, k_cache.device)
    if num_tokens and _runtime.values_checkable(slot_mapping):
        top = int(slot_mapping.max())
        if top >= layout.num_slots:
            raise ValueError(
                f"slot_mapping holds slot {top}, but the cache has {layout.num_slots} slots "
                f"({layout.num_pages} pages of {layout.page_size})"
            )
    if num_tokens == 0:
        return
    torch.ops.phaseattn.write_kv_cache(
        k, v, k_cache, v_cache, slot_mapping, *_paged.scale_op_args(ks), *_paged.scale_op_args(vs)
    )


def launch_spec(
    num_tokens: int, layout: _paged.CacheLayout, ks_in_memory: bool, vs_in_memory: bool
) -> tuple[tuple[int, int], dict]:
    """The kernel launch that host metadata implies, shared by :func:`launch` and :class:`WriteKVPlan`: (grid,
    the constexpr and config keyword arguments)."""
    block_d = _runtime.next_power_of_2(layout.head_dim)
    block_t = _block_tokens(block_d)
    constexprs = {
        "HEAD_DIM": layout.head_dim,
        "BLOCK_D": block_d,
        "BLOCK_T": block_t,
        "PAGE_SIZE": layout.page_size,
        "IS_FP8": layout.is_fp8,
        "K_SCALE_IN_MEMORY": ks_in_memory,
        "V_SCALE_IN_MEMORY": vs_in_memory,
        "num_warps": 4,
    }
    return (_runtime.cdiv(num_tokens, block_t), layout.num_kv_heads), constexprs


def issue(
    kernel,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: tuple,
    num_tokens: int,
    layout: _paged.CacheLayout,
    constexprs: dict,
) -> None:
    """Launch ``kernel`` (the grid-bound kernel) with the arguments of :func:`launch_spec`."""
    kernel(
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        *scales,
        num_tokens,
        *k.stride(),
        *v.stride(),
        *layout.strides,
        **constexprs,
    )


def launch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_scale_value: float,
    v_scale: torch.Tensor | None,
    v_scale_value: float,
) -> None:
    """The launch behind ``torch.ops.phaseattn.write_kv_cache`` (see :mod:`kernels._ops`), on inputs
    :func:`write_kv_cache` has validated (at least one token); writes k_cache and v_cache in place."""
    layout = _paged.cache_layout(k_cache, v_cache)
    num_tokens = k.shape[0]
    ks, ks_in_memory = _paged.scale_from_op_args(k_scale, k_scale_value)
    vs, vs_in_memory = _paged.scale_from_op_args(v_scale, v_scale_value)
    grid, constexprs = launch_spec(num_tokens, layout, ks_in_memory, vs_in_memory)
    issue(_write_kernel[grid], k, v, k_cache, v_cache, slot_mapping, (ks, vs), num_tokens, layout, constexprs)


class WriteKVPlan:
    """:func:`write_kv_cache` planned once per step, run per layer (see :mod:`kernels._plan`).

    Args:
        k_cache, v_cache: any layer's caches: the layout every layer's must have.
        num_tokens: how many tokens each :meth:`run` writes.
        kv_dtype: dtype of the k/v given to :meth:`run` (the cache's, or any float dtype for an fp8 cache).
        slot_mapping: optionally the slots on the host (list of ints or CPU tensor), checked to be < the cache's
            slot count (negative: padding); the device ``slot_mapping`` given to :meth:`run` must hold the same.
        slot_dtype: int32 or int64, the device slot_mapping's dtype.
        k_scale, v_scale: as in :func:`write_kv_cache` (fp8 caches only).
    """

    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_tokens: int,
        *,
        kv_dtype: torch.dtype,
        slot_mapping: Sequence[int] | torch.Tensor | None = None,
        slot_dtype: torch.dtype = torch.int64,
        k_scale: float | torch.Tensor | None = None,
        v_scale: float | torch.Tensor | None = None,
    ):
        layout = _paged.cache_layout(k_cache, v_cache)
        device = k_cache.device
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if kv_dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"kv_dtype must be one of {_validate.FLOAT_DTYPES}, got {kv_dtype}")
        if not layout.is_fp8 and kv_dtype != layout.dtype:
            raise TypeError(
                f"kv_dtype {kv_dtype} must be the cache's dtype {layout.dtype} (a non-fp8 cache stores as-is)"
            )
        if slot_dtype not in (torch.int32, torch.int64):
            raise TypeError(f"slot_dtype must be torch.int32 or torch.int64, got {slot_dtype}")
        ks, vs, ks_in_memory, vs_in_memory = _paged.scale_args(layout, k_scale, v_scale, device)
        if slot_mapping is not None:
            slots = _plan.host_ints("slot_mapping", slot_mapping)
            if len(slots) != num_tokens:
                raise ValueError(f"slot_mapping must have one slot per token ({num_tokens}), got {len(slots)}")
            top = max(slots, default=-1)
            if top >= layout.num_slots:
                raise ValueError(
                    f"slot_mapping holds slot {top}, but the cache has {layout.num_slots} slots "
                    f"({layout.num_pages} pages of {layout.page_size})"
                )
        self.num_tokens, self.device, self.layout = num_tokens, device, layout
        self._kv_shape = (num_tokens, layout.num_kv_heads, layout.head_dim)
        self._kv_dtype, self._slot_dtype = kv_dtype, slot_dtype
        self._scales = (ks, vs)
        grid, self._constexprs = launch_spec(num_tokens, layout, ks_in_memory, vs_in_memory)
        self._kernel = _write_kernel[grid]  # bound once: run only calls it

    def run(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write one layer's new K/V: as :func:`write_kv_cache`, with the planned shapes."""
        dev = self.device
        _plan.expect("k", k, self._kv_shape, self._kv_dtype, dev, "another token count")
        _plan.expect("v", v, self._kv_shape, self._kv_dtype, dev, "another token count")
        _plan.check_caches(k_cache, v_cache, self)
        _plan.expect(
            "slot_mapping", slot_mapping, self._kv_shape[:1], self._slot_dtype, dev, "another token count", dense=True
        )
        if self.num_tokens:
            issue(
                self._kernel, k, v, k_cache, v_cache, slot_mapping, self._scales, self.num_tokens, self.layout,
                self._constexprs,
            )  # fmt: skip
