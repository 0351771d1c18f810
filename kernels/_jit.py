"""Triton device functions shared by the prefill and decode kernels.

Scores are kept in the log2 domain: the kernels multiply ``q·k`` by ``sm_scale * log2(e)`` once and use ``exp2``
(one MUFU instruction on NVIDIA GPUs), converting the log-sum-exp back to natural log only at the end.
"""

import math

import triton
import triton.language as tl

from kernels._paged import load_scale, tile_rows

LOG2E = tl.constexpr(1.4426950408889634)  # jit globals must be tl.constexpr instances
LN2 = tl.constexpr(0.6931471805599453)


def log2_logit_scale(head_dim: int, sm_scale: float | None) -> float:
    """The host-side ``qk_scale`` the kernels take: sm_scale (default 1/sqrt(head_dim)) times log2(e)."""
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    return scale * math.log2(math.e)


@triton.jit
def tanh(x):
    """tanh in fp32 through exp (libdevice's tanh does not run in the interpreter); saturates cleanly to ±1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def scale_scores(qk, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q·k (fp32) -> log2-domain logits. ``qk_scale`` is sm_scale*log2(e); with a softcap the natural logits
    s = qk*sm_scale become softcap*tanh(s/softcap) first (Gemma-2 style)."""
    if HAS_SOFTCAP:
        s = qk * (qk_scale / LOG2E)
        return softcap * tanh(s / softcap) * LOG2E
    return qk * qk_scale


@triton.jit
def scores_and_scale(qk, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q·k (fp32) -> (x, x_scale) with log2-domain logits = x * x_scale, for :func:`online_softmax_scaled`:
    without a softcap x is q·k itself (the scale is applied inside the exponent's FFMA, never as its own multiply);
    with one, x is the capped logits (tanh is not linear) and x_scale is 1."""
    if HAS_SOFTCAP:
        return scale_scores(qk, qk_scale, softcap, True), 1.0
    return qk, qk_scale


@triton.jit
def online_softmax_scaled(m_i, l_i, x, x_scale, MAY_BE_EMPTY: tl.constexpr):
    """One step of the online softmax over a tile of log2-domain logits ``x * x_scale`` (M, N); ``x_scale`` > 0
    (a scalar); masked entries of ``x`` = -inf.

    Returns ``p`` (unnormalised probabilities, fp32), ``alpha`` (the rescale factor for the running accumulator),
    and the new running max ``m`` and denominator ``l`` (log2 domain, scaled). The row max is taken over the raw
    ``x`` and scaled once per row (for a positive scale, max(x)·s is max(x·s) bit for bit), and each probability
    is ``exp2(fma(x, x_scale, -m))``: one FFMA and one MUFU per score. ``MAY_BE_EMPTY`` must be set for tiles in
    which a row can be fully masked; such a row keeps m = -inf, l = 0 and contributes nothing (no NaN).
    """
    m_new = tl.maximum(m_i, tl.max(x, 1) * x_scale)
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.math.exp2(tl.fma(x, x_scale, -m_ref[:, None]))
    alpha = tl.math.exp2(m_i - m_ref)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def online_softmax_step(m_i, l_i, s, MAY_BE_EMPTY: tl.constexpr):
    """One step of the online softmax over a tile of log2-domain logits ``s`` (M, N), masked entries = -inf:
    :func:`online_softmax_scaled` with a scale of 1 (returns p, alpha, m, l)."""
    return online_softmax_scaled(m_i, l_i, s, 1.0, MAY_BE_EMPTY)


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """Normalise the accumulator; returns (out (M, D) fp32, natural-log LSE (M,) fp32). Rows that saw no key
    give out = 0 and lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def add_sink(acc, m_i, l_i, sink):
    """Fold an attention sink into a running softmax: one extra log2-domain logit ``sink`` (M,) per row that joins
    the denominator and carries no value (its value vector is zero). A sink of -inf changes nothing."""
    _, alpha, m_i, l_i = online_softmax_step(m_i, l_i, sink[:, None], True)
    return acc * alpha[:, None], m_i, l_i


@triton.jit
def key_tiles(
    first_pos, last_pos, seqlen_k, window, split, num_splits,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """The key tiles a tile of queries at positions ``first_pos..last_pos`` (bottom-right causal: position p sees
    keys j <= p, and with a window also j > p - window) must visit, as three runs of whole BLOCK_N tiles:

    - head ``[head_lo, + n_head tiles)``: the window's lower edge, masked;
    - body ``[body_lo, + n_body tiles)``: keys every query of the tile sees, no mask needed;
    - tail ``[tail_lo, + n_tail tiles)``: the causal diagonal and the sequence end, masked.

    Tiles no query can see are never part of a run. With ``num_splits`` > 1 the visited tiles are cut into
    ``num_splits`` contiguous shares of whole tiles and only share ``split`` is returned (flash-decoding).
    Also returns ``[key_lo, key_hi)``, the keys at least one query sees (masked loads stop there).
    """
    key_hi = seqlen_k
    body_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        key_hi = tl.minimum(key_hi, last_pos + 1)
        body_hi = tl.minimum(body_hi, (tl.maximum(first_pos + 1, 0) // BLOCK_N) * BLOCK_N)
    key_lo = 0
    lo = 0
    body_lo = 0
    if HAS_WINDOW:
        key_lo = tl.maximum(first_pos - window + 1, 0)
        lo = (key_lo // BLOCK_N) * BLOCK_N
        body_lo = tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N
    split_a = tl.minimum(tl.maximum(body_lo, lo), key_hi)
    split_b = tl.minimum(tl.maximum(body_hi, split_a), key_hi)
    per_split = tl.cdiv(tl.cdiv(tl.maximum(key_hi - lo, 0), BLOCK_N), num_splits)
    share_lo = lo + split * per_split * BLOCK_N
    share_hi = tl.minimum(share_lo + per_split * BLOCK_N, key_hi)
    head_lo = tl.maximum(lo, share_lo)
    body_lo = tl.maximum(split_a, share_lo)
    tail_lo = tl.maximum(split_b, share_lo)
    n_head = tl.cdiv(tl.maximum(tl.minimum(split_a, share_hi) - head_lo, 0), BLOCK_N)
    n_body = tl.maximum(tl.minimum(split_b, share_hi) - body_lo, 0) // BLOCK_N
    n_tail = tl.cdiv(tl.maximum(share_hi - tail_lo, 0), BLOCK_N)
    return key_lo, key_hi, head_lo, n_head, body_lo, n_body, tail_lo, n_tail


@triton.jit
def all_finite(x):
    """Whether every element of the float tile ``x`` (bfloat16, float16 or float32) is finite, as one scalar.

    Integer work only: the bits with the sign cleared are below the all-ones exponent pattern exactly for finite
    values (Inf is the pattern, NaN above it), so one max over the tile decides. Reading the bits needs no
    conversion to fp32 (a 16-bit tile is tested in place, two elements per 32-bit register)."""
    if x.dtype == tl.bfloat16:
        return tl.max(x.to(tl.int16, bitcast=True) & 0x7FFF) < 0x7F80
    elif x.dtype == tl.float16:
        return tl.max(x.to(tl.int16, bitcast=True) & 0x7FFF) < 0x7C00
    else:
        tl.static_assert(x.dtype == tl.float32, "all_finite: bfloat16, float16 or float32")
        return tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000


@triton.jit
def _dot_non_finite_v(
    acc, p, v, cols, pos, key_lo, key_hi, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc + p @ v`` for a masked tile whose V (N, D) holds an Inf/NaN, with the keys a row does not see kept
    out of it: V's non-finite entries are zeroed for the product, and the rows that see such a key (keys ``cols``
    in [key_lo, key_hi), causal and window as in :func:`attend_tiles`) are set to NaN (the whole row: stricter
    than the arithmetic, which is non-finite only in the affected columns; a second (M, N) x (N, D) flag product
    would be exact per column but costs a second fp32 accumulator, which spilled). The visibility is recomputed
    here, in another form than the caller's, so that the common path need not keep its (M, N) mask alive."""
    finite = tl.abs(v.to(tl.float32)) < float("inf")
    acc = tl.dot(p, tl.where(finite, v, 0.0).to(p.dtype), acc, input_precision=PRECISION)
    key_bad = tl.max(tl.where(finite, 0, 1), axis=1)  # (BLOCK_N,): the key's value holds an Inf/NaN
    key_bad = tl.where((cols - key_lo >= 0) & (key_hi - cols > 0), key_bad, 0)
    sees = tl.broadcast_to(key_bad[None, :] > 0, (p.shape[0], p.shape[1]))
    if CAUSAL:
        sees &= pos[:, None] - cols[None, :] >= 0
    if HAS_WINDOW:
        sees &= cols[None, :] - pos[:, None] + window > 0
    row_bad = tl.max(tl.where(sees, 1, 0), axis=1)
    return tl.where(row_bad[:, None] > 0, float("nan"), acc)


@triton.jit
def attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, block_table_row, stride_btp,
    stride_kt, stride_kd, stride_vt, stride_vd, stride_page,
    first, n_first, second, n_tiles, key_lo, key_hi, pos, window, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, DESC: tl.constexpr = False,
):  # fmt: skip
    """Fold ``n_tiles`` key tiles into the running softmax (acc (M, BLOCK_D), m_i, l_i) of the query tile ``q``
    (M, BLOCK_D) whose rows sit at positions ``pos`` (M,): the first ``n_first`` tiles start at ``first``, the
    rest at ``second`` (two runs, one loop: fewer inlined loop copies, fewer registers).

    Keys are read from ``k_base``/``v_base`` at token stride ``stride_kt``/``stride_vt`` (PAGE_SIZE = 0, dense
    K/V), or through a block table (PAGE_SIZE > 0: token t in page ``block_table_row[t // PAGE_SIZE]``, K and V
    sharing the cache strides ``stride_page``/``stride_kt``); K/V may be fp8 and are converted to q's dtype. With
    ``DESC`` (dense only) ``k_base``/``v_base`` are tensor descriptors of one sequence's keys, (seqlen_k, HEAD_DIM)
    with blocks (BLOCK_N, BLOCK_D): TMA loads on Hopper, rows past the sequence end read as zeros.

    Without MASKED every key of every tile is visible to every row: no mask is computed at all. With MASKED keys
    outside ``[key_lo, key_hi)`` are not loaded, and the causal diagonal and window are applied per element. A
    key hidden from a row must not influence it, even when its V holds an Inf/NaN (0 x Inf = NaN inside P·V):
    a masked tile whose V holds one (a cheap whole-tile test decides) goes through :func:`_dot_non_finite_v`.
    Unmasked tiles are untouched: there every row sees every key, so Inf/NaN propagate as they do.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for i in tl.range(0, n_tiles):
        start_n = tl.where(i < n_first, first + i * BLOCK_N, second + (i - n_first) * BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            key_ok = (cols >= key_lo) & (cols < key_hi)
        else:
            key_ok = cols < key_hi
        if DESC:
            k = k_base.load([start_n, 0]).T
        else:
            if PAGE_SIZE > 0:
                k_rows, v_rows = tile_rows(k_base, v_base, block_table_row, stride_btp, start_n, key_lo, key_hi,
                                           BLOCK_N, PAGE_SIZE, stride_page, stride_kt, False)  # fmt: skip
            else:
                k_rows = k_base + cols.to(tl.int64) * stride_kt
                v_rows = v_base + cols.to(tl.int64) * stride_vt
            k_ptrs = k_rows[None, :] + offs_d[:, None] * stride_kd
            v_ptrs = v_rows[:, None] + offs_d[None, :] * stride_vd
            if MASKED:
                k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
            elif HEAD_DIM != BLOCK_D:
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
        qk = tl.dot(q, k.to(q.dtype), input_precision=PRECISION)
        x, x_scale = scores_and_scale(qk, qk_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            # Per-row limits relative to the tile (key start_n + j visible iff j <= pos - start_n): the per-element
            # test is one compare of the tile's column index, no per-column key positions (cols) in registers.
            if CAUSAL:  # implies key_ok for every real row (pos < seqlen_k, and a window starts at key_lo or later)
                visible = offs_n[None, :] <= (pos - start_n)[:, None]
            else:
                visible = tl.broadcast_to(key_ok[None, :], (q.shape[0], BLOCK_N))
            if HAS_WINDOW:
                visible &= offs_n[None, :] > (pos - window - start_n)[:, None]
            x = tl.where(visible, x, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_scaled(m_i, l_i, x, x_scale, MASKED)
        if MASKED:
            if DESC:  # keys outside [key_lo, key_hi) are real memory here: the V check below keeps them out
                v = v_base.load([start_n, 0]).to(q.dtype)
            else:
                v = tl.load(v_ptrs, mask=d_ok[None, :] & key_ok[:, None], other=0.0).to(q.dtype)
            # One cheap test per tile; only a tile with an Inf/NaN takes the exact repair. On the descriptor path
            # at head_dim > 64 the integer max of the bits (no conversion, two elements per instruction); else 0·v
            # summed in fp32. Measured (bench/NOTES.md, issue 17): the bit test spilled 80 B on sm_80's pointer
            # path (d128 128x64 w8 s3), and at d64 on sm_90 it moved ptxas' address setup of the *body* loop out
            # of uniform registers (+12 instructions per body iteration, more than it saves in long prefills).
            if DESC and BLOCK_D >= 128:
                v_finite = all_finite(v)
            else:
                v_finite = tl.sum(v.to(tl.float32) * 0.0) == 0.0
            if v_finite:
                acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            else:
                acc = _dot_non_finite_v(acc * alpha[:, None], p.to(q.dtype), v, cols, pos, key_lo, key_hi, window,
                                        CAUSAL, HAS_WINDOW, PRECISION)  # fmt: skip
        else:
            if DESC:
                v = v_base.load([start_n, 0])
            elif HEAD_DIM != BLOCK_D:
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs)
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def finish_and_store(
    acc, m_i, l_i, row, head, ok, offs_d, d_ok, Sinks, v_scale, Out, Lse, PartOut, PartLse,
    stride_or, stride_oh, stride_od, num_q_heads, split, num_splits,
    HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr, IS_FP8: tl.constexpr, V_SCALE_IN_MEMORY: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    """The paged attention kernels' epilogue for a tile of (query ``row``, query ``head``) pairs (``row`` a scalar
    or a vector like ``head``; ``ok`` masks padding rows): the sink joins the denominator (unsplit runs only: split
    partials get it once, in the merge), the softmax is normalised, fp8's ``v_scale`` applied, and the result is
    stored, as a split partial (PartOut (rows, Hq, S, HEAD_DIM), PartLse (rows, Hq, S), float32) or directly."""
    if HAS_SINKS and not SPLIT:
        acc, m_i, l_i = add_sink(acc, m_i, l_i, tl.load(Sinks + head, mask=ok, other=0.0) * LOG2E)
    out, lse = softmax_finish(acc, m_i, l_i)
    if IS_FP8:
        out *= load_scale(v_scale, V_SCALE_IN_MEMORY)
    mask = ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = (row * num_q_heads + head) * num_splits + split
        tl.store(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        tl.store(PartLse + part, lse, mask=ok)
    else:
        o_ptrs = Out + (row * stride_or + head * stride_oh)[:, None] + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
        if STORE_LSE:
            tl.store(Lse + row * num_q_heads + head, lse, mask=ok)
