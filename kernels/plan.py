"""Plan once per step, run per layer: the host work of a launch separated from the launch (after FlashInfer's
``plan()`` / ``run()`` wrappers).

A decode step of an L-layer model calls the same kernels 2·L times on tensors of the same shapes: only the layer's
cache and the projections change. Everything that depends only on the step's host-side metadata is done once, in
the plan's constructor, from values the scheduler already holds on the host (no device read): the checks of the
lengths, of the block table's width and (where the caller passes them) of the page ids and slots; the split count,
tile config and grid; the scalar and constexpr kernel arguments; the workspace for split partials. ``run`` then
checks only that the tensors have the shapes, dtypes and device the plan was made for (a few tuple comparisons),
and launches: no host read of device values, no allocation except the output (none with ``out=``), no autotuner
lookup (the plan picks the heuristic config of :func:`kernels.decode.default_config`, or the one it is given).

The one-call functions (:func:`kernels.paged_decode_attention`, :func:`kernels.write_kv_cache`) stay as they
are; a plan's outputs equal theirs bit for bit for the same split count and config.

Trust boundary: ``run`` does not look at the values of ``seq_lens``, ``block_table`` or ``slot_mapping``: they must
be the device copies of what the plan was given (a mismatch reads or writes the wrong tokens, as with the
one-call functions on CUDA without debug).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from kernels import _paged, _runtime, _validate
from kernels._jit import log2_logit_scale
from kernels.decode import (
    MAX_SPLITS,
    _decode_kernel,
    choose_num_splits,
    default_config,
)
from kernels.kv_cache import _write_kernel
from kernels.merge import merge_splits_kernel
from kernels.prefill import _prefill_kernel
from kernels.prefill import default_config as prefill_default_config


class Workspace:
    """Reusable float32 scratch for plans (split-KV partial outputs and LSEs) on one device.

    It grows to the largest size a plan asks for and never shrinks; every plan made from it shares the buffer,
    so plans of one workspace must not run concurrently on different streams.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._buffer = _runtime.empty((0,), torch.float32, self.device)

    def take(self, numel: int) -> torch.Tensor:
        """A flat float32 (numel,) view of the buffer, grown first if it is too small."""
        if self._buffer.numel() < numel:
            self._buffer = _runtime.empty((numel,), torch.float32, self.device)
        return self._buffer[:numel]


def _host_ints(name: str, values: Sequence[int] | torch.Tensor) -> list[int]:
    """Host-side integers from a list/tuple or a CPU tensor (a CUDA tensor is refused: reading it would sync)."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name} must be on the host (a list or a CPU tensor), got a tensor on {values.device}")
        return values.tolist()
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be a list or tuple of ints, or a CPU tensor")
    return list(values)


def _mismatch(name: str, t: object, shape: tuple, dtype: torch.dtype, device: torch.device, what: str) -> str:
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    got = f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"
    return f"{name} does not fit this plan ({what}): expected shape {shape}, {dtype}, on {device}; got {got}"


def _expect(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device, what: str) -> None:
    """That a run-time tensor has the planned shape, dtype and device (the cheap checks ``run`` makes)."""
    if t.shape != shape or t.dtype != dtype or t.device != device:
        raise ValueError(_mismatch(name, t, shape, dtype, device, what))


def _outputs(plan: PagedDecodePlan | PrefillPlan, out: torch.Tensor | None, lse: torch.Tensor | None) -> tuple:
    """The attention output and LSE a run writes: the caller's (checked) or fresh ones; without return_lse the
    plan's 1-element placeholder stands for the LSE (the kernel never writes it)."""
    shape, dtype, dev = plan._q_shape, plan._out_dtype, plan.device
    if out is None:
        out = _runtime.empty(shape, dtype, dev)
    else:
        _expect("out", out, shape, dtype, dev, "the output")
    if not plan.return_lse:
        if lse is not None:
            raise ValueError("lse is an output only of plans made with return_lse=True")
        return out, plan._no_lse
    if lse is None:
        return out, _runtime.empty(plan._lse_shape, torch.float32, dev)
    _expect("lse", lse, plan._lse_shape, torch.float32, dev, "the LSE output")
    if not lse.is_contiguous():
        raise ValueError("lse must be contiguous")
    return out, lse


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, plan: PagedDecodePlan | WriteKVPlan) -> None:
    """That one layer's caches have the layout (shape, dtype, strides, device) the plan was made for."""
    shape, dtype, strides, device = plan._cache_shape, plan.layout.dtype, plan._cache_strides, plan.device
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.shape != shape or cache.dtype != dtype or cache.stride() != strides or cache.device != device:
            raise ValueError(
                _mismatch(name, cache, shape, dtype, device, "another cache layout")
                + f"; strides expected {strides}, got {cache.stride()}"
            )


class PagedDecodePlan:
    """The host work of :func:`kernels.paged_decode_attention` for one decode step, done once.

    Args:
        k_cache, v_cache: any layer's caches (the layout every layer's caches must have; only their shape,
            dtype, strides and device are read), as in :func:`kernels.paged_decode_attention`.
        seq_lens: the step's context lengths on the host (list of ints or CPU tensor), each >= 1, the query
            included. The device ``seq_lens`` given to :meth:`run` must hold the same values.
        num_q_heads: query heads (a multiple of the cache's KV heads).
        q_dtype: the query's dtype (float16 / bfloat16 / float32; the cache's unless the cache is fp8).
        block_table_width: columns of the block table given to :meth:`run`.
        block_table: optionally the block table on the host ((batch, width) list of lists or CPU tensor): its
            used page ids are then checked to be pages of the cache.
        sm_scale, softcap, window, k_scale, v_scale, num_splits, return_lse: as in
            :func:`kernels.paged_decode_attention` (None ``num_splits`` is chosen here from the host lengths,
            exactly as the one-call function would).
        workspace: where split partials live (a fresh one when None); pass one :class:`Workspace` to every step's
            plan to reuse its memory.
        config: tile config ``{"BLOCK_N", "num_warps", "num_stages"}`` (default: :func:`kernels.decode.default_config`).

    Raises:
        TypeError / ValueError naming the argument, for malformed metadata, before anything is allocated.
    """

    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seq_lens: Sequence[int] | torch.Tensor,
        *,
        num_q_heads: int,
        q_dtype: torch.dtype,
        block_table_width: int,
        block_table: Sequence[Sequence[int]] | torch.Tensor | None = None,
        sm_scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
        k_scale: float | torch.Tensor | None = None,
        v_scale: float | torch.Tensor | None = None,
        num_splits: int | None = None,
        return_lse: bool = False,
        workspace: Workspace | None = None,
        config: dict | None = None,
    ):
        layout = _paged.cache_layout(k_cache, v_cache)
        device = k_cache.device
        lens = _host_ints("seq_lens", seq_lens)
        batch = len(lens)
        if q_dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"q_dtype must be one of {_validate.FLOAT_DTYPES}, got {q_dtype}")
        if not layout.is_fp8 and q_dtype != layout.dtype:
            raise TypeError(f"q_dtype {q_dtype} must be the cache's dtype {layout.dtype} (or use fp8 KV)")
        _validate.head_dim("k_cache", layout.head_dim, _validate.HEAD_DIMS)
        if not isinstance(num_q_heads, int) or num_q_heads < 1:
            raise ValueError(f"num_q_heads must be an int >= 1, got {num_q_heads!r}")
        _validate.gqa(num_q_heads, layout.num_kv_heads)
        if layout.num_kv_heads > _validate.MAX_GRID_YZ:
            raise ValueError(
                f"k_cache has {layout.num_kv_heads} KV heads; at most {_validate.MAX_GRID_YZ} are supported"
            )
        if not isinstance(block_table_width, int) or block_table_width < (1 if batch else 0):
            raise ValueError(f"block_table_width must be an int >= 1, got {block_table_width!r}")
        _validate.positive_float("sm_scale", sm_scale)
        _validate.positive_float("softcap", softcap)
        _validate.window(window)
        if num_splits is not None and (
            not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= MAX_SPLITS
        ):
            raise ValueError(f"num_splits must be an int in 1..{MAX_SPLITS} or None, got {num_splits!r}")
        ks, vs, ks_in_memory, vs_in_memory = _paged.scale_args(layout, k_scale, v_scale, device)
        longest = self._check_lengths(lens, layout, block_table_width)
        if block_table is not None:
            self._check_pages(block_table, lens, layout, block_table_width)
        if num_splits is None:
            context = longest if window is None else min(longest, window)
            num_splits = choose_num_splits(batch, layout.num_kv_heads, context, _runtime.sm_count(device))

        self.batch, self.num_q_heads, self.num_splits, self.return_lse = batch, num_q_heads, num_splits, return_lse
        self.device, self.layout = device, layout
        self._q_shape = (batch, num_q_heads, layout.head_dim)
        self._q_dtype = self._out_dtype = q_dtype
        self._cache_shape, self._cache_strides = tuple(k_cache.shape), tuple(k_cache.stride())
        self._table_shape = (batch, block_table_width)
        self._lens_shape = (batch,)
        self._lse_shape = (batch, num_q_heads)
        self._scales = (ks, vs)
        head_dim, group = layout.head_dim, num_q_heads // layout.num_kv_heads
        block_d = triton.next_power_of_2(head_dim)
        split = num_splits > 1
        workspace = workspace or Workspace(device)
        if split:
            n_out = batch * num_q_heads * num_splits * head_dim
            flat = workspace.take(n_out + batch * num_q_heads * num_splits)
            self._part_out = flat[:n_out].view(batch, num_q_heads, num_splits, head_dim)
            self._part_lse = flat[n_out:].view(batch, num_q_heads, num_splits)
        else:  # never touched: the kernel writes out/lse directly (run passes out/lse in their place)
            self._part_out = self._part_lse = None
        self._no_lse = _runtime.empty((1,), torch.float32, device)
        programs = batch * layout.num_kv_heads * num_splits
        self._scalars = (
            num_q_heads,
            log2_logit_scale(head_dim, sm_scale),
            float(softcap or 0.0),
            int(window or 0),
            min(8, triton.next_power_of_2(triton.cdiv(max(programs, 1), _runtime.sm_count(device)))),
        )
        self._constexprs = {
            "GROUP": group,
            "HEAD_DIM": head_dim,
            "BLOCK_D": block_d,
            "BLOCK_H": max(16, triton.next_power_of_2(group)),
            "PAGE_SIZE": layout.page_size,
            "IS_FP8": layout.is_fp8,
            "K_SCALE_IN_MEMORY": ks_in_memory,
            "V_SCALE_IN_MEMORY": vs_in_memory,
            "HAS_WINDOW": window is not None,
            "HAS_SOFTCAP": softcap is not None,
            "SPLIT": split,
            "STORE_LSE": return_lse,
            "PRECISION": "ieee" if q_dtype == torch.float32 else "tf32",
            **(config or default_config(head_dim, group, q_dtype)),
        }
        block_s = triton.next_power_of_2(num_splits)
        if not _runtime.INTERPRET:  # bound the (BLOCK_S, head_dim) fp32 tile held in registers
            block_s = min(block_s, max(16, 4096 // block_d))
        # the kernel[grid] proxies, bound once: run only calls them
        self._kernel = _decode_kernel[(batch, layout.num_kv_heads, num_splits)]
        self._merge = merge_splits_kernel[(batch, num_q_heads)]
        self._merge_constexprs = {
            "HEAD_DIM": head_dim,
            "BLOCK_D": block_d,
            "BLOCK_S": block_s,
            "STORE_LSE": return_lse,
            "num_warps": 4,
        }

    @staticmethod
    def _check_lengths(lens: list[int], layout: _paged.CacheLayout, width: int) -> int:
        if not lens:
            return 0
        shortest, longest = min(lens), max(lens)
        if shortest < 1:
            i = lens.index(shortest)
            raise ValueError(
                f"seq_lens must be >= 1 (the query's own K/V is in the cache), got seq_lens[{i}] = {shortest}"
            )
        if longest > width * layout.page_size:
            raise ValueError(
                f"block_table_width {width} holds {width * layout.page_size} tokens at page_size {layout.page_size}, "
                f"but the longest seq_len is {longest}"
            )
        if longest > layout.num_slots:
            raise ValueError(
                f"seq_lens has a sequence of {longest} tokens, longer than the cache's {layout.num_pages} pages of "
                f"{layout.page_size} hold"
            )
        return longest

    @staticmethod
    def _check_pages(table, lens: list[int], layout: _paged.CacheLayout, width: int) -> None:
        rows = table.tolist() if isinstance(table, torch.Tensor) and table.device.type == "cpu" else table
        if isinstance(rows, torch.Tensor) or len(rows) != len(lens):
            raise ValueError(f"block_table must be a host table of {len(lens)} rows (list of lists or CPU tensor)")
        for b, (row, n) in enumerate(zip(rows, lens, strict=True)):
            used = -(-n // layout.page_size)
            if len(row) < used or len(row) > width:
                raise ValueError(f"block_table row {b} has {len(row)} pages; seq_lens[{b}] = {n} needs {used}")
            for c in range(used):
                if not 0 <= row[c] < layout.num_pages:
                    raise ValueError(
                        f"block_table[{b}, {c}] = {row[c]} is not a page of the cache (0..{layout.num_pages - 1})"
                    )

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of one layer: as :func:`kernels.paged_decode_attention` with the plan's options.

        q: (batch, num_q_heads, head_dim) in the planned dtype; k_cache/v_cache: this layer's caches, with the
        planned shape, dtype and strides; block_table: int32 (batch, block_table_width); seq_lens: int32 (batch,)
        holding the planned lengths. ``out`` (batch, num_q_heads, head_dim) in q's dtype and, with return_lse,
        ``lse`` float32 (batch, num_q_heads), any strides for out and contiguous for lse, are written when given.
        Returns out, or (out, lse) when the plan was made with return_lse.
        """
        dev = self.device
        _expect("q", q, self._q_shape, self._q_dtype, dev, "another batch or head count")
        _check_caches(k_cache, v_cache, self)
        _expect("block_table", block_table, self._table_shape, torch.int32, dev, "another batch")
        _expect("seq_lens", seq_lens, self._lens_shape, torch.int32, dev, "another batch")
        out, lse = _outputs(self, out, lse)
        if self.batch:
            self._launch(q, k_cache, v_cache, block_table, seq_lens, out, lse)
        return (out, lse) if self.return_lse else out

    def _launch(self, q, k_cache, v_cache, block_table, seq_lens, out, lse) -> None:
        split = self._part_out is not None
        part_out, part_lse = (self._part_out, self._part_lse) if split else (out, lse)
        self._kernel(
            q,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            out,
            lse,
            part_out,
            part_lse,
            *self._scales,
            *q.stride(),
            *self._cache_strides,
            *block_table.stride(),
            seq_lens.stride(0),
            *out.stride(),
            *self._scalars,
            **self._constexprs,
        )
        if split:
            self._merge(
                part_out,
                part_lse,
                out,
                lse,
                self.num_splits,
                self.num_q_heads,
                *out.stride(),
                **self._merge_constexprs,
            )


class WriteKVPlan:
    """The host work of :func:`kernels.write_kv_cache` for one step's new tokens, done once.

    Args:
        k_cache, v_cache: any layer's caches (their layout is what every layer's must have).
        num_tokens: how many tokens each :meth:`run` writes.
        kv_dtype: dtype of the k/v given to :meth:`run` (the cache's, or any float dtype for an fp8 cache).
        slot_mapping: optionally the slots on the host (list of ints or CPU tensor), checked to be < the cache's
            slot count (negative: padding); the device ``slot_mapping`` given to :meth:`run` must hold the same.
        slot_dtype: int32 or int64, the device slot_mapping's dtype.
        k_scale, v_scale: as in :func:`kernels.write_kv_cache` (fp8 caches only).
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
            slots = _host_ints("slot_mapping", slot_mapping)
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
        self._cache_shape, self._cache_strides = tuple(k_cache.shape), tuple(k_cache.stride())
        self._scales = (ks, vs)
        block_d = triton.next_power_of_2(layout.head_dim)
        block_t = 128 if _runtime.INTERPRET else max(8, 4096 // block_d)  # as write_kv_cache
        self._kernel = _write_kernel[(triton.cdiv(num_tokens, block_t), layout.num_kv_heads)]
        self._constexprs = {
            "HEAD_DIM": layout.head_dim,
            "BLOCK_D": block_d,
            "BLOCK_T": block_t,
            "PAGE_SIZE": layout.page_size,
            "IS_FP8": layout.is_fp8,
            "K_SCALE_IN_MEMORY": ks_in_memory,
            "V_SCALE_IN_MEMORY": vs_in_memory,
            "num_warps": 4,
        }

    def run(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write one layer's new K/V: as :func:`kernels.write_kv_cache`, shapes as planned."""
        dev = self.device
        _expect("k", k, self._kv_shape, self._kv_dtype, dev, "another token count")
        _expect("v", v, self._kv_shape, self._kv_dtype, dev, "another token count")
        _check_caches(k_cache, v_cache, self)
        _expect("slot_mapping", slot_mapping, self._kv_shape[:1], self._slot_dtype, dev, "another token count")
        if not self.num_tokens:
            return
        self._kernel(
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            *self._scales,
            self.num_tokens,
            *k.stride(),
            *v.stride(),
            *self._cache_strides,
            **self._constexprs,
        )


class PrefillPlan:
    """The host work of :func:`kernels.prefill_attention` for one packed batch, done once.

    Args:
        seqlens_q: each sequence's query count, on the host (list of ints >= 0 or CPU tensor).
        seqlens_k: each sequence's key count (default: seqlens_q); the device cu_seqlens given to :meth:`run`
            must be the running sums of these, starting at 0.
        num_q_heads, num_kv_heads, head_dim, dtype, device: the geometry of q (total_q, num_q_heads, head_dim) and
            k/v (total_k, num_kv_heads, head_dim), all of ``dtype`` on ``device``.
        causal, sm_scale, window, softcap, return_lse: as in :func:`kernels.prefill_attention`.
        config: tile config ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` (default:
            :func:`kernels.prefill.default_config`).
    """

    def __init__(
        self,
        seqlens_q: Sequence[int] | torch.Tensor,
        seqlens_k: Sequence[int] | torch.Tensor | None = None,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        causal: bool = True,
        sm_scale: float | None = None,
        window: int | None = None,
        softcap: float | None = None,
        return_lse: bool = False,
        config: dict | None = None,
    ):
        device = torch.device(device)
        lens_q = _host_ints("seqlens_q", seqlens_q)
        lens_k = lens_q if seqlens_k is None else _host_ints("seqlens_k", seqlens_k)
        if len(lens_k) != len(lens_q):
            raise ValueError(f"seqlens_q has {len(lens_q)} sequences but seqlens_k has {len(lens_k)}")
        for name, lens in (("seqlens_q", lens_q), ("seqlens_k", lens_k)):
            if lens and min(lens) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}[{lens.index(min(lens))}] = {min(lens)}")
        batch = len(lens_q)
        if batch > _validate.MAX_GRID_YZ:
            raise ValueError(f"batch must be at most {_validate.MAX_GRID_YZ} sequences per call, got {batch}")
        if dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_validate.FLOAT_DTYPES}, got {dtype}")
        if device.type != _runtime.DEVICE_TYPE:
            raise ValueError(f"device is {device}, but this process runs phaseattn's kernels on {_runtime.DEVICE_TYPE}")
        _validate.head_dim("head_dim", head_dim, _validate.HEAD_DIMS)
        _validate.gqa(num_q_heads, num_kv_heads)
        _validate.positive_float("sm_scale", sm_scale)
        _validate.positive_float("softcap", softcap)
        _validate.window(window)
        if window is not None and not causal:
            raise ValueError("window requires causal=True (a sliding window is a causal mask with a lower edge)")
        cfg = config or prefill_default_config(head_dim, dtype)
        longest_q = max(lens_q, default=0)
        m_blocks = triton.cdiv(longest_q, cfg["BLOCK_M"])
        if m_blocks > _validate.MAX_GRID_YZ:
            raise ValueError(f"the longest query sequence ({longest_q}) needs more than {_validate.MAX_GRID_YZ} tiles")

        self.batch, self.return_lse, self.device, self.dtype = batch, return_lse, device, dtype
        self._out_dtype = dtype
        self.total_q, self.total_k = sum(lens_q), sum(lens_k)
        self._q_shape = (self.total_q, num_q_heads, head_dim)
        self._kv_shape = (self.total_k, num_kv_heads, head_dim)
        self._cu_shape = (batch + 1,)
        self._lse_shape = (self.total_q, num_q_heads)
        self._no_lse = _runtime.empty((1,), torch.float32, device)
        self._launches = self.total_q > 0 and batch > 0 and longest_q > 0
        self._kernel = _prefill_kernel[(num_q_heads, batch, m_blocks)]
        self._scalars = (
            num_q_heads,
            log2_logit_scale(head_dim, sm_scale),
            float(softcap or 0.0),
            int(window or 0),
            min(triton.next_power_of_2(max(longest_q, 1)), 16384),
        )
        self._constexprs = {
            "GROUP": num_q_heads // num_kv_heads,
            "HEAD_DIM": head_dim,
            "BLOCK_D": triton.next_power_of_2(head_dim),
            "CAUSAL": bool(causal),
            "HAS_WINDOW": window is not None,
            "HAS_SOFTCAP": softcap is not None,
            "STORE_LSE": return_lse,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            **cfg,
        }

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer's attention: as :func:`kernels.prefill_attention` with the plan's options; ``out`` and (with
        return_lse) ``lse`` (contiguous) are written when given."""
        dev, dtype = self.device, self.dtype
        _expect("q", q, self._q_shape, dtype, dev, "another token count or head count")
        _expect("k", k, self._kv_shape, dtype, dev, "another token count or head count")
        _expect("v", v, self._kv_shape, dtype, dev, "another token count or head count")
        _expect("cu_seqlens_q", cu_seqlens_q, self._cu_shape, torch.int32, dev, "another batch")
        _expect("cu_seqlens_k", cu_seqlens_k, self._cu_shape, torch.int32, dev, "another batch")
        out, lse = _outputs(self, out, lse)
        if self._launches:
            self._kernel(
                q,
                k,
                v,
                out,
                lse,
                cu_seqlens_q,
                cu_seqlens_k,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *out.stride(),
                *self._scalars,
                **self._constexprs,
            )
        elif self.return_lse:
            lse.fill_(float("-inf"))
        return (out, lse) if self.return_lse else out
