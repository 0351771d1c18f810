"""Paged KV cache write: scatter new keys/values into their cache slots (the layout is in :mod:`kernels._paged`).

Each program copies a block of BLOCK_T tokens of one KV head: it loads the tokens' slots, turns them into page and
offset, and stores the (BLOCK_T, head_dim) rows there. Negative slots are padding and are skipped. For fp8 caches
the values are divided by the per-tensor scale in fp32, saturated to ±448 and rounded to float8_e4m3fn; other
caches store the values unchanged (their dtype must match).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _paged, _runtime, _validate
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
    ks, vs, ks_in_memory, vs_in_memory = _paged.scale_args(layout, k_scale, v_scale, k_cache.device)
    if num_tokens and _runtime.values_checkable(slot_mapping):
        top = int(slot_mapping.max())
        if top >= layout.num_slots:
            raise ValueError(
                f"slot_mapping holds slot {top}, but the cache has {layout.num_slots} slots "
                f"({layout.num_pages} pages of {layout.page_size})"
            )
    if num_tokens == 0:
        return

    block_d = triton.next_power_of_2(head_dim)
    # Big blocks for the interpreter (cost is per program); ~4k elements per program on a GPU.
    block_t = 128 if _runtime.INTERPRET else max(8, 4096 // block_d)
    _write_kernel[(triton.cdiv(num_tokens, block_t), num_kv_heads)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        ks,
        vs,
        num_tokens,
        *k.stride(),
        *v.stride(),
        *layout.strides,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        PAGE_SIZE=layout.page_size,
        IS_FP8=layout.is_fp8,
        K_SCALE_IN_MEMORY=ks_in_memory,
        V_SCALE_IN_MEMORY=vs_in_memory,
        num_warps=4,
    )
