"""Prefill attention: FlashAttention forward over packed variable-length batches, causal, GQA.

The algorithm (FlashAttention-2's forward, in Triton). Each program owns one tile of BLOCK_M query rows of one
query head of one sequence, keeps those rows in registers, and streams the sequence's keys and values past them in
tiles of BLOCK_N, updating an online softmax (running max ``m``, running denominator ``l``, fp32 accumulator) so
the (Lq, Lk) score matrix never exists in memory. Work per program is O(BLOCK_M · Lk · D) tensor-core FLOPs for
O((BLOCK_M + Lk) · D) bytes: compute-bound for any prompt longer than a few hundred tokens.

Design points, each there for speed on Hopper/Ampere:
- scores in the log2 domain: ``sm_scale · log2(e)`` is folded into one multiply and ``exp2`` is used throughout;
- the key range of a query tile is split into at most three segments: a masked head (the window's lower edge),
  an unmasked body where no mask is computed at all, and a masked tail (the causal diagonal and the sequence
  end). Tiles that are fully masked are never visited;
- GQA: query head h reads KV head ``h // (Hq // Hkv)``; KV is never repeated in memory, and the grid puts the
  query heads of one KV head next to each other so their K/V tiles are served from L2;
- longest-first: with causal masking the query tiles near the end of a sequence do the most work, so they are
  launched first, which shortens the tail where few SMs are busy;
- head dims that are not powers of two (96, 192) are padded inside the kernel with masked loads;
- on Hopper (sm_90+), 16-bit inputs whose strides TMA can describe (:func:`tma_describable`) are read, and the
  output written, through tensor descriptors (``tl.make_tensor_descriptor``, one per sequence and head, so the
  TMA unit zero-fills past the sequence's end): no per-element address arithmetic in the key loop. The pointer
  path (``cp.async``) serves sm_80, fp32 and any other strides; :func:`use_tensor_descriptors` forces either
  (tests run both in the interpreter, which executes descriptor loads);
- the softmax takes its row max over raw q·k and computes ``exp2(qk * scale - m)`` as one FFMA per score
  (:func:`kernels._jit.online_softmax_scaled`);
- tile shapes, warps and pipeline stages are autotuned per (head_dim, causal, dtype, sequence-length bucket).

Layout: q (total_q, Hq, D), k/v (total_k, Hkv, D), any strides; cu_seqlens int32 (batch + 1,). Causal masking is
aligned bottom-right (query i of a sequence sees key j iff j <= i + Lk - Lq), as in FlashAttention >= 2.1.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl

from kernels import _plan, _runtime, _validate
from kernels._jit import LOG2E, add_sink, attend_tiles, key_tiles, log2_logit_scale, softmax_finish

HEAD_DIMS = _validate.HEAD_DIMS
MAX_GRID_YZ = _validate.MAX_GRID_YZ


# fmt: off
@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, Sinks,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
    num_q_heads, qk_scale, softcap, window, seqlen_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    STORE_LSE: tl.constexpr, PRECISION: tl.constexpr, USE_DESC: tl.constexpr,
):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)  # longest-first under causal masking
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= seqlen_q:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    diag = seqlen_k - seqlen_q

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    d_ok = offs_d < HEAD_DIM
    kv_head = head // GROUP
    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    if USE_DESC:  # one sequence's (tokens, HEAD_DIM) slab of one head each: TMA zero-fills past its end
        q_desc = tl.make_tensor_descriptor(q_base, [seqlen_q, HEAD_DIM], [stride_qt, 1], [BLOCK_M, BLOCK_D])
        q = q_desc.load([m0, 0])
        k_base = tl.make_tensor_descriptor(k_base, [seqlen_k, HEAD_DIM], [stride_kt, 1], [BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, [seqlen_k, HEAD_DIM], [stride_vt, 1], [BLOCK_N, BLOCK_D])
    else:
        q_ptrs = q_base + rows[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    last_row = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    key_lo, key_hi, head_lo, n_head, body_lo, n_body, tail_lo, n_tail = key_tiles(
        m0 + diag, last_row + diag, seqlen_k, window, 0, 1, BLOCK_N, CAUSAL, HAS_WINDOW)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, cu_seqlens_k, 0, stride_kt, stride_kd, stride_vt, stride_vd, 0,
        body_lo, n_body, body_lo, n_body, key_lo, key_hi, rows + diag, window, qk_scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, 0, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION, USE_DESC)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, cu_seqlens_k, 0, stride_kt, stride_kd, stride_vt, stride_vd, 0,
        head_lo, n_head, tail_lo, n_head + n_tail, key_lo, key_hi, rows + diag, window, qk_scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, 0, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION, USE_DESC)
    if HAS_SINKS:
        acc, m_i, l_i = add_sink(acc, m_i, l_i, tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + head) * LOG2E)

    out, lse = softmax_finish(acc, m_i, l_i)
    o_base = Out + q_start.to(tl.int64) * stride_ot + head * stride_oh
    if USE_DESC:  # the store is clipped to the sequence's rows and HEAD_DIM columns
        o_desc = tl.make_tensor_descriptor(o_base, [seqlen_q, HEAD_DIM], [stride_ot, 1], [BLOCK_M, BLOCK_D])
        o_desc.store([m0, 0], out.to(Out.dtype.element_ty))
    else:
        o_ptrs = o_base + rows[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        tl.store(Lse + (q_start + rows).to(tl.int64) * num_q_heads + head, lse, mask=row_ok)
# fmt: on


def tma_describable(*tensors: torch.Tensor) -> bool:
    """Whether TMA can describe each tensor's per-head (tokens, head_dim) slabs: last stride 1, every other stride
    a multiple of 16 bytes, the data 16-byte aligned (what ``tl.make_tensor_descriptor`` requires)."""
    for t in tensors:
        elem = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * elem % 16 for s in t.stride()[:-1]):
            return False
    return True


TENSOR_DESCRIPTORS: bool = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
"""Whether this Triton has device-side tensor descriptors (``tl.make_tensor_descriptor``: 3.4 and later)."""

_forced_desc: contextvars.ContextVar[bool | None] = contextvars.ContextVar("prefill_desc", default=None)


@contextlib.contextmanager
def use_tensor_descriptors(enabled: bool) -> Iterator[None]:
    """Force the tensor-descriptor path on (where the strides allow it) or off, on any architecture (tests run
    both paths in the interpreter; the default is on for 16-bit inputs on sm_90+)."""
    token = _forced_desc.set(bool(enabled))
    try:
        yield
    finally:
        _forced_desc.reset(token)


def _wants_descriptors(dtype: torch.dtype, arch: int) -> bool:
    forced = _forced_desc.get()
    if forced is not None:
        return forced and TENSOR_DESCRIPTORS
    return TENSOR_DESCRIPTORS and not _runtime.INTERPRET and arch >= 90 and dtype in (torch.float16, torch.bfloat16)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors live in a global-memory scratch that Triton asks an allocator for at launch; set
    one (torch's caching allocator) unless the caller has set their own."""
    from triton.runtime import _allocation

    # Triton keeps the allocator in a ContextVar whose default is a NullAllocator instance (one shared instance,
    # _NULL_ALLOCATOR, in 3.9; a fresh NullAllocator() in earlier releases): test the type, not the identity.
    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None or isinstance(current.get(), null):
        triton.set_allocator(_scratch)


def default_config(head_dim: int, dtype: torch.dtype, arch: int = 90, desc: bool | None = None) -> dict:
    """The heuristic tile config (used in the interpreter, and on the GPU when autotuning is off); ``arch`` is
    the compute capability as major * 10 + minor, ``desc`` whether the tensor-descriptor path runs (default: the
    launcher's choice for ``dtype`` on ``arch``). Chosen spill-free on sm_90/sm_80 by ``bench/compile_check.py``."""
    if desc is None:
        desc = _wants_descriptors(dtype, arch)
    if _runtime.INTERPRET:  # big tiles = few programs, which is what makes the interpreter fast
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # IEEE fp32 dots are FMA loops: small tiles, many warps, or they spill
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2}
    # 8 warps everywhere: the masked tiles hold their V tile in registers (the non-finite check of
    # kernels._jit.attend_tiles), which spilled at 4 warps (d64), 3 stages (d128) and 64-key tiles (d256).
    # The descriptor path holds no per-element addresses, which makes room for 128-key tiles at d64/d128: the
    # accumulator rescale and the row reductions are paid per 128 keys (bench/NOTES.md, issue 17).
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 128 if desc else 64, "num_warps": 8, "num_stages": 3}
    if head_dim <= 128:
        if desc:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
        if head_dim < 128 and arch < 90:  # d80-112: the head-dim masks of padded loads spilled 128x64 (8-148 B)
            return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2 if arch >= 90 else 3}
    if desc:
        return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if arch >= 90:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}  # Ampere's mma.sync needs more registers


TUNING_SPACE = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 4),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 32, 4, 2),
    (64, 64, 8, 2),
    (128, 32, 8, 2),
    (32, 32, 4, 2),
]

# The smallest BLOCK_D at which a config of TUNING_SPACE spills registers, on sm_90's descriptor path and on the
# pointer path (sm_80, the stricter of the two), read by `bench/compile_check.py --tuned` (triton 3.9, bf16 causal;
# bench/NOTES.md); absent: no spills up to 256. 128x64/4 warps/3 stages and 64x128/4/3 spilled at every head dim
# on one of the two and left the space.
_SPILLS_FROM = {
    (128, 128, 8, 3): (256, 128),
    (128, 64, 8, 3): (256, 256),
    (128, 128, 8, 2): (256, 128),
    (128, 64, 8, 4): (256, 256),
    (64, 64, 4, 3): (256, 128),
    (128, 32, 4, 3): (256, 128),
    (64, 32, 4, 2): (256, 256),
    (64, 64, 8, 2): (512, 256),
    (128, 32, 8, 2): (512, 256),
}


# On the pointer path a head dim below its power-of-two BLOCK_D (d80-112 in BLOCK_D 128) masks every K/V/Q/O access
# along it, which costs registers: measured at d96 (sm_80, bf16; causal, window, window+sinks+softcap, full),
# only these configs of TUNING_SPACE stay spill-free there (the others spilled 8-1246 B; bench/NOTES.md).
_PADDED_POINTER_FITS = {(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)}


def _fits(config: triton.Config, block_d: int, elem: int, desc: bool = True, head_dim: int | None = None) -> bool:
    """Whether a tile config's shared memory (q tile + pipelined K/V tiles) fits comfortably on the SM, and its
    registers do (no spills at this head dim on the descriptor path, or the pointer path)."""
    key = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    bm, bn = key[:2]
    smem = (bm * block_d + config.num_stages * 2 * bn * block_d) * elem
    spills_from = _SPILLS_FROM.get(key, (512, 512))[0 if desc else 1]
    if not desc and block_d == 128 and head_dim is not None and head_dim < block_d and key not in _PADDED_POINTER_FITS:
        return False
    return smem <= 200 * 1024 and not (block_d >= 256 and bm * bn > 128 * 64) and block_d < spills_from


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    desc = kwargs.get("USE_DESC", named_args.get("USE_DESC", True))
    elem = named_args["Q"].element_size()
    return [c for c in configs if _fits(c, block_d, elem, desc, head_dim)] or configs[-1:]


_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in TUNING_SPACE],
    key=[
        "HEAD_DIM",
        "CAUSAL",
        "HAS_WINDOW",
        "HAS_SOFTCAP",
        "HAS_SINKS",
        "seqlen_bucket",
        "GROUP",
        "PRECISION",
        "USE_DESC",
    ],
    prune_configs_by={"early_config_prune": _prune},
)(_prefill_kernel)


_forced_config: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prefill_config", default=None)


@contextlib.contextmanager
def use_config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> Iterator[None]:
    """Run prefill_attention with one explicit tile config (tuning scripts, and tests of every config)."""
    token = _forced_config.set(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    )
    try:
        yield
    finally:
        _forced_config.reset(token)


def _longest(lengths: torch.Tensor) -> int:
    return int(lengths.max()) if lengths.numel() else 0


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention forward over a packed variable-length batch.

    Args:
        q: (total_q, num_q_heads, head_dim), float16 / bfloat16 / float32.
        k, v: (total_k, num_kv_heads, head_dim), same dtype and device as q; num_q_heads must be a multiple of
            num_kv_heads (GQA; MQA when num_kv_heads == 1). Any strides.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) contiguous offsets into the token dimension, starting at 0
            and ending at total_q / total_k. Sequences of length 0 are allowed.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Lk - Lq).
        sm_scale: softmax scale, default 1/sqrt(head_dim).
        window: sliding window (requires causal): a query at position p = i + Lk - Lq sees keys p - window < j <= p.
        softcap: logits become softcap * tanh(logits / softcap) after scaling.
        sinks: float32 (num_q_heads,) or None: attention sinks, one logit per query head that joins every row's
            softmax denominator and carries no value: out = sum_j e^(s_j) v_j / (e^(sinks[h]) + sum_j e^(s_j)).
        return_lse: also return the natural-log log-sum-exp, float32 (total_q, num_q_heads); with sinks it
            includes the sink term (so when merging with :func:`kernels.merge_attention_states`, the sink must
            belong to one side only: pass ``sinks`` to exactly one of the partial attentions).
        max_seqlen_q, max_seqlen_k: the longest query/key lengths. When both are given the launcher makes no
            device-to-host sync (CUDA-graph capturable) and does not check cu_seqlens' values (set
            ``kernels.set_debug(True)`` to check them anyway).

    Returns:
        out (total_q, num_q_heads, head_dim) in q's dtype, contiguous; with ``return_lse`` also the LSE. Query rows
        that see no key (Lq > Lk under causal masking) get out = 0 and lse = -inf (lse = sinks[h] with sinks).

    Raises:
        TypeError / ValueError before any launch, naming the argument, for malformed input.
    """
    _validate.tensor("q", q, 3, _validate.FLOAT_DTYPES)
    _validate.tensor("k", k, 3, _validate.FLOAT_DTYPES)
    _validate.tensor("v", v, 3, _validate.FLOAT_DTYPES)
    _validate.same_dtype(q=q, k=k, v=v)
    _validate.same_device(q=q, k=k, v=v)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _validate.index_tensor(name, cu, 1, (torch.int32,), like=q)
    total_q, num_q_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    if k.shape[2] != head_dim or v.shape[2] != head_dim:
        raise ValueError(f"head_dim mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _validate.head_dim("q", head_dim, HEAD_DIMS)
    _validate.gqa(num_q_heads, num_kv_heads)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.numel() < 1:
            raise ValueError(f"{name} must have batch + 1 >= 1 entries")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has {cu_seqlens_k.numel()}; "
            "both must be batch + 1"
        )
    batch = cu_seqlens_q.numel() - 1
    if batch > MAX_GRID_YZ:
        raise ValueError(f"batch must be at most {MAX_GRID_YZ} sequences per call, got {batch}")
    _validate.positive_float("sm_scale", sm_scale)
    _validate.positive_float("softcap", softcap)
    _validate.sinks(sinks, num_q_heads, q)
    _validate.window(window)
    if window is not None and not causal:
        raise ValueError("window requires causal=True (a sliding window is a causal mask with a lower edge)")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")

    if max_seqlen_q is None or max_seqlen_k is None or _runtime.values_checkable(cu_seqlens_q):
        longest_q = _longest(_validate.cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, total_q))
        longest_k = _longest(_validate.cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, total_k))
        for name, given, actual in (
            ("max_seqlen_q", max_seqlen_q, longest_q),
            ("max_seqlen_k", max_seqlen_k, longest_k),
        ):
            if given is not None and given < actual:
                raise ValueError(f"{name}={given} is shorter than the longest sequence ({actual})")
        max_seqlen_q = longest_q if max_seqlen_q is None else max_seqlen_q

    return_lse = bool(return_lse)
    out, lse = torch.ops.phaseattn.prefill_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        bool(causal),
        None if sm_scale is None else float(sm_scale),
        window,
        None if softcap is None else float(softcap),
        sinks,
        return_lse,
        max_seqlen_q,
    )
    return (out, lse) if return_lse else out


def launch_spec(
    batch: int,
    max_seqlen_q: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    causal: bool,
    sm_scale: float | None,
    window: int | None,
    softcap: float | None,
    with_sinks: bool,
    return_lse: bool,
    config: dict,
    use_desc: bool = False,
) -> tuple:
    """The kernel launch that host metadata implies, shared by :func:`launch` and :class:`PrefillPlan`: (grid,
    the scalar arguments after the strides, the constexpr and config keyword arguments). The grid is a function
    of the launch's meta-parameters (BLOCK_M comes from ``config``, or from the autotuner when ``config`` is
    ``{}``); it raises ValueError when the query tiles do not fit the grid."""

    def grid(meta: dict) -> tuple[int, int, int]:
        m_blocks = _runtime.cdiv(max_seqlen_q, meta["BLOCK_M"])
        if m_blocks > MAX_GRID_YZ:
            raise ValueError(f"max_seqlen_q={max_seqlen_q} needs more than {MAX_GRID_YZ} query tiles")
        return (num_q_heads, batch, m_blocks)

    scalars = (
        num_q_heads,
        log2_logit_scale(head_dim, sm_scale),
        float(softcap or 0.0),
        int(window or 0),
        min(_runtime.next_power_of_2(max(max_seqlen_q, 1)), 16384),
    )
    constexprs = {
        "GROUP": num_q_heads // num_kv_heads,
        "HEAD_DIM": head_dim,
        "BLOCK_D": _runtime.next_power_of_2(head_dim),
        "CAUSAL": bool(causal),
        "HAS_WINDOW": window is not None,
        "HAS_SOFTCAP": softcap is not None,
        "HAS_SINKS": with_sinks,
        "STORE_LSE": return_lse,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "USE_DESC": use_desc,
        **config,
    }
    return grid, scalars, constexprs


def issue(
    kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sinks: torch.Tensor | None,
    scalars: tuple,
    constexprs: dict,
) -> None:
    """Launch ``kernel`` (the grid-bound kernel) with the arguments of :func:`launch_spec`."""
    kernel(
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        lse if sinks is None else sinks,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *scalars,
        **constexprs,
    )


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    sm_scale: float | None,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    return_lse: bool,
    max_seqlen_q: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind ``torch.ops.phaseattn.prefill_attention`` (see :mod:`kernels._ops`), on inputs
    :func:`prefill_attention` has validated: returns (out, lse), lse empty (0,) unless ``return_lse``."""
    total_q, num_q_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = _runtime.empty((total_q, num_q_heads, head_dim), q.dtype, q.device)
    lse = _runtime.empty((total_q, num_q_heads) if return_lse else (1,), torch.float32, q.device)
    if total_q > 0 and batch > 0 and max_seqlen_q > 0:
        arch = _runtime.arch(q.device)
        use_desc = _wants_descriptors(q.dtype, arch) and tma_describable(q, k, v, out)
        forced = _forced_config.get()
        if forced is None and _runtime.AUTOTUNE:
            kernel, config = _autotuned, {}
        else:
            kernel, config = _prefill_kernel, forced or default_config(head_dim, q.dtype, arch, use_desc)
        if use_desc and not _runtime.INTERPRET:
            _ensure_allocator()
        grid, scalars, constexprs = launch_spec(
            batch, max_seqlen_q, num_q_heads, k.shape[1], head_dim, q.dtype, causal, sm_scale, window, softcap,
            sinks is not None, return_lse, config, use_desc,
        )  # fmt: skip
        issue(kernel[grid], q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, sinks, scalars, constexprs)
    elif return_lse:
        lse.fill_(float("-inf"))
    return out, lse if return_lse else lse[:0]


class PrefillPlan(_plan.AttentionPlan):
    """:func:`prefill_attention` planned once per step, run per layer (see :mod:`kernels._plan`).

    Args:
        seqlens_q: each sequence's query count on the host (list of ints >= 0 or CPU tensor).
        seqlens_k: each sequence's key count (default: seqlens_q). The device cu_seqlens given to :meth:`run` must
            be the running sums of these, from 0.
        num_q_heads, num_kv_heads, head_dim, dtype, device: q is (total_q, num_q_heads, head_dim) and k/v
            (total_k, num_kv_heads, head_dim), all of ``dtype`` on ``device``.
        causal, sm_scale, window, softcap, return_lse: as in :func:`prefill_attention`.
        with_sinks: every :meth:`run` gets this layer's ``sinks`` (float32 (num_q_heads,)).
        config: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` (default: :func:`default_config`; on sm_90
            it is chosen for the tensor-descriptor path, which :meth:`run` leaves for the pointer path only when
            the strides it is given cannot be described).
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
        with_sinks: bool = False,
        config: dict | None = None,
    ):
        device = torch.device(device)
        lens_q = _plan.host_ints("seqlens_q", seqlens_q)
        lens_k = lens_q if seqlens_k is None else _plan.host_ints("seqlens_k", seqlens_k)
        if len(lens_k) != len(lens_q):
            raise ValueError(f"seqlens_q has {len(lens_q)} sequences but seqlens_k has {len(lens_k)}")
        for name, lens in (("seqlens_q", lens_q), ("seqlens_k", lens_k)):
            if lens and min(lens) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}[{lens.index(min(lens))}] = {min(lens)}")
        batch = len(lens_q)
        if batch > MAX_GRID_YZ:
            raise ValueError(f"batch must be at most {MAX_GRID_YZ} sequences per call, got {batch}")
        if dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_validate.FLOAT_DTYPES}, got {dtype}")
        _plan.check_device(device)
        _validate.head_dim("head_dim", head_dim, HEAD_DIMS)
        _validate.gqa(num_q_heads, num_kv_heads)
        _validate.positive_float("sm_scale", sm_scale)
        _validate.positive_float("softcap", softcap)
        _validate.window(window)
        if window is not None and not causal:
            raise ValueError("window requires causal=True (a sliding window is a causal mask with a lower edge)")
        arch = _runtime.arch(device)
        self._desc = _wants_descriptors(dtype, arch)
        config = config or default_config(head_dim, dtype, arch, self._desc)
        longest_q = max(lens_q, default=0)
        m_blocks = _runtime.cdiv(longest_q, config["BLOCK_M"])
        if m_blocks > MAX_GRID_YZ:
            raise ValueError(f"the longest query sequence ({longest_q}) needs more than {MAX_GRID_YZ} query tiles")

        total_q, total_k = sum(lens_q), sum(lens_k)
        self.batch, self.num_q_heads, self.device, self.dtype = batch, num_q_heads, device, dtype
        self.return_lse, self.with_sinks = return_lse, with_sinks
        self._out_shape, self._out_dtype = (total_q, num_q_heads, head_dim), dtype
        self._lse_shape = (total_q, num_q_heads)
        self._kv_shape = (total_k, num_kv_heads, head_dim)
        self._cu_shape = (batch + 1,)
        self._init_outputs()
        self._launches = total_q > 0 and batch > 0 and longest_q > 0
        grid, self._scalars, self._constexprs = launch_spec(
            batch, longest_q, num_q_heads, num_kv_heads, head_dim, dtype, causal, sm_scale, window, softcap,
            with_sinks, return_lse, config, self._desc,
        )  # fmt: skip
        self._pointer_constexprs = {**self._constexprs, "USE_DESC": False}  # for strides TMA cannot describe
        self._kernel = _prefill_kernel[grid(self._constexprs)]  # bound once: run only calls it
        if self._desc and self._launches and not _runtime.INTERPRET:
            _ensure_allocator()

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        *,
        sinks: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer's attention: as :func:`prefill_attention` with the plan's options; ``out`` and (with
        return_lse) ``lse`` (contiguous) are written when given; ``sinks`` when planned with_sinks."""
        dev, dtype = self.device, self.dtype
        _plan.expect("q", q, self._out_shape, dtype, dev, "another token count or head count")
        _plan.expect("k", k, self._kv_shape, dtype, dev, "another token count or head count")
        _plan.expect("v", v, self._kv_shape, dtype, dev, "another token count or head count")
        _plan.expect("cu_seqlens_q", cu_seqlens_q, self._cu_shape, torch.int32, dev, "another batch", dense=True)
        _plan.expect("cu_seqlens_k", cu_seqlens_k, self._cu_shape, torch.int32, dev, "another batch", dense=True)
        sinks = self._sinks(sinks)
        out, lse = self._outputs(out, lse)
        if self._launches:
            constexprs = self._constexprs
            if self._desc and not tma_describable(q, k, v, out):
                constexprs = self._pointer_constexprs
            issue(self._kernel, q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, sinks, self._scalars, constexprs)
        elif self.return_lse:
            lse.fill_(float("-inf"))
        return (out, lse) if self.return_lse else out
