"""Plan once per step, run per layer: what the plans of every kernel share (after FlashInfer's ``plan()`` /
``run()`` wrappers).

A decode step of an L-layer model calls the same kernels 2·L times on tensors of the same shapes: only the layer's
cache, its projections and its sinks change. A plan (:class:`kernels.PagedDecodePlan`,
:class:`kernels.PagedPrefillPlan`, :class:`kernels.PrefillPlan`, :class:`kernels.WriteKVPlan`, each beside its
kernel) does everything that depends only on the step's host-side metadata once, in its constructor, from values
the scheduler already holds on the host (no device read): the checks of the lengths, of the block table's width
and (where the caller passes them) of the page ids and slots; the split count, tile config and grid; the scalar
and constexpr kernel arguments; the workspace for split partials. ``run`` then checks only that the tensors have
the shapes, dtypes and device the plan was made for (a few tuple comparisons) and launches: no host read of
device values, no allocation except the output (none with ``out=``), no autotuner lookup (a plan takes the
kernel's heuristic config, or the one it is given).

The one-call functions stay as they are; a plan's outputs equal theirs bit for bit for the same split count and
tile config (the interpreter's and ``PHASEATTN_AUTOTUNE=0``'s).

Trust boundary: ``run`` does not look at the values of ``seq_lens``, ``cu_seqlens``, ``block_table`` or
``slot_mapping``: they must be the device copies of what the plan was given (a mismatch reads or writes the
wrong tokens, as with the one-call functions on CUDA without debug).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import _paged, _runtime, _validate


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

    def partials(self, rows: int, num_q_heads: int, num_splits: int, head_dim: int) -> tuple:
        """Split partials carved from the buffer: out float32 (rows, Hq, S, D) and lse (rows, Hq, S), contiguous."""
        n_out = rows * num_q_heads * num_splits * head_dim
        flat = self.take(n_out + rows * num_q_heads * num_splits)
        return flat[:n_out].view(rows, num_q_heads, num_splits, head_dim), flat[n_out:].view(
            rows, num_q_heads, num_splits
        )


def host_ints(name: str, values: Sequence[int] | torch.Tensor) -> list[int]:
    """Host-side integers from a list/tuple or a CPU tensor (a CUDA tensor is refused: reading it would sync)."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name} must be on the host (a list or a CPU tensor), got a tensor on {values.device}")
        return values.tolist()
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be a list or tuple of ints, or a CPU tensor")
    return list(values)


def check_host_lengths(
    seq_lens: list[int], layout: _paged.CacheLayout, width: int, queries: list[int] | None = None
) -> int:
    """Check host-side sequence lengths (>= 0, each >= its new query count when ``queries`` is given) against a
    block table of ``width`` columns and the cache; returns the longest."""
    if not seq_lens:
        return 0
    shortest, longest = min(seq_lens), max(seq_lens)
    if shortest < 0:
        raise ValueError(f"seq_lens must be >= 0, got seq_lens[{seq_lens.index(shortest)}] = {shortest}")
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
    for b, (n, lq) in enumerate(zip(seq_lens, queries or (), strict=False)):
        if lq < 0 or lq > n:
            raise ValueError(
                f"sequence {b} has {lq} new queries but seq_lens[{b}] = {n}: each must be in 0..seq_len (the cache "
                "already holds every query's own K/V)"
            )
    return longest


def check_host_pages(table: object, seq_lens: list[int], layout: _paged.CacheLayout, width: int) -> None:
    """Check that every page a sequence uses in a host-side block table (list of lists or CPU tensor) is a page of
    the cache."""
    rows = table.tolist() if isinstance(table, torch.Tensor) and table.device.type == "cpu" else table
    if isinstance(rows, torch.Tensor) or len(rows) != len(seq_lens):
        raise ValueError(f"block_table must be a host table of {len(seq_lens)} rows (list of lists or CPU tensor)")
    for b, (row, n) in enumerate(zip(rows, seq_lens, strict=True)):
        used = -(-n // layout.page_size)
        if len(row) < used or len(row) > width:
            raise ValueError(f"block_table row {b} has {len(row)} pages; seq_lens[{b}] = {n} needs {used}")
        for c in range(used):
            if not 0 <= row[c] < layout.num_pages:
                raise ValueError(
                    f"block_table[{b}, {c}] = {row[c]} is not a page of the cache (0..{layout.num_pages - 1})"
                )


def check_num_splits(num_splits: int | None, most: int) -> None:
    if num_splits is not None and (
        not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= most
    ):
        raise ValueError(f"num_splits must be an int in 1..{most} or None, got {num_splits!r}")


def check_device(device: torch.device) -> None:
    if device.type != _runtime.DEVICE_TYPE:
        raise ValueError(f"device is {device}, but this process runs phaseattn's kernels on {_runtime.DEVICE_TYPE}")


def expect(
    name: str,
    t: torch.Tensor,
    shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    what: str,
    *,
    dense: bool = False,
) -> None:
    """That a run-time tensor has the planned shape, dtype and device (the cheap checks ``run`` makes); ``dense``
    for index tensors a kernel reads as dense memory (see :func:`kernels._validate.index_tensor`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape or t.dtype != dtype or t.device != device:
        got = f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"
        raise ValueError(
            f"{name} does not fit this plan ({what}): expected shape {shape}, {dtype}, on {device}; got {got}"
        )
    if dense and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel reads it as dense memory): pass {name}.contiguous()")


class AttentionPlan:
    """What attention plans share at run time: the output, LSE and sinks arguments. Subclasses set
    ``device``, ``return_lse``, ``with_sinks``, ``num_q_heads``, ``_out_shape``, ``_out_dtype`` and ``_lse_shape``
    and call :meth:`_init_outputs`."""

    device: torch.device
    return_lse: bool
    with_sinks: bool
    num_q_heads: int
    _out_shape: tuple
    _out_dtype: torch.dtype
    _lse_shape: tuple

    def _init_outputs(self) -> None:
        self._no_lse = _runtime.empty((1,), torch.float32, self.device)  # the LSE argument when none is stored

    def _outputs(self, out: torch.Tensor | None, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and LSE a run writes: the caller's (checked) or fresh ones; without return_lse the plan's
        1-element placeholder stands for the LSE (the kernel never writes it)."""
        dev = self.device
        if out is None:
            out = _runtime.empty(self._out_shape, self._out_dtype, dev)
        else:
            expect("out", out, self._out_shape, self._out_dtype, dev, "the output")
        if not self.return_lse:
            if lse is not None:
                raise ValueError("lse is an output only of plans made with return_lse=True")
            return out, self._no_lse
        if lse is None:
            return out, _runtime.empty(self._lse_shape, torch.float32, dev)
        expect("lse", lse, self._lse_shape, torch.float32, dev, "the LSE output")
        if not lse.is_contiguous():
            raise ValueError("lse must be contiguous")
        return out, lse

    def _sinks(self, sinks: torch.Tensor | None) -> torch.Tensor | None:
        """This layer's sinks, float32 (num_q_heads,), required exactly when the plan was made with_sinks."""
        if self.with_sinks and sinks is None:
            raise ValueError("this plan was made with_sinks=True: pass this layer's sinks")
        if not self.with_sinks and sinks is not None:
            raise ValueError("this plan was made without sinks (with_sinks=False): make one with_sinks=True")
        if sinks is not None:
            expect("sinks", sinks, (self.num_q_heads,), torch.float32, self.device, "one logit per query head")
        return sinks


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, plan: object) -> None:
    """That one layer's caches have the layout (shape, dtype, strides, device) the plan was made for."""
    layout: _paged.CacheLayout = plan.layout
    shape = (layout.num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        expect(name, cache, shape, layout.dtype, plan.device, "another cache layout")
        if cache.stride() != layout.strides:
            raise ValueError(f"{name} does not fit this plan: strides {cache.stride()}, planned {layout.strides}")


def check_paged_options(
    layout: _paged.CacheLayout,
    num_q_heads: int,
    q_dtype: torch.dtype,
    block_table_width: int,
    sm_scale: float | None,
    softcap: float | None,
    window: int | None,
) -> None:
    """The checks the paged attention plans share: query geometry against the cache, table width, options."""
    check_q_dtype(q_dtype, layout)
    _validate.head_dim("k_cache", layout.head_dim, _validate.HEAD_DIMS)
    _validate.gqa(num_q_heads, layout.num_kv_heads)
    if layout.num_kv_heads > _validate.MAX_GRID_YZ:
        raise ValueError(f"k_cache has {layout.num_kv_heads} KV heads; at most {_validate.MAX_GRID_YZ} are supported")
    if not isinstance(block_table_width, int) or isinstance(block_table_width, bool) or block_table_width < 0:
        raise ValueError(f"block_table_width must be an int >= 0, got {block_table_width!r}")
    _validate.positive_float("sm_scale", sm_scale)
    _validate.positive_float("softcap", softcap)
    _validate.window(window)


def check_q_dtype(q_dtype: torch.dtype, layout: _paged.CacheLayout) -> None:
    if q_dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"q_dtype must be one of {_validate.FLOAT_DTYPES}, got {q_dtype}")
    if not layout.is_fp8 and q_dtype != layout.dtype:
        raise TypeError(f"q_dtype {q_dtype} must be the cache's dtype {layout.dtype} (or use fp8 KV)")
