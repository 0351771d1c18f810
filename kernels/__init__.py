"""phaseattn kernels: Triton attention kernels specialised for the two phases of LLM inference.

Public API:
    prefill_attention        FlashAttention forward over packed varlen batches (causal, GQA, window, softcap)
    write_kv_cache           scatter new K/V into a paged cache (num_pages, page_size, kv_heads, head_dim); fp8
    paged_decode_attention   one query token per sequence over its paged KV cache (GQA, split-KV, fp8 KV)
    paged_prefill_attention  new query tokens per sequence over a paged cache holding a prefix (chunked prefill,
                             prefix reuse, multi-token decode)
    merge_attention_states   exact combine of two partial attentions over disjoint key sets, through their LSEs
    HEAD_DIMS                the head dims the attention kernels support

The attention kernels all take ``sinks=`` (one float32 logit per query head that joins the softmax denominator).

The kernels run compiled on CUDA tensors when a CUDA device is present, and in Triton's interpreter on CPU
tensors otherwise (``TRITON_INTERPRET`` set by the user wins). See :mod:`kernels._runtime`.

Note: another PyPI package also imports as ``kernels`` (Hugging Face's kernel hub client); install phaseattn in an
environment without it.
"""

from kernels import _runtime
from kernels._runtime import INTERPRET, debug_enabled, set_debug
from kernels._validate import HEAD_DIMS

if _runtime.INTERPRET:
    from kernels import _interpreter_fixes

    _interpreter_fixes.apply()

from kernels.decode import paged_decode_attention
from kernels.kv_cache import write_kv_cache
from kernels.merge import merge_attention_states
from kernels.paged_prefill import paged_prefill_attention
from kernels.prefill import prefill_attention

__all__ = [
    "HEAD_DIMS",
    "INTERPRET",
    "debug_enabled",
    "merge_attention_states",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_attention",
    "set_debug",
    "write_kv_cache",
]
