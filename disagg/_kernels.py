"""Where the engine gets the paged-KV kernels.

``kernels.write_kv_cache`` and ``kernels.paged_decode_attention`` are being built in issue 3. Until they land,
plain-PyTorch stand-ins with the specified signatures live here, in this one place, so the engine runs end to
end; this module is deleted when issue 3 merges and the engine imports from ``kernels`` directly.
"""

from __future__ import annotations

import math

import torch

try:
    from kernels import paged_decode_attention, write_kv_cache
except ImportError:

    def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        page_size = k_cache.shape[1]
        for x, cache, scale in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
            if cache.dtype == torch.float8_e4m3fn:
                x = (x.float() / scale).clamp(-448.0, 448.0)
            cache[slots // page_size, slots % page_size] = x.to(cache.dtype)

    def paged_decode_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        *,
        sm_scale=None,
        softcap=None,
        window=None,
        k_scale=None,
        v_scale=None,
        num_splits=None,
        return_lse=False,
    ):
        batch, hq, d = q.shape
        page_size, hkv = k_cache.shape[1], k_cache.shape[2]
        scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
        out = torch.empty_like(q)
        for b in range(batch):
            n = int(seq_lens[b])
            pages = block_table[b, : -(-n // page_size)].long()
            k = k_cache[pages].reshape(-1, hkv, d)[:n].float()
            v = v_cache[pages].reshape(-1, hkv, d)[:n].float()
            if k_scale is not None:
                k, v = k * k_scale, v * v_scale
            lo = max(0, n - window) if window is not None else 0
            k, v = k[lo:].repeat_interleave(hq // hkv, 1), v[lo:].repeat_interleave(hq // hkv, 1)
            s = torch.einsum("hd,thd->ht", q[b].float(), k) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            out[b] = torch.einsum("ht,thd->hd", s.softmax(-1), v).to(q.dtype)
        return out


__all__ = ["paged_decode_attention", "write_kv_cache"]
