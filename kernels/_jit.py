"""Triton device functions shared by the prefill and decode kernels.

Scores are kept in the log2 domain: the kernels multiply ``q·k`` by ``sm_scale * log2(e)`` once and use ``exp2``
(one MUFU instruction on NVIDIA GPUs), converting the log-sum-exp back to natural log only at the end.
"""

import math

import triton
import triton.language as tl

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
def online_softmax_step(m_i, l_i, s, MAY_BE_EMPTY: tl.constexpr):
    """One step of the online softmax over a tile of log2-domain logits ``s`` (M, N), masked entries = -inf.

    Returns ``p`` (unnormalised probabilities, fp32), ``alpha`` (the rescale factor for the running accumulator),
    and the new running max ``m`` and denominator ``l``. ``MAY_BE_EMPTY`` must be set for tiles in which a row can
    be fully masked; such a row keeps m = -inf, l = 0 and contributes nothing (no NaN).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """Normalise the accumulator; returns (out (M, D) fp32, natural-log LSE (M,) fp32). Rows that saw no key
    give out = 0 and lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse
