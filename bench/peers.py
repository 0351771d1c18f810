"""The peers our kernels are measured against, built on the very tensors our kernel reads.

- PyTorch SDPA with one backend forced at a time (``torch.nn.attention.sdpa_kernel``): FlashAttention-2
  ("sdpa-flash"), cuDNN ("sdpa-cudnn"), memory-efficient/xFormers ("sdpa-efficient"). GQA goes through
  ``enable_gqa=True``; a backend that refuses a shape is recorded as skipped with the reason it gives.
- FlexAttention, compiled once per shape (``torch.compile(flex_attention, dynamic=False)``), with a causal
  block mask built outside the timed region.

Every peer takes (batch, heads, seq, head_dim) tensors. Our packed (tokens, heads, head_dim) layout is viewed as
that without a copy, so peers and ours read the same memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from bench.runner import Contender

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}
PEERS = (*SDPA_BACKENDS, "flex")

BHSD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v as (batch, heads, seq, head_dim)


def _identity(qkv: BHSD) -> BHSD:
    return qkv


def given(qkv: BHSD) -> Callable[[], BHSD]:
    """An input getter for tensors prepared outside the timed region."""
    return functools.partial(_identity, qkv)


def sdpa(name: str, inputs: list[Callable[[], BHSD]], *, causal: bool, layout, extra=None) -> Contender:
    """SDPA forced onto one backend. ``inputs[i]()`` yields rotation set i's (q, k, v); for the decode peer that
    includes the gather, so the gather is timed with the attention when the caller asks for it. With ``causal``
    and fewer queries than keys the mask is bottom-right aligned (``causal_lower_right``), as ours."""

    def call(get: Callable[[], BHSD]) -> torch.Tensor:
        q, k, v = get()
        gqa = q.shape[1] != k.shape[1]
        if causal and q.shape[2] != k.shape[2]:
            mask = causal_lower_right(q.shape[2], k.shape[2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return Contender(
        name=name,
        kind="peer",
        calls=[functools.partial(call, get) for get in inputs],
        layout=layout,
        context=lambda: sdpa_kernel(SDPA_BACKENDS[name]),
        extra=extra or {},
    )


@functools.cache
def compiled_flex() -> Callable:
    """``flex_attention`` compiled for static shapes. A sweep compiles one graph per shape, far more than
    dynamo's default recompile limit (8), past which it would silently fall back to the slow eager path."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 4096)
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex(inputs: list[Callable[[], BHSD]], *, causal: bool, seqlen_q: int, seqlen_k: int, device, layout) -> Contender:
    """FlexAttention on the same tensors, causal bottom-right aligned (query i sees key j iff
    j <= i + Sk - Sq) as ours. The block mask is built on the first (untimed) call, so a failure there is
    recorded against this peer."""
    offset = seqlen_k - seqlen_q

    def causal_lower_right_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    @functools.cache
    def block_mask():
        if not causal:
            return None
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod = _causal if offset == 0 else causal_lower_right_mod
        return create_block_mask(mask_mod, None, None, seqlen_q, seqlen_k, device=device)

    def call(get: Callable[[], BHSD]) -> torch.Tensor:
        q, k, v = get()
        return compiled_flex()(q, k, v, block_mask=block_mask(), enable_gqa=q.shape[1] != k.shape[1])

    return Contender(name="flex", kind="peer", calls=[functools.partial(call, get) for get in inputs], layout=layout)
