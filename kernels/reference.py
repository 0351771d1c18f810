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
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence in float64.

    q: (Lq, Hq, D); k, v: (Lk, Hkv, D) with Hq a multiple of Hkv (query head h uses KV head h // (Hq // Hkv)).
    Causal masking is aligned bottom-right: query i sits at absolute position p = i + Lk - Lq and sees key j iff
    j <= p, and with ``window`` also p - window < j. ``sinks`` (Hq,): one extra logit per head in every row's
    softmax, with a zero value vector. A query that sees no key gets out = 0 and lse = -inf (or sinks[h]).
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
    if sinks is not None:  # the sink is one more key, visible to every query, whose value is zero
        s = torch.cat([s, sinks.double().cpu()[:, None, None].expand(hq, lq, 1)], dim=-1)
        vd = torch.cat([vd, torch.zeros(hq, 1, d, dtype=torch.float64)], dim=1)
        visible = torch.cat([visible, torch.ones(lq, 1, dtype=torch.bool)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Lq); -inf where nothing is visible
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float64).min))
    p = torch.nan_to_num(p, nan=0.0)
    if torch.isfinite(vd).all():
        out = torch.matmul(p, vd)
    else:  # a key a query cannot see must not reach it, even when its value is Inf/NaN (0 * Inf = NaN)
        terms = p[..., None] * vd[:, None, :, :]  # (Hq, Lq, Lk, D): small inputs only
        out = terms.masked_fill(~visible[None, :, :, None], 0.0).sum(dim=2)
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
    sinks: torch.Tensor | None = None,
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
            sinks=sinks,
        )
        out[qs:qe], lse[qs:qe] = o, l
    return out, lse


def _as_float(scale: float | torch.Tensor | None) -> float:
    return 1.0 if scale is None else float(scale)


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int, scale: float | torch.Tensor | None = None):
    """The first ``length`` tokens of a sequence whose pages are ``pages`` (in order), as a dense float64
    (length, num_kv_heads, head_dim) tensor, multiplied by ``scale`` (the fp8 dequant scale) when given."""
    page_size = cache.shape[1]
    used = pages[: -(-length // page_size)].long().cpu()
    dense = cache.cpu()[used].double().reshape(-1, *cache.shape[2:])[:length]
    return dense * _as_float(scale)


def paged_decode_attention_ref(
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
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of :func:`kernels.paged_decode_attention`: gathers each sequence's pages into dense
    (dequantized) K/V and attends with :func:`attention_ref` (one query at position seq_len - 1). A sequence of
    length 0 gets out = 0 and lse = -inf (sinks[h] with sinks).

    Returns (out (batch, Hq, D) float64, lse (batch, Hq) float64).
    """
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_prefill_attention_ref(
        q, k_cache, v_cache, block_table, cu, seq_lens, causal=True, sm_scale=sm_scale, softcap=softcap,
        window=window, k_scale=k_scale, v_scale=v_scale, sinks=sinks,
    )  # fmt: skip


def paged_prefill_attention_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of :func:`kernels.paged_prefill_attention`: sequence b's Lq_b queries
    ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` attend to its ``seq_lens[b]`` cached tokens, gathered from the pages
    and dequantized, with :func:`attention_ref` (bottom-right aligned: query i sits at seq_lens[b] - Lq_b + i).
    A query of a sequence of length 0 (decode padding) sees no key: out = 0, lse = -inf (sinks[h] with sinks).

    Returns (out (total_q, Hq, D) float64, lse (total_q, Hq) float64).
    """
    total_q, hq, d = q.shape
    out = torch.zeros(total_q, hq, d, dtype=torch.float64)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float64)
    cu = cu_seqlens_q.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        qs, qe = cu[b], cu[b + 1]
        if qe == qs:
            continue
        if length == 0:  # a query with no key at all (decode padding rows): out 0, lse the sink or -inf
            if sinks is not None:
                lse[qs:qe] = sinks.double().cpu()[None, :]
            continue
        k = gather_pages(k_cache, block_table[b], length, k_scale)
        v = gather_pages(v_cache, block_table[b], length, v_scale)
        o, l = attention_ref(
            q[qs:qe].cpu(), k, v, causal=causal, sm_scale=sm_scale, window=window, softcap=softcap, sinks=sinks
        )
        out[qs:qe], lse[qs:qe] = o, l
    return out, lse


def write_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`kernels.write_kv_cache`: returns updated CPU copies of (k_cache, v_cache), leaving the
    inputs alone. An fp8 cache stores fp8(clamp(fp32(x) / scale, ±448)), the division done in float32 as the
    kernel does (a float64 division could round differently on ties)."""
    slots = slot_mapping.cpu().long()
    keep = slots >= 0
    page_size = k_cache.shape[1]
    pages, offsets = slots[keep] // page_size, slots[keep] % page_size
    results = []
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        cache = cache.cpu().clone()
        values = x.cpu()[keep]
        if cache.dtype == torch.float8_e4m3fn:
            fp8_max = torch.finfo(torch.float8_e4m3fn).max
            values = (values.float() / torch.tensor(_as_float(scale), dtype=torch.float32)).clamp(-fp8_max, fp8_max)
        cache[pages, offsets] = values.to(cache.dtype)
        results.append(cache)
    return results[0], results[1]


def merge_attention_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of :func:`kernels.merge_attention_states`. A side with lse = -inf contributes nothing
    (whatever its output holds); both -inf gives out = 0, lse = -inf."""
    la, lb = lse_a.double().cpu(), lse_b.double().cpu()
    lse = torch.logaddexp(la, lb)
    out = torch.zeros(out_a.shape, dtype=torch.float64)
    for o, l in ((out_a, la), (out_b, lb)):
        seen = ~torch.isneginf(l)
        weight = torch.exp(l - lse).masked_fill(~seen, 0.0)
        out += torch.where(seen[..., None], weight[..., None] * o.double().cpu(), 0.0)
    return out, lse
