"""Merging partial attentions over disjoint key sets through their log-sum-exps.

If a query's attention over key set A gave (o_a, lse_a) and over a disjoint set B gave (o_b, lse_b), its
attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b)),    o = exp(lse_a - lse) · o_a + exp(lse_b - lse) · o_b.

That is one step of the online softmax with the partial LSEs as logits and the partial outputs as values, so both
kernels here are built on the attention kernels' own ``online_softmax_step`` and ``softmax_finish`` (log2 domain).
A partial with lse = -inf saw no key: it contributes nothing, whatever its output holds; if every partial of a row
is empty, the row gets out = 0 and lse = -inf, as the attention kernels give.

Two kernels: ``merge_splits_kernel`` combines the split-KV partials of :func:`kernels.paged_decode_attention` (one
program per (sequence, query head), splits loaded as one tile so the loads are all in flight at once), and
:func:`merge_attention_states` exposes the two-way merge for cascade / shared-prefix attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _runtime, _validate
from kernels._jit import LOG2E, add_sink, online_softmax_step, softmax_finish

MAX_HEAD_DIM = 1024


@triton.jit
def merge_splits_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    Sinks,
    num_splits,
    num_q_heads,
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Out[b, h] = merge over s of (PartOut[b, h, s], PartLse[b, h, s]); PartOut (B, Hq, S, HEAD_DIM) and
    PartLse (B, Hq, S) float32, contiguous. With HAS_SINKS the attention sink ``Sinks[h]`` (float32, natural
    log) joins the denominator once, here, rather than in every split."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * num_q_heads + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + offs_s
        ok = splits < num_splits
        idx = row * num_splits + splits
        lse = tl.load(PartLse + idx, mask=ok, other=float("-inf"))
        o = tl.load(PartOut + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        # The splits are the "keys" of a one-row online softmax: logits (1, BLOCK_S), values (BLOCK_S, D).
        p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, (lse * LOG2E)[None, :], True)
        w = tl.reshape(p, [BLOCK_S])
        acc = acc * alpha[:, None] + tl.sum(tl.where(w[:, None] > 0, w[:, None] * o, 0.0), 0)[None, :]
    if HAS_SINKS:
        acc, m_i, l_i = add_sink(acc, m_i, l_i, tl.load(Sinks + h + tl.zeros([1], dtype=tl.int32)) * LOG2E)
    out, lse = softmax_finish(acc, m_i, l_i)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok[None, :])
    if STORE_LSE:
        tl.store(Lse + row + tl.zeros([1], dtype=tl.int64), lse)


@triton.jit
def _fold_state(acc, m_i, l_i, O, L, t, h, ok, offs_d, d_ok, stride_ot, stride_oh, stride_od, stride_lt, stride_lh):
    """Fold one side's partial attention (BLOCK_R rows) into the running merge."""
    lse = tl.load(L + t * stride_lt + h * stride_lh, mask=ok, other=float("-inf"))
    o_ptrs = O + (t * stride_ot + h * stride_oh)[:, None] + offs_d[None, :] * stride_od
    o = tl.load(o_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, (lse * LOG2E)[:, None], True)  # p: (BLOCK_R, 1)
    acc = acc * alpha[:, None] + tl.where(p > 0, p * o, 0.0)
    return acc, m_i, l_i


@triton.jit
def _merge_states_kernel(
    OutA,
    LseA,
    OutB,
    LseB,
    Out,
    Lse,
    num_rows,
    num_heads,
    stride_at,
    stride_ah,
    stride_ad,
    stride_lat,
    stride_lah,
    stride_bt,
    stride_bh,
    stride_bd,
    stride_lbt,
    stride_lbh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    t = rows // num_heads
    h = rows % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fold_state(
        acc, m_i, l_i, OutA, LseA, t, h, ok, offs_d, d_ok, stride_at, stride_ah, stride_ad, stride_lat, stride_lah
    )
    acc, m_i, l_i = _fold_state(
        acc, m_i, l_i, OutB, LseB, t, h, ok, offs_d, d_ok, stride_bt, stride_bh, stride_bd, stride_lbt, stride_lbh
    )
    out, lse = softmax_finish(acc, m_i, l_i)
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=ok[:, None] & d_ok)
    tl.store(Lse + rows, lse, mask=ok)


def merge_splits(
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sinks: torch.Tensor | None,
    store_lse: bool,
) -> None:
    """Launch :func:`merge_splits_kernel`: part_out (rows, Hq, S, D) and part_lse (rows, Hq, S) float32,
    contiguous, into out (rows, Hq, D) (any strides) and, with ``store_lse``, lse (rows, Hq) contiguous."""
    rows, num_q_heads, num_splits, head_dim = part_out.shape
    block_d = _runtime.next_power_of_2(head_dim)
    block_s = _runtime.next_power_of_2(num_splits)
    if not _runtime.INTERPRET:  # bound the (BLOCK_S, head_dim) fp32 tile held in registers
        block_s = min(block_s, max(16, 4096 // block_d))
    merge_splits_kernel[(rows, num_q_heads)](
        part_out,
        part_lse,
        out,
        lse,
        part_lse if sinks is None else sinks,
        num_splits,
        num_q_heads,
        *out.stride(),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
        HAS_SINKS=sinks is not None,
        STORE_LSE=store_lse,
        num_warps=4,
    )


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combine of two partial attentions of the same queries over disjoint key sets.

    Args:
        out_a, out_b: (num_tokens, num_heads, head_dim), float16 / bfloat16 / float32, same shape and dtype, any
            strides; head_dim up to 1024. Each is a normalised attention output (e.g. from ``prefill_attention``
            or ``paged_decode_attention`` with ``return_lse=True``).
        lse_a, lse_b: float32 (num_tokens, num_heads), natural-log log-sum-exps of the scaled logits of each side;
            -inf marks a side that saw no key (its output is then ignored, even if it is NaN). +inf is refused
            (checked on CPU tensors and in debug mode; on CUDA without debug such a row comes out NaN). With
            attention sinks, exactly one side's LSE may include the sink term: compute one partial with
            ``sinks=`` and the other without.

    Returns:
        (out, lse): out (num_tokens, num_heads, head_dim) in out_a's dtype, contiguous; lse float32
        (num_tokens, num_heads). Rows where both sides are -inf get out = 0 and lse = -inf.

    Raises:
        TypeError / ValueError before any launch, naming the argument, for malformed input.
    """
    _validate.tensor("out_a", out_a, 3, _validate.FLOAT_DTYPES)
    _validate.tensor("out_b", out_b, 3, _validate.FLOAT_DTYPES)
    _validate.tensor("lse_a", lse_a, 2, (torch.float32,))
    _validate.tensor("lse_b", lse_b, 2, (torch.float32,))
    _validate.same_dtype(out_a=out_a, out_b=out_b)
    _validate.same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    num_tokens, num_heads, head_dim = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != (num_tokens, num_heads):
            raise ValueError(
                f"{name} must have shape {(num_tokens, num_heads)} (out's first two dims), got {tuple(lse.shape)}"
            )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"out_a has head_dim {head_dim}; merge_attention_states supports 1..{MAX_HEAD_DIM}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if _runtime.values_checkable(lse) and bool(torch.isposinf(lse).any()):
            t, h = torch.isposinf(lse).nonzero()[0].tolist()
            raise ValueError(
                f"{name}[{t}, {h}] is +inf: an LSE is finite, or -inf for a side that saw no key (the empty-partial "
                "marker here; some libraries use +inf for it: map it to -inf)"
            )
    return torch.ops.phaseattn.merge_attention_states(out_a, lse_a, out_b, lse_b)


def launch(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind ``torch.ops.phaseattn.merge_attention_states`` (see :mod:`kernels._ops`), on inputs
    :func:`merge_attention_states` has validated."""
    num_tokens, num_heads, head_dim = out_a.shape
    out = _runtime.empty((num_tokens, num_heads, head_dim), out_a.dtype, out_a.device)
    lse = _runtime.empty((num_tokens, num_heads), torch.float32, out_a.device)
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return out, lse
    block_d = _runtime.next_power_of_2(head_dim)
    block_r = max(1, min(64, 4096 // block_d))
    _merge_states_kernel[(_runtime.cdiv(num_rows, block_r),)](
        out_a,
        lse_a,
        out_b,
        lse_b,
        out,
        lse,
        num_rows,
        num_heads,
        *out_a.stride(),
        *lse_a.stride(),
        *out_b.stride(),
        *lse_b.stride(),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_R=block_r,
        num_warps=4,
    )
    return out, lse
