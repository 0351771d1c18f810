"""The kernels' launches as PyTorch custom ops, ``torch.ops.phaseattn.*``, so that ``torch.compile`` traces code
that calls phaseattn's public functions without graph breaks, and CUDA graphs capture them.

Dynamo cannot trace a Triton launch made from Python launcher code (host-side grid functions, autotuning, the
interpreter). A custom op is opaque to it: the graph records the op, and its fake implementation (below each op)
tells the compiler the exact shapes, dtypes and devices of the outputs without running anything. The public
functions (``kernels.prefill_attention`` ...) validate their inputs in plain Python, which Dynamo traces, and then
call the op: the op boundary sits after validation, so errors and signatures are those of the public functions.
Ops take only what the launch needs, in schema-friendly types (no unions, no Python objects).

Registered when ``kernels`` is imported. The ops have no autograd formula (the kernels are forward-only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import merge, prefill


@torch.library.custom_op("phaseattn::prefill_attention", mutates_args=())
def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool,
    sm_scale: float | None,
    window: int | None,
    softcap: float | None,
    return_lse: bool,
    max_seqlen_q: int,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of :func:`kernels.prefill_attention`; lse is empty, (0,), unless ``return_lse``."""
    return prefill.launch(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, window, softcap, return_lse, max_seqlen_q
    )


@prefill_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, window, softcap, return_lse, max_seqlen_q):
    total_q, num_q_heads, head_dim = q.shape
    lse_shape = (total_q, num_q_heads) if return_lse else (0,)
    return q.new_empty((total_q, num_q_heads, head_dim)), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("phaseattn::merge_attention_states", mutates_args=())
def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of :func:`kernels.merge_attention_states`."""
    return merge.launch(out_a, lse_a, out_b, lse_b)


@merge_attention_states.register_fake
def _(out_a, lse_a, out_b, lse_b):
    num_tokens, num_heads, head_dim = out_a.shape
    return out_a.new_empty((num_tokens, num_heads, head_dim)), lse_a.new_empty((num_tokens, num_heads))
