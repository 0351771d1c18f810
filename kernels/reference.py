"""Plain-PyTorch float64 references for every kernel in phaseattn. Tests use them; the fast path never does.

They are written for clarity, not speed: a loop over sequences and dense (Lq, Lk) score matrices.
"""

from __future__ import annotations

import math

import torch


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence in float64.

    q: (Lq, Hq, D); k, v: (Lk, Hkv, D) with Hq a multiple of Hkv (query head h uses KV head h // (Hq // Hkv)).
    Causal masking is aligned bottom-right: query i sits at absolute position p = i + Lk - Lq and sees key j iff
    j <= p, and with ``window`` also p - window < j. A query that sees no key gets out = 0 and lse = -inf.
    Returns (out (Lq, Hq, D) float64, lse (Lq, Hq) float64, natural log).
    """
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    group = hq // hkv
    qd = q.double().permute(1, 0, 2)  # (Hq, Lq, D)
    kd = k.double().repeat_interleave(group, dim=1).permute(1, 0, 2)
    vd = v.double().repeat_interleave(group, dim=1).permute(1, 0, 2)
    s = torch.matmul(qd, kd.transpose(1, 2)) * scale  # (Hq, Lq, Lk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(lq, dtype=torch.long)[:, None] + (lk - lq)
    key = torch.arange(lk, dtype=torch.long)[None, :]
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if causal or window is not None:
        visible &= key <= pos
    if window is not None:
        visible &= key > pos - window
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Lq); -inf where nothing is visible
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float64).min))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.matmul(p, vd)
    return out.permute(1, 0, 2).contiguous(), lse.transpose(0, 1).contiguous()


def prefill_attention_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of :func:`kernels.prefill_attention` on packed varlen inputs.

    Returns (out (total_q, Hq, D) float64, lse (total_q, Hq) float64).
    """
    total_q, hq, d = q.shape
    out = torch.zeros(total_q, hq, d, dtype=torch.float64)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float64)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        o, l = attention_ref(
            q[qs:qe].cpu(),
            k[ks:ke].cpu(),
            v[ks:ke].cpu(),
            causal=causal,
            sm_scale=sm_scale,
            window=window,
            softcap=softcap,
        )
        out[qs:qe], lse[qs:qe] = o, l
    return out, lse
