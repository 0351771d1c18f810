"""Paged prefill attention: new query tokens of each sequence against its paged KV cache, which already holds a
prefix. One kernel for chunked prefill, prefix reuse, continuing an imported KV, and multi-token decode
(speculative verification).

Sequence b has Lq_b new queries (packed in q by ``cu_seqlens_q``) and ``seq_lens[b]`` cached tokens, the new ones
last. Query i sits at position ``seq_lens[b] - Lq_b + i`` and, causally, sees keys j <= its position (bottom-right,
as :func:`kernels.prefill_attention`).

The design, one kernel with one schedule and two launch configurations:

- a program owns one KV head of one sequence and a tile of BLOCK_Q consecutive queries, and packs *all* query
  heads of the GQA group into its tile: row r is query ``r // GROUP_P``, head ``r % GROUP_P`` of the group
  (GROUP_P = next power of two of the group size; padding rows are masked). A (BLOCK_Q · GROUP_P, head_dim) query
  tile meets each K/V tile once per KV head (not once per query head) and the scores are one tensor-core dot.
  With one query this is exactly decode's layout (:mod:`kernels.decode`); with many it is prefill's query tiling
  with the group folded in (as FA3's PackGQA and vLLM's unified Triton attention do);
- launch configurations (:func:`launch_config`): *short* query runs (max Lq_b <= SHORT_QUERIES, speculative
  verification and multi-token decode) take the smallest tile that holds the whole run (at least 16 rows for the
  tensor cores) and split the context like decode; *long* runs (chunked prefill) take prefill's 128-row tiles.
  Both split the key range (flash-decoding) when batch × KV heads × query tiles cannot fill the GPU; split
  partials are merged by :func:`kernels.merge.merge_splits` through their LSEs;
- the KV tile (BLOCK_N) is decoupled from the page size: each tile reads its pages' ids from the block table, one
  per page (:func:`kernels._paged.tile_rows`), so pages of 1 to 256 tokens all stream in full tiles;
- only tiles some query of the tile can see are visited: the key range is cut into a masked head (window edge),
  an unmasked body and a masked tail (diagonal, sequence end) by :func:`kernels._jit.key_tiles`, shared with
  prefill, and folded by :func:`kernels._jit.attend_tiles` (the same online softmax and masking as prefill);
- fp8 caches: ``k_scale`` folded into the logit scale, ``v_scale`` applied to the output once, as decode does;
- no host sync when ``max_seqlen_q`` and ``num_splits`` are given (the grid needs only those two numbers).

Layout: q (total_q, num_q_heads, head_dim); caches (num_pages, page_size, num_kv_heads, head_dim), NHD pages as
:func:`kernels.paged_decode_attention`; block_table int32 (batch, max_pages); cu_seqlens_q int32 (batch + 1,);
seq_lens int32 (batch,).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import _paged, _plan, _runtime, _validate
from kernels._jit import attend_tiles, finish_and_store, key_tiles, log2_logit_scale
from kernels._paged import load_scale
from kernels.decode import MAX_SPLITS, choose_num_splits, issue

HEAD_DIMS = _validate.HEAD_DIMS
SHORT_QUERIES = 16
"""Query runs up to this long use the short (decode-like) launch configuration."""
MAX_GRID_YZ = _validate.MAX_GRID_YZ


# fmt: off
@triton.jit
def _paged_prefill_kernel(
    Q, KCache, VCache, BlockTable, SeqLens, CuSeqlensQ, Out, Lse, PartOut, PartLse, Sinks, k_scale, v_scale,
    stride_qt, stride_qh, stride_qd, stride_page, stride_token, stride_head, stride_cd,
    stride_btb, stride_btp, stride_sl, stride_ot, stride_oh, stride_od,
    batch, num_q_heads, qk_scale, softcap, window,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr, K_SCALE_IN_MEMORY: tl.constexpr, V_SCALE_IN_MEMORY: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    seq = pid % batch
    q_block = tl.num_programs(0) // batch - 1 - pid // batch  # longest-first: the last query tiles see the most
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    q_start = tl.load(CuSeqlensQ + seq)
    seqlen_q = tl.load(CuSeqlensQ + seq + 1) - q_start
    q0 = q_block * BLOCK_Q
    if q0 >= seqlen_q:
        return
    seq_len = tl.load(SeqLens + seq.to(tl.int64) * stride_sl)
    prefix = seq_len - seqlen_q

    offs_m = tl.arange(0, BLOCK_M)
    qi = q0 + offs_m // GROUP_P
    head = kv_head * GROUP + offs_m % GROUP_P
    row_ok = (qi < seqlen_q) & (offs_m % GROUP_P < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + qi).to(tl.int64)
    q_ptrs = Q + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if IS_FP8:
        qk_scale *= load_scale(k_scale, K_SCALE_IN_MEMORY)  # K = k_scale · K_fp8: scale the logits, not K

    last_q = tl.minimum(q0 + BLOCK_Q, seqlen_q) - 1
    key_lo, key_hi, head_lo, n_head, body_lo, n_body, tail_lo, n_tail = key_tiles(
        prefix + q0, prefix + last_q, seq_len, window, split, num_splits, BLOCK_N, CAUSAL, HAS_WINDOW)
    k_base = KCache + kv_head * stride_head
    v_base = VCache + kv_head * stride_head
    block_table_row = BlockTable + seq.to(tl.int64) * stride_btb
    pos = prefix + qi
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, block_table_row, stride_btp,
        stride_token, stride_cd, stride_token, stride_cd, stride_page,
        body_lo, n_body, body_lo, n_body, key_lo, key_hi, pos, window, qk_scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, block_table_row, stride_btp,
        stride_token, stride_cd, stride_token, stride_cd, stride_page,
        head_lo, n_head, tail_lo, n_head + n_tail, key_lo, key_hi, pos, window, qk_scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
    finish_and_store(
        acc, m_i, l_i, token, head, row_ok, offs_d, d_ok, Sinks, v_scale, Out, Lse, PartOut, PartLse,
        stride_ot, stride_oh, stride_od, num_q_heads, split, num_splits,
        HEAD_DIM, HAS_SINKS, IS_FP8, V_SCALE_IN_MEMORY, SPLIT, STORE_LSE,
    )
# fmt: on


def launch_config(max_seqlen_q: int, group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The tile configuration for a batch whose longest query run is ``max_seqlen_q``: BLOCK_Q queries × GROUP_P
    heads per tile (BLOCK_M rows), BLOCK_N keys per KV tile, warps and pipeline stages. ``dtype`` is q's.
    Chosen spill-free on sm_90/sm_80 by ``bench/compile_check.py``."""
    group_p = _runtime.next_power_of_2(group)
    block_d = _runtime.next_power_of_2(head_dim)
    most = 128 if block_d <= 128 else 64  # prefill's query tiles: the accumulator must stay in registers
    if max_seqlen_q <= SHORT_QUERIES:  # the whole run in one tile (decode's layout when it is one query)
        rows = min(_runtime.next_power_of_2(max(max_seqlen_q, 1)) * group_p, most)
    elif _runtime.INTERPRET or dtype == torch.float32:  # big tiles for the interpreter; fp32 FMA dots: small
        rows = 64 if _runtime.INTERPRET else 32
    else:
        rows = most
    block_q = max(1, rows // group_p, _runtime.cdiv(16, group_p))  # tensor-core dots need 16 rows
    block_m = block_q * group_p
    if _runtime.INTERPRET:  # the interpreter's cost is per program and per loop iteration: big tiles
        block_n, warps, stages = 64, 4, 1
    elif dtype == torch.float32:  # IEEE fp32 dots are FMA loops: small tiles, or they spill
        block_n, warps, stages = 16, 4 if block_m <= 32 else 8, 1
    elif block_m >= 64:  # prefill's configs (see kernels.prefill.default_config)
        block_n, warps, stages = (64, 8, 3) if block_d <= 64 else (64, 8, 2) if block_d <= 128 else (32, 8, 2)
    elif block_m * block_d > 16 * 128:  # decode's configs (see kernels.decode.default_config)
        block_n, warps, stages = 32, 4, 3
    else:
        block_n, warps, stages = 64, 4, 3
    return {"BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def plan_num_splits(
    batch: int,
    max_seqlen_q: int,
    longest: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    window: int | None = None,
) -> int:
    """The split-KV factor ``num_splits=None`` picks, from host-side numbers only (an engine can plan it once
    per step and pass it, making the launch sync-free): decode's rule (:func:`kernels.decode.choose_num_splits`)
    with batch × query tiles programs per KV head, and the keys one query tile sees as the context."""
    config = launch_config(max_seqlen_q, num_q_heads // num_kv_heads, head_dim, dtype)
    q_tiles = _runtime.cdiv(max_seqlen_q, config["BLOCK_Q"])
    context = longest if window is None else min(longest, window + config["BLOCK_Q"])
    return choose_num_splits(batch * q_tiles, num_kv_heads, context, _runtime.sm_count(device))


def _check_values(
    layout: _paged.CacheLayout,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    total_q: int,
    pages: bool,
) -> tuple[int, int]:
    """Copy the index tensors to the host (a sync on CUDA) and check their values; returns the longest query run
    and the longest sequence."""
    q_lens = _validate.cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, total_q)
    longest = _paged.check_lengths(layout, block_table, seq_lens, pages)
    lens = seq_lens.cpu().long()
    over = q_lens > lens
    if bool(over.any()):
        b = int(over.nonzero()[0])
        raise ValueError(
            f"sequence {b} has {int(q_lens[b])} new queries (cu_seqlens_q) but seq_lens[{b}] = {int(lens[b])}: "
            "the cache must already hold every query's own K/V (write them with write_kv_cache first)"
        )
    return (int(q_lens.max()) if q_lens.numel() else 0), longest


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new query tokens over their sequences' paged KV caches (chunked prefill, prefix reuse,
    multi-token decode).

    Args:
        q: (total_q, num_q_heads, head_dim), float16 / bfloat16 / float32, any strides: the new tokens of every
            sequence, packed (sequence b's are ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``). head_dim a multiple
            of 16 from 32 to 256.
        k_cache, v_cache: (num_pages, page_size, num_kv_heads, head_dim) ("NHD" pages, page_size a power of two
            from 1 to 256), as for :func:`kernels.paged_decode_attention`: they already hold all ``seq_lens[b]``
            tokens of sequence b, the new ones last (write them first with :func:`kernels.write_kv_cache`).
            dtype is q's, or float8_e4m3fn with ``k_scale``/``v_scale``. num_q_heads a multiple of num_kv_heads.
        block_table: int32 (batch, max_pages_per_seq): row b lists sequence b's pages in order; entries past its
            last page are never read.
        cu_seqlens_q: int32 (batch + 1,) offsets of each sequence's new queries in q, from 0 to total_q.
        seq_lens: int32 (batch,): tokens in the cache per sequence, each >= its number of new queries Lq_b.
            Query i of sequence b sits at position ``seq_lens[b] - Lq_b + i``. Lq_b = 0 (nothing to do for b)
            and Lq_b = seq_lens[b] (no prefix) both work.
        causal: with causal masking query i sees keys j <= its position (bottom-right); without, every key.
        sm_scale: softmax scale, default 1/sqrt(head_dim).
        softcap: logits become softcap * tanh(logits / softcap) after scaling.
        window: sliding window (requires causal): a query at position p sees keys p - window < j <= p.
        sinks: float32 (num_q_heads,) or None: one logit per query head that joins every row's softmax
            denominator and carries no value: out = sum_j e^(s_j) v_j / (e^(sinks[h]) + sum_j e^(s_j)).
        k_scale, v_scale: for float8_e4m3fn caches only (required there): per-tensor float32 dequant scales, a
            Python number or a 1-element float32 tensor on the cache's device (read in-kernel: no sync).
        max_seqlen_q: the longest Lq_b (the launch grid's size). None reads cu_seqlens_q on the host (a sync).
        num_splits: split-KV factor in 1..256. None picks it from batch × num_kv_heads × query tiles against the
            SM count and the longest context, which copies seq_lens to the host (a sync). With both given the
            launch makes no device-to-host sync (CUDA-graph capturable when autotuning is off or warmed up).
        return_lse: also return the natural-log log-sum-exp of the scaled logits, float32 (total_q,
            num_q_heads). With sinks it includes the sink term: when merging with
            :func:`kernels.merge_attention_states`, pass ``sinks`` to exactly one of the two partial attentions.

    Returns:
        out (total_q, num_q_heads, head_dim) in q's dtype, contiguous; with ``return_lse`` also the LSE.

    Checks: shapes, dtypes and options always. The values of cu_seqlens_q and seq_lens (Lq_b <= seq_lens[b],
    within the block table and the cache) are checked on CPU tensors, with ``kernels.set_debug(True)``, or when
    max_seqlen_q or num_splits is None (which syncs anyway); page ids only on CPU tensors or in debug mode.

    Raises:
        TypeError / ValueError before any launch, naming the argument, for malformed input.
    """
    layout = _paged.cache_layout(k_cache, v_cache)
    _validate.tensor("q", q, 3, _validate.FLOAT_DTYPES)
    _validate.index_tensor("block_table", block_table, 2, (torch.int32,), like=k_cache, strided=True)
    _validate.index_tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,), like=q)
    _validate.index_tensor("seq_lens", seq_lens, 1, (torch.int32,), like=k_cache, strided=True)
    _validate.same_device(q=q, k_cache=k_cache, block_table=block_table, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    total_q, num_q_heads, head_dim = q.shape
    if head_dim != layout.head_dim:
        raise ValueError(
            f"q has head_dim {head_dim} but the cache has {layout.head_dim} (shape {tuple(k_cache.shape)})"
        )
    _validate.head_dim("q", head_dim, HEAD_DIMS)
    _validate.gqa(num_q_heads, layout.num_kv_heads)
    if not layout.is_fp8 and q.dtype != layout.dtype:
        raise TypeError(f"q has dtype {q.dtype} but the cache has {layout.dtype}; they must match (or use fp8 KV)")
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q must have batch + 1 = {batch + 1} entries (seq_lens has {batch}), "
            f"got {cu_seqlens_q.shape[0]}"
        )
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per sequence ({batch}), got shape {tuple(block_table.shape)}")
    if layout.num_kv_heads > MAX_GRID_YZ:
        raise ValueError(f"k_cache has {layout.num_kv_heads} KV heads; at most {MAX_GRID_YZ} are supported")
    _validate.positive_float("sm_scale", sm_scale)
    _validate.positive_float("softcap", softcap)
    _validate.sinks(sinks, num_q_heads, q)
    _validate.window(window)
    if window is not None and not causal:
        raise ValueError("window requires causal=True (a sliding window is a causal mask with a lower edge)")
    if max_seqlen_q is not None and (
        not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0
    ):
        raise ValueError(f"max_seqlen_q must be a non-negative int or None, got {max_seqlen_q!r}")
    if num_splits is not None and (
        not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= MAX_SPLITS
    ):
        raise ValueError(f"num_splits must be an int in 1..{MAX_SPLITS} or None, got {num_splits!r}")
    ks, vs, _, _ = _paged.scale_args(layout, k_scale, v_scale, k_cache.device)

    if max_seqlen_q is None or num_splits is None or _runtime.values_checkable(seq_lens):
        pages = _runtime.values_checkable(block_table)
        longest_q, longest = _check_values(layout, block_table, cu_seqlens_q, seq_lens, total_q, pages)
        if max_seqlen_q is not None and max_seqlen_q < longest_q:
            raise ValueError(f"max_seqlen_q={max_seqlen_q} is shorter than the longest query run ({longest_q})")
        max_seqlen_q = longest_q if max_seqlen_q is None else max_seqlen_q
    if num_splits is None:
        num_splits = plan_num_splits(
            batch, max_seqlen_q, longest, num_q_heads, layout.num_kv_heads, head_dim, q.dtype, q.device, window
        )

    return_lse = bool(return_lse)
    out, lse = torch.ops.phaseattn.paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        cu_seqlens_q,
        seq_lens,
        bool(causal),
        None if sm_scale is None else float(sm_scale),
        None if softcap is None else float(softcap),
        window,
        sinks,
        *_paged.scale_op_args(ks),
        *_paged.scale_op_args(vs),
        max_seqlen_q,
        num_splits,
        return_lse,
    )
    return (out, lse) if return_lse else out


def launch_spec(
    batch: int,
    max_seqlen_q: int,
    num_q_heads: int,
    layout: _paged.CacheLayout,
    q_dtype: torch.dtype,
    num_splits: int,
    causal: bool,
    sm_scale: float | None,
    softcap: float | None,
    window: int | None,
    ks_in_memory: bool,
    vs_in_memory: bool,
    with_sinks: bool,
    return_lse: bool,
    config: dict,
) -> tuple[tuple, tuple, dict]:
    """The kernel launch that host metadata implies, shared by :func:`launch` and :class:`PagedPrefillPlan`:
    (grid, the scalar arguments after the strides, the constexpr and config keyword arguments); ``config`` is a
    :func:`launch_config`-shaped dict. The grid is empty (a 0) when there is nothing to launch."""
    group = num_q_heads // layout.num_kv_heads
    q_tiles = _runtime.cdiv(max_seqlen_q, config["BLOCK_Q"])
    scalars = (batch, num_q_heads, log2_logit_scale(layout.head_dim, sm_scale), float(softcap or 0.0), int(window or 0))
    constexprs = {
        "GROUP": group,
        "GROUP_P": _runtime.next_power_of_2(group),
        "CAUSAL": bool(causal),
        **_paged.attention_constexprs(
            layout, q_dtype, ks_in_memory, vs_in_memory, window, softcap, with_sinks, num_splits, return_lse
        ),
        **config,
    }
    return (batch * q_tiles, layout.num_kv_heads, num_splits), scalars, constexprs


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    causal: bool,
    sm_scale: float | None,
    softcap: float | None,
    window: int | None,
    sinks: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    k_scale_value: float,
    v_scale: torch.Tensor | None,
    v_scale_value: float,
    max_seqlen_q: int,
    num_splits: int,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind ``torch.ops.phaseattn.paged_prefill_attention`` (see :mod:`kernels._ops`), on inputs
    :func:`paged_prefill_attention` has validated: returns (out, lse), lse empty (0,) unless ``return_lse``."""
    layout = _paged.cache_layout(k_cache, v_cache)
    total_q, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    ks, ks_in_memory = _paged.scale_from_op_args(k_scale, k_scale_value)
    vs, vs_in_memory = _paged.scale_from_op_args(v_scale, v_scale_value)
    config = launch_config(max_seqlen_q, num_q_heads // layout.num_kv_heads, head_dim, q.dtype)
    grid, scalars, constexprs = launch_spec(
        batch, max_seqlen_q, num_q_heads, layout, q.dtype, num_splits, causal, sm_scale, softcap, window, ks_in_memory,
        vs_in_memory, sinks is not None, return_lse, config,
    )  # fmt: skip
    out = _runtime.empty((total_q, num_q_heads, head_dim), q.dtype, q.device)
    lse = _runtime.empty((total_q, num_q_heads) if return_lse else (1,), torch.float32, q.device)
    if total_q == 0 or grid[0] == 0:
        return out, lse if return_lse else lse[:0]
    partials = None
    if num_splits > 1:
        partials = (
            _runtime.empty((total_q, num_q_heads, num_splits, head_dim), torch.float32, q.device),
            _runtime.empty((total_q, num_q_heads, num_splits), torch.float32, q.device),
        )
    issue(
        _paged_prefill_kernel[grid], q, k_cache, v_cache, block_table, seq_lens, out, lse, partials, sinks, (ks, vs),
        layout, scalars, constexprs, return_lse, cu_seqlens_q=cu_seqlens_q,
    )  # fmt: skip
    return out, lse if return_lse else lse[:0]


class PagedPrefillPlan(_plan.AttentionPlan):
    """:func:`paged_prefill_attention` planned once per step, run per layer (see :mod:`kernels._plan`).

    Args:
        k_cache, v_cache: any layer's caches: the layout every layer's must have.
        query_lens: each sequence's new query count Lq_b on the host (list of ints or CPU tensor); the device
            ``cu_seqlens_q`` given to :meth:`run` must be their running sums, from 0.
        seq_lens: each sequence's cached token count on the host, each >= its Lq_b; the device ``seq_lens`` given
            to :meth:`run` must hold the same values.
        num_q_heads: query heads (a multiple of the cache's KV heads); q_dtype: the query's dtype.
        block_table_width: columns of the block table given to :meth:`run`.
        block_table: optionally the block table on the host (list of lists or CPU tensor), whose used page ids
            are then checked.
        causal, sm_scale, softcap, window, k_scale, v_scale, num_splits, return_lse: as in
            :func:`paged_prefill_attention` (``num_splits=None`` is chosen here from the host lengths, exactly as
            the one-call function would).
        with_sinks: every :meth:`run` gets this layer's ``sinks`` (float32 (num_q_heads,)).
        workspace: where split partials live (a new one when None); see :class:`kernels.Workspace`.
        config: a :func:`launch_config`-shaped dict (default: ``launch_config`` for the longest query run).
    """

    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_lens: Sequence[int] | torch.Tensor,
        seq_lens: Sequence[int] | torch.Tensor,
        *,
        num_q_heads: int,
        q_dtype: torch.dtype,
        block_table_width: int,
        block_table: Sequence[Sequence[int]] | torch.Tensor | None = None,
        causal: bool = True,
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
        q_lens = _plan.host_ints("query_lens", query_lens)
        lens = _plan.host_ints("seq_lens", seq_lens)
        if len(q_lens) != len(lens):
            raise ValueError(f"query_lens has {len(q_lens)} sequences but seq_lens has {len(lens)}")
        batch = len(lens)
        _plan.check_paged_options(layout, num_q_heads, q_dtype, block_table_width, sm_scale, softcap, window)
        if window is not None and not causal:
            raise ValueError("window requires causal=True (a sliding window is a causal mask with a lower edge)")
        _plan.check_num_splits(num_splits, MAX_SPLITS)
        ks, vs, ks_in_memory, vs_in_memory = _paged.scale_args(layout, k_scale, v_scale, device)
        longest = _plan.check_host_lengths(lens, layout, block_table_width, q_lens)
        if block_table is not None:
            _plan.check_host_pages(block_table, lens, layout, block_table_width)
        max_seqlen_q = max(q_lens, default=0)
        group = num_q_heads // layout.num_kv_heads
        config = config or launch_config(max_seqlen_q, group, layout.head_dim, q_dtype)
        q_tiles = _runtime.cdiv(max_seqlen_q, config["BLOCK_Q"])
        if num_splits is None:
            context = longest if window is None else min(longest, window + max_seqlen_q)
            num_splits = choose_num_splits(batch * q_tiles, layout.num_kv_heads, context, _runtime.sm_count(device))

        total_q = sum(q_lens)
        self.batch, self.num_q_heads, self.num_splits = batch, num_q_heads, num_splits
        self.return_lse, self.with_sinks, self.device, self.layout = return_lse, with_sinks, device, layout
        self._out_shape, self._out_dtype = (total_q, num_q_heads, layout.head_dim), q_dtype
        self._lse_shape = (total_q, num_q_heads)
        self._table_shape = (batch, block_table_width)
        self._init_outputs()
        grid, self._scalars, self._constexprs = launch_spec(
            batch, max_seqlen_q, num_q_heads, layout, q_dtype, num_splits, causal, sm_scale, softcap, window,
            ks_in_memory, vs_in_memory, with_sinks, return_lse, config,
        )  # fmt: skip
        self._launches = total_q > 0 and grid[0] > 0
        self._partials = None
        if num_splits > 1 and self._launches:
            self._partials = (workspace or _plan.Workspace(device)).partials(
                total_q, num_q_heads, num_splits, layout.head_dim
            )
        self._kernel = _paged_prefill_kernel[grid]  # bound once: run only calls it
        self._scales = (ks, vs)

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        sinks: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer's attention: as :func:`paged_prefill_attention` with the plan's options. q: (total_q,
        num_q_heads, head_dim); block_table int32 (batch, block_table_width); cu_seqlens_q int32 (batch + 1,);
        seq_lens int32 (batch,); ``out`` (any strides) and, with return_lse, ``lse`` (contiguous) are written when
        given; ``sinks`` when planned with_sinks."""
        dev = self.device
        _plan.expect("q", q, self._out_shape, self._out_dtype, dev, "another token count or head count")
        _plan.check_caches(k_cache, v_cache, self)
        _plan.expect("block_table", block_table, self._table_shape, torch.int32, dev, "another batch")
        _plan.expect("cu_seqlens_q", cu_seqlens_q, (self.batch + 1,), torch.int32, dev, "another batch", dense=True)
        _plan.expect("seq_lens", seq_lens, self._table_shape[:1], torch.int32, dev, "another batch")
        sinks = self._sinks(sinks)
        out, lse = self._outputs(out, lse)
        if self._launches:
            issue(
                self._kernel, q, k_cache, v_cache, block_table, seq_lens, out, lse, self._partials, sinks,
                self._scales, self.layout, self._scalars, self._constexprs, self.return_lse, cu_seqlens_q=cu_seqlens_q,
            )  # fmt: skip
        return (out, lse) if self.return_lse else out
