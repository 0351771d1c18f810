"""Paged decode attention: one new query token per sequence against its paged KV cache, at the bandwidth limit.

A decode step reads every cached key and value of every sequence once and does ~1 FLOP per byte with it (per query
head of a GQA group), so the kernel is judged by how close it streams the cache to the HBM limit. The design:

- one program per (sequence, KV head, split). The query heads that share the KV head (the GQA group) are one
  (BLOCK_H, head_dim) tile, BLOCK_H = max(16, next_pow2(group)) rows (padding rows are masked), so each K/V tile
  is read from memory once per KV head and the scores come from one tensor-core ``tl.dot(q, k^T)``;
- the KV tile (BLOCK_N tokens) is decoupled from the page size (token t lives in page
  ``block_table[b, t // page_size]`` at offset ``t % page_size``), so small pages (8, 16) do not shrink the loads;
  the block table is still read once per page, not per token: a tile inside one page reads one page id, a tile
  over several pages reads their ids as one small vector (:func:`kernels._paged.tile_rows`). Addresses are int64;
- whole tiles inside the visible keys are folded without per-key masks; only the window's edge tile and the
  context's last tile are masked (the predicates cost more integer instructions per tile than the addresses);
- split-KV (flash-decoding): when batch × kv_heads cannot fill the GPU, the context is cut into ``num_splits``
  contiguous ranges of whole tiles, computed in-kernel from ``seq_lens`` (no host sync). Each split writes a
  partial fp32 output and its log-sum-exp, and a second small kernel merges them (:mod:`kernels.merge`). With one
  split the merge is skipped and the output is written directly. Splits that get no tile write lse = -inf;
- online softmax in the log2 domain with the shared helpers of :mod:`kernels._jit`, exactly as prefill (the query
  sits at position seq_len - 1: a window keeps keys ``j > seq_len - 1 - window``, and whole tiles before the window
  are never read);
- fp8 (e4m3) caches are loaded as fp8 (half the bytes) and converted to the query's dtype in registers. The
  per-tensor scales cost no per-element multiply: ``k_scale`` is folded into the logit scale and ``v_scale``
  multiplies the output once (attention is linear in V);
- tile size, warps and pipeline depth are autotuned per (head_dim, group, page size, dtypes, occupancy), or taken
  from :func:`default_config` when autotuning is off (``PHASEATTN_AUTOTUNE=0``, and in the interpreter).

Layout: q (batch, num_q_heads, head_dim); caches (num_pages, page_size, num_kv_heads, head_dim); block_table
int32 (batch, max_pages); seq_lens int32 (batch,).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import _paged, _plan, _runtime, _validate
from kernels._jit import finish_and_store, log2_logit_scale, online_softmax_step, scale_scores
from kernels._paged import load_scale, tile_rows
from kernels.merge import merge_splits

HEAD_DIMS = _validate.HEAD_DIMS
MAX_SPLITS = 256
MIN_TOKENS_PER_SPLIT = 256
"""The automatic split never cuts a context into pieces shorter than this (each split pays a q load and a
partial write; below ~256 tokens that overhead stops being small next to the K/V it reads)."""
MAX_GRID_YZ = _validate.MAX_GRID_YZ


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_base, v_base, block_table_row, stride_btp, start_n, first, end, offs_d, d_ok,
    stride_page, stride_token, stride_cd, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold the key tile at ``start_n`` (a multiple of BLOCK_N) into the running softmax of the query heads ``q``.
    Only a MASKED tile checks its keys against ``[first, end)``: the others lie inside it, and their loads and
    scores carry no per-key predicate (the predicates cost more integer instructions than the addresses)."""
    k_rows, v_rows = tile_rows(
        k_base, v_base, block_table_row, stride_btp, start_n, first, end, BLOCK_N, PAGE_SIZE, stride_page,
        stride_token, True,
    )  # fmt: skip
    k_ptrs = k_rows[None, :] + offs_d[:, None] * stride_cd
    v_ptrs = v_rows[:, None] + offs_d[None, :] * stride_cd
    if MASKED:
        tokens = start_n + tl.arange(0, BLOCK_N)
        valid = (tokens >= first) & (tokens < end)
        k = tl.load(k_ptrs, mask=valid[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = scale_scores(tl.dot(q, k.to(q.dtype), input_precision=PRECISION), qk_scale, softcap, HAS_SOFTCAP)
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    # Every visited tile holds at least one visible key, so no row of it is empty.
    p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s, False)
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(
    Q,
    KCache,
    VCache,
    BlockTable,
    SeqLens,
    Out,
    Lse,
    PartOut,
    PartLse,
    Sinks,
    k_scale,
    v_scale,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_page,
    stride_token,
    stride_head,
    stride_cd,
    stride_btb,
    stride_btp,
    stride_sl,
    stride_ob,
    stride_oh,
    stride_od,
    num_q_heads,
    qk_scale,
    softcap,
    window,
    occupancy,  # programs per SM, a power of two <= 8: read by the autotuner's key only
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
    K_SCALE_IN_MEMORY: tl.constexpr,
    V_SCALE_IN_MEMORY: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    SPLIT: tl.constexpr,
    STORE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(SeqLens + b * stride_sl)

    # The query (position seq_len - 1) sees keys [first, seq_len). The splits share the whole tiles from the one
    # holding `first` onwards; tiles before the window are never visited.
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    lo = (first // BLOCK_N) * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - lo, BLOCK_N), num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    heads = kv_head * GROUP + tl.arange(0, BLOCK_H)
    h_ok = tl.arange(0, BLOCK_H) < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    if IS_FP8:
        qk_scale *= load_scale(k_scale, K_SCALE_IN_MEMORY)  # K = k_scale · K_fp8: scale the logits, not K

    block_table_row = BlockTable + b * stride_btb
    k_base = KCache + kv_head * stride_head
    v_base = VCache + kv_head * stride_head
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # Whole tiles inside [first, end) need no mask; at most two tiles do (the window's edge, the context's end).
    body_lo = start
    if HAS_WINDOW:
        body_lo = tl.maximum(start, tl.cdiv(first, BLOCK_N) * BLOCK_N)
    body_hi = tl.maximum(body_lo, (end // BLOCK_N) * BLOCK_N)
    n_head = (start < tl.minimum(body_lo, end)).to(tl.int32)
    n_edge = n_head + (body_hi < end).to(tl.int32)
    for i in tl.range(0, n_edge):
        start_n = tl.where(i < n_head, start, body_hi)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, block_table_row, stride_btp, start_n, first, end, offs_d, d_ok,
            stride_page, stride_token, stride_cd, qk_scale, softcap,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, True, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    for start_n in tl.range(body_lo, body_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, block_table_row, stride_btp, start_n, first, end, offs_d, d_ok,
            stride_page, stride_token, stride_cd, qk_scale, softcap,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, False, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip

    finish_and_store(
        acc, m_i, l_i, b, heads, h_ok, offs_d, d_ok, Sinks, v_scale, Out, Lse, PartOut, PartLse,
        stride_ob, stride_oh, stride_od, num_q_heads, split, num_splits,
        HEAD_DIM, HAS_SINKS, IS_FP8, V_SCALE_IN_MEMORY, SPLIT, STORE_LSE,
    )  # fmt: skip


def default_config(head_dim: int, group: int, dtype: torch.dtype) -> dict:
    """The heuristic tile config (used in the interpreter, and on the GPU when autotuning is off); ``dtype`` is
    the query's. Chosen spill-free on sm_90/sm_80 by ``bench/compile_check.py``."""
    if _runtime.INTERPRET:  # the interpreter's cost is per program and per loop iteration: big tiles
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # IEEE fp32 dots are FMA loops: small tiles, no pipelining, or they spill
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if max(16, _runtime.next_power_of_2(group)) * _runtime.next_power_of_2(head_dim) > 16 * 128:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}  # big q tile and accumulator: smaller KV tiles
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


TUNING_SPACE = [  # (BLOCK_N, num_warps, num_stages)
    (64, 4, 2),
    (64, 4, 3),
    (64, 4, 4),
    (128, 4, 2),
    (128, 4, 3),
    (128, 8, 2),
    (32, 4, 3),
    (32, 4, 4),
    (32, 2, 4),
]


def _prune(configs, named_args, **kwargs):
    """Drop configs whose pipelined K/V tiles cannot fit in shared memory (large head dims)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elem = max(named_args["KCache"].element_size(), named_args["Q"].element_size())
    kept = [c for c in configs if c.num_stages * 2 * c.kwargs["BLOCK_N"] * block_d * elem <= 160 * 1024]
    return kept or configs[-1:]


_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in TUNING_SPACE],
    key=["HEAD_DIM", "BLOCK_H", "PAGE_SIZE", "IS_FP8", "HAS_SINKS", "occupancy", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_decode_kernel)


def choose_num_splits(batch: int, num_kv_heads: int, context: int, num_sms: int) -> int:
    """The automatic split count: aim for about two programs per SM (a bandwidth-bound kernel needs several
    CTAs' loads in flight on every SM), but never split a context into pieces shorter than MIN_TOKENS_PER_SPLIT.
    ``context`` is the longest number of keys any query sees (the window caps it)."""
    programs = batch * num_kv_heads
    wanted = max(1, (2 * num_sms) // max(programs, 1))
    return max(1, min(wanted, context // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new query token per sequence over its paged KV cache (the decode step).

    Args:
        q: (batch, num_q_heads, head_dim), float16 / bfloat16 / float32, any strides: the newest token of each
            sequence, whose own K/V are already in the cache at position seq_lens[b] - 1. head_dim in
            a multiple of 16 from 32 to 256.
        k_cache, v_cache: (num_pages, page_size, num_kv_heads, head_dim) ("NHD" pages; page_size a power of two
            from 1 to 256), same shape, dtype, strides and device, as filled by :func:`kernels.write_kv_cache`.
            dtype is q's dtype, or float8_e4m3fn with ``k_scale``/``v_scale`` (GPUs: compute capability >= 8.9).
            num_q_heads must be a multiple of num_kv_heads (GQA; MQA when num_kv_heads == 1).
        block_table: int32 (batch, max_pages_per_seq), any strides: row b lists sequence b's pages in order (any
            page ids, in any order); entries past the sequence's last page are never read.
        seq_lens: int32 (batch,), any stride: the number of cached tokens of each sequence (the query included).
            A length of 0 is a padding row (e.g. of a captured CUDA graph): it reads no page and gets out = 0,
            lse = -inf.
        sm_scale: softmax scale, default 1/sqrt(head_dim).
        softcap: logits become softcap * tanh(logits / softcap) after scaling.
        window: sliding window: the query at position p = seq_len - 1 sees keys p - window < j <= p.
        k_scale, v_scale: for float8_e4m3fn caches only (required there): per-tensor float32 dequant scales
            (real value = scale · stored value), each a Python number or a 1-element float32 tensor on the cache's
            device (read in-kernel: no sync).
        num_splits: split-KV factor in 1..256. None picks it from batch × num_kv_heads against the SM count and
            the longest context, which copies seq_lens to the host (a sync). Given, the launch makes no
            device-to-host sync and can be captured in a CUDA graph (when autotuning, after a first call outside
            the capture); more splits than the context has tiles is allowed (empty splits are merged away).
        return_lse: also return the natural-log log-sum-exp of the scaled logits, float32 (batch, num_q_heads);
            with sinks it includes the sink term (merge with it on one side only, see prefill_attention).
        sinks: float32 (num_q_heads,) or None: one logit per query head that joins the softmax denominator and
            carries no value: out = sum_j e^(s_j) v_j / (e^(sinks[h]) + sum_j e^(s_j)) (lse = sinks[h] when
            seq_len is 0).

    Returns:
        out (batch, num_q_heads, head_dim) in q's dtype, contiguous; with ``return_lse`` also the LSE.

    Checks: shapes, dtypes and options always. The values of seq_lens (>= 0, within the block table's width and
    the cache) are checked on CPU tensors, with ``kernels.set_debug(True)``, or when num_splits is None (which
    syncs anyway). Page ids in the block table are checked only on CPU tensors or with ``kernels.set_debug(True)``:
    on CUDA without debug an out-of-range page id reads outside the cache.

    Raises:
        TypeError / ValueError before any launch, naming the argument, for malformed input.
    """
    layout = _paged.cache_layout(k_cache, v_cache)
    _validate.tensor("q", q, 3, _validate.FLOAT_DTYPES)
    _validate.same_device(q=q, k_cache=k_cache)
    _validate.index_tensor("block_table", block_table, 2, (torch.int32,), like=k_cache, strided=True)
    _validate.index_tensor("seq_lens", seq_lens, 1, (torch.int32,), like=k_cache, strided=True)
    batch, num_q_heads, head_dim = q.shape
    if head_dim != layout.head_dim:
        raise ValueError(
            f"q has head_dim {head_dim} but the cache has {layout.head_dim} (shape {tuple(k_cache.shape)})"
        )
    _validate.head_dim("q", head_dim, HEAD_DIMS)
    _validate.gqa(num_q_heads, layout.num_kv_heads)
    if not layout.is_fp8 and q.dtype != layout.dtype:
        raise TypeError(f"q has dtype {q.dtype} but the cache has {layout.dtype}; they must match (or use fp8 KV)")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per sequence ({batch}), got shape {tuple(block_table.shape)}")
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have one length per sequence ({batch}), got shape {tuple(seq_lens.shape)}")
    if layout.num_kv_heads > MAX_GRID_YZ:
        raise ValueError(f"k_cache has {layout.num_kv_heads} KV heads; at most {MAX_GRID_YZ} are supported")
    _validate.positive_float("sm_scale", sm_scale)
    _validate.positive_float("softcap", softcap)
    _validate.sinks(sinks, num_q_heads, q)
    _validate.window(window)
    if num_splits is not None and (
        not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= MAX_SPLITS
    ):
        raise ValueError(f"num_splits must be an int in 1..{MAX_SPLITS} or None, got {num_splits!r}")
    ks, vs, _, _ = _paged.scale_args(layout, k_scale, v_scale, k_cache.device)

    if num_splits is None or _runtime.values_checkable(seq_lens):
        longest = _paged.check_lengths(layout, block_table, seq_lens, pages=_runtime.values_checkable(block_table))
        if num_splits is None:
            context = longest if window is None else min(longest, window)
            num_splits = choose_num_splits(batch, layout.num_kv_heads, context, _runtime.sm_count(q.device))

    return_lse = bool(return_lse)
    out, lse = torch.ops.phaseattn.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        None if sm_scale is None else float(sm_scale),
        None if softcap is None else float(softcap),
        window,
        sinks,
        *_paged.scale_op_args(ks),
        *_paged.scale_op_args(vs),
        num_splits,
        return_lse,
    )
    return (out, lse) if return_lse else out


def launch_spec(
    batch: int,
    num_q_heads: int,
    layout: _paged.CacheLayout,
    q_dtype: torch.dtype,
    num_splits: int,
    sm_scale: float | None,
    softcap: float | None,
    window: int | None,
    ks_in_memory: bool,
    vs_in_memory: bool,
    with_sinks: bool,
    return_lse: bool,
    device: torch.device,
    config: dict,
) -> tuple[tuple, tuple, dict]:
    """The kernel launch that host metadata implies, shared by :func:`launch` and :class:`PagedDecodePlan`:
    (grid, the scalar arguments after the strides, the constexpr and config keyword arguments). ``config`` is
    the tile config (``{}`` lets the autotuner pick it)."""
    head_dim, group = layout.head_dim, num_q_heads // layout.num_kv_heads
    programs = batch * layout.num_kv_heads * num_splits
    scalars = (
        num_q_heads,
        log2_logit_scale(head_dim, sm_scale),
        float(softcap or 0.0),
        int(window or 0),
        min(8, _runtime.next_power_of_2(_runtime.cdiv(max(programs, 1), _runtime.sm_count(device)))),
    )
    constexprs = {
        "GROUP": group,
        "BLOCK_H": max(16, _runtime.next_power_of_2(group)),
        **_paged.attention_constexprs(
            layout, q_dtype, ks_in_memory, vs_in_memory, window, softcap, with_sinks, num_splits, return_lse
        ),
        **config,
    }
    return (batch, layout.num_kv_heads, num_splits), scalars, constexprs


def issue(
    kernel,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    partials: tuple[torch.Tensor, torch.Tensor] | None,
    sinks: torch.Tensor | None,
    scales: tuple,
    layout: _paged.CacheLayout,
    scalars: tuple,
    constexprs: dict,
    return_lse: bool,
    cu_seqlens_q: torch.Tensor | None = None,
) -> None:
    """Launch ``kernel`` (the grid-bound kernel) with the arguments of :func:`launch_spec`, then merge the split
    partials (``partials``: float32 (rows, Hq, S, D) and (rows, Hq, S), None for one split) into out/lse.

    The paged prefill kernel launches through here too: its parameters are decode's with ``CuSeqlensQ`` after
    ``SeqLens`` (``cu_seqlens_q``), and its ``launch_spec`` gives its own scalars and constexprs."""
    part_out, part_lse = partials or (out, lse)  # without splits never touched: the kernel writes out/lse
    index = (seq_lens,) if cu_seqlens_q is None else (seq_lens, cu_seqlens_q)
    kernel(
        q,
        k_cache,
        v_cache,
        block_table,
        *index,
        out,
        lse,
        part_out,
        part_lse,
        part_lse if sinks is None else sinks,
        *scales,
        *q.stride(),
        *layout.strides,
        *block_table.stride(),
        seq_lens.stride(0),
        *out.stride(),
        *scalars,
        **constexprs,
    )
    if partials is not None:
        merge_splits(part_out, part_lse, out, lse, sinks, return_lse)


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None,
    softcap: float | None,
    window: int | None,
    sinks: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    k_scale_value: float,
    v_scale: torch.Tensor | None,
    v_scale_value: float,
    num_splits: int,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind ``torch.ops.phaseattn.paged_decode_attention`` (see :mod:`kernels._ops`), on inputs
    :func:`paged_decode_attention` has validated: returns (out, lse), lse empty (0,) unless ``return_lse``."""
    layout = _paged.cache_layout(k_cache, v_cache)
    batch, num_q_heads, head_dim = q.shape
    ks, ks_in_memory = _paged.scale_from_op_args(k_scale, k_scale_value)
    vs, vs_in_memory = _paged.scale_from_op_args(v_scale, v_scale_value)
    out = _runtime.empty((batch, num_q_heads, head_dim), q.dtype, q.device)
    lse = _runtime.empty((batch, num_q_heads) if return_lse else (1,), torch.float32, q.device)
    if batch == 0:
        return out, lse if return_lse else lse[:0]
    partials = None
    if num_splits > 1:
        partials = (
            _runtime.empty((batch, num_q_heads, num_splits, head_dim), torch.float32, q.device),
            _runtime.empty((batch, num_q_heads, num_splits), torch.float32, q.device),
        )
    if _runtime.AUTOTUNE:
        kernel, config = _autotuned, {}
    else:
        kernel, config = _decode_kernel, default_config(head_dim, num_q_heads // layout.num_kv_heads, q.dtype)
    grid, scalars, constexprs = launch_spec(
        batch, num_q_heads, layout, q.dtype, num_splits, sm_scale, softcap, window, ks_in_memory, vs_in_memory,
        sinks is not None, return_lse, q.device, config,
    )  # fmt: skip
    issue(
        kernel[grid], q, k_cache, v_cache, block_table, seq_lens, out, lse, partials, sinks, (ks, vs), layout, scalars,
        constexprs, return_lse,
    )  # fmt: skip
    return out, lse if return_lse else lse[:0]


class PagedDecodePlan(_plan.AttentionPlan):
    """:func:`paged_decode_attention` planned once per decode step, run per layer (see :mod:`kernels._plan`).

    Args:
        k_cache, v_cache: any layer's caches: the layout (shape, dtype, strides, device) every layer's must have.
        seq_lens: the step's context lengths on the host (list of ints or CPU tensor), each >= 0 (0: a padding
            row), the query included. The device ``seq_lens`` given to :meth:`run` must hold the same values.
        num_q_heads: query heads (a multiple of the cache's KV heads); q_dtype: the query's dtype.
        block_table_width: columns of the block table given to :meth:`run`.
        block_table: optionally the block table on the host (list of lists or CPU tensor): its used page ids are
            then checked to be pages of the cache.
        sm_scale, softcap, window, k_scale, v_scale, num_splits, return_lse: as in :func:`paged_decode_attention`
            (``num_splits=None`` is chosen here from the host lengths, exactly as the one-call function would).
        with_sinks: every :meth:`run` gets this layer's ``sinks`` (float32 (num_q_heads,)).
        workspace: where split partials live (a new one when None): pass one :class:`kernels.Workspace` to every
            step's plan to reuse its memory.
        config: ``{"BLOCK_N", "num_warps", "num_stages"}`` (default: :func:`default_config`).

    Raises:
        TypeError / ValueError naming the argument, for malformed metadata.
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
        with_sinks: bool = False,
        workspace: _plan.Workspace | None = None,
        config: dict | None = None,
    ):
        layout = _paged.cache_layout(k_cache, v_cache)
        device = k_cache.device
        lens = _plan.host_ints("seq_lens", seq_lens)
        batch = len(lens)
        _plan.check_paged_options(layout, num_q_heads, q_dtype, block_table_width, sm_scale, softcap, window)
        _plan.check_num_splits(num_splits, MAX_SPLITS)
        ks, vs, ks_in_memory, vs_in_memory = _paged.scale_args(layout, k_scale, v_scale, device)
        longest = _plan.check_host_lengths(lens, layout, block_table_width)
        if block_table is not None:
            _plan.check_host_pages(block_table, lens, layout, block_table_width)
        if num_splits is None:
            context = longest if window is None else min(longest, window)
            num_splits = choose_num_splits(batch, layout.num_kv_heads, context, _runtime.sm_count(device))

        self.batch, self.num_q_heads, self.num_splits = batch, num_q_heads, num_splits
        self.return_lse, self.with_sinks, self.device, self.layout = return_lse, with_sinks, device, layout
        self._out_shape = (batch, num_q_heads, layout.head_dim)
        self._out_dtype = q_dtype
        self._lse_shape = (batch, num_q_heads)
        self._table_shape = (batch, block_table_width)
        self._init_outputs()
        if num_splits > 1:
            self._partials = (workspace or _plan.Workspace(device)).partials(
                batch, num_q_heads, num_splits, layout.head_dim
            )
        else:
            self._partials = None
        grid, self._scalars, self._constexprs = launch_spec(
            batch, num_q_heads, layout, q_dtype, num_splits, sm_scale, softcap, window, ks_in_memory, vs_in_memory,
            with_sinks, return_lse, device,
            config or default_config(layout.head_dim, num_q_heads // layout.num_kv_heads, q_dtype),
        )  # fmt: skip
        self._kernel = _decode_kernel[grid]  # bound once: run only calls it
        self._scales = (ks, vs)

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        sinks: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer's attention: as :func:`paged_decode_attention` with the plan's options.

        q: (batch, num_q_heads, head_dim) in the planned dtype; k_cache/v_cache: this layer's caches in the planned
        layout; block_table: int32 (batch, block_table_width); seq_lens: int32 (batch,) holding the planned lengths;
        sinks: this layer's, when planned with_sinks. ``out`` (any strides) and, with return_lse, ``lse``
        (contiguous) are written when given. Returns out, or (out, lse) when the plan was made with return_lse.
        """
        dev = self.device
        _plan.expect("q", q, self._out_shape, self._out_dtype, dev, "another batch or head count")
        _plan.check_caches(k_cache, v_cache, self)
        _plan.expect("block_table", block_table, self._table_shape, torch.int32, dev, "another batch")
        _plan.expect("seq_lens", seq_lens, self._table_shape[:1], torch.int32, dev, "another batch")
        sinks = self._sinks(sinks)
        out, lse = self._outputs(out, lse)
        if self.batch:
            issue(
                self._kernel, q, k_cache, v_cache, block_table, seq_lens, out, lse, self._partials, sinks,
                self._scales, self.layout, self._scalars, self._constexprs, self.return_lse,
            )  # fmt: skip
        return (out, lse) if self.return_lse else out
