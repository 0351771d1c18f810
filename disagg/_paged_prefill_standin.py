"""TEMPORARY stand-in for ``kernels.paged_prefill_attention`` (issue #12, being written on branch ``paged``).

Same signature and semantics; gathers each sequence's K/V from its pages and calls ``kernels.prefill_attention``.
Deleted once the real kernel is merged: nothing but disagg.attention may import it.
"""

from __future__ import annotations

import torch

import kernels


def paged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    cu_seqlens_q,
    seq_lens,
    *,
    causal=True,
    sm_scale=None,
    softcap=None,
    window=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    max_seqlen_q=None,
    num_splits=None,
    return_lse=False,
):
    assert sinks is None
    page_size = k_cache.shape[1]
    lens = seq_lens.tolist()
    table = block_table.cpu().long()
    slots = []
    for b, n in enumerate(lens):
        t = torch.arange(n)
        slots.append(table[b, t // page_size] * page_size + t % page_size)
    idx = torch.cat(slots).to(q.device) if slots else torch.empty(0, dtype=torch.int64, device=q.device)
    flat_k = k_cache.reshape(-1, *k_cache.shape[2:])[idx]
    flat_v = v_cache.reshape(-1, *v_cache.shape[2:])[idx]
    if k_cache.dtype == torch.float8_e4m3fn:
        flat_k = (flat_k.float() * (k_scale if k_scale is not None else 1.0)).to(q.dtype)
        flat_v = (flat_v.float() * (v_scale if v_scale is not None else 1.0)).to(q.dtype)
    cu_k = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32).to(q.device)
    return kernels.prefill_attention(
        q,
        flat_k,
        flat_v,
        cu_seqlens_q,
        cu_k,
        causal=causal,
        sm_scale=sm_scale,
        window=window,
        softcap=softcap,
        return_lse=return_lse,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max(lens, default=0),
    )
