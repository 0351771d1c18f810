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

from kernels import decode, kv_cache, merge, paged_prefill, prefill


def _attention_outputs(q: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake (out, lse) of an attention op: out like q (contiguous), lse float32 (tokens, heads), or (0,) without
    ``return_lse``."""
    tokens, num_q_heads, head_dim = q.shape
    lse_shape = (tokens, num_q_heads) if return_lse else (0,)
    return q.new_empty((tokens, num_q_heads, head_dim)), q.new_empty(lse_shape, dtype=torch.float32)


prefill_attention = torch.library.custom_op("phaseattn::prefill_attention", prefill.launch, mutates_args=())


@prefill_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, window, softcap, sinks, return_lse, max_seqlen_q):
    return _attention_outputs(q, return_lse)


merge_attention_states = torch.library.custom_op("phaseattn::merge_attention_states", merge.launch, mutates_args=())


@merge_attention_states.register_fake
def _(out_a, lse_a, out_b, lse_b):
    num_tokens, num_heads, head_dim = out_a.shape
    return out_a.new_empty((num_tokens, num_heads, head_dim)), lse_a.new_empty((num_tokens, num_heads))


paged_prefill_attention = torch.library.custom_op(
    "phaseattn::paged_prefill_attention", paged_prefill.launch, mutates_args=()
)


@paged_prefill_attention.register_fake
def _(q, *args):
    return _attention_outputs(q, return_lse=args[-1])  # the schema's last argument


paged_decode_attention = torch.library.custom_op("phaseattn::paged_decode_attention", decode.launch, mutates_args=())


@paged_decode_attention.register_fake
def _(q, *args):
    return _attention_outputs(q, return_lse=args[-1])  # the schema's last argument


write_kv_cache = torch.library.custom_op(
    "phaseattn::write_kv_cache", kv_cache.launch, mutates_args=("k_cache", "v_cache")
)


@write_kv_cache.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, k_scale_value, v_scale, v_scale_value):
    return None
