"""phaseattn kernels: Triton attention kernels specialised for the two phases of LLM inference.

Public API:
    prefill_attention        FlashAttention forward over packed varlen batches (causal, GQA, window, softcap)
    write_kv_cache           scatter new K/V into a paged cache (num_pages, page_size, kv_heads, head_dim); fp8
    paged_decode_attention   one query token per sequence over its paged KV cache (GQA, split-KV, fp8 KV)
    paged_prefill_attention  new query tokens per sequence over a paged cache holding a prefix (chunked prefill,
                             prefix reuse, multi-token decode)
    merge_attention_states   exact combine of two partial attentions over disjoint key sets, through their LSEs
    PagedDecodePlan, PagedPrefillPlan, PrefillPlan, WriteKVPlan, Workspace
                             the same kernels planned once per step (host-side lengths: checks, split count,
                             grid, workspace) and run per layer (launch only): see kernels._plan
    register_transformers    make "phaseattn" an attn_implementation of Hugging Face transformers (optional extra)
    HEAD_DIMS, PAGE_SIZES    the head dims the attention kernels support; the page sizes of the paged caches

The attention kernels all take ``sinks=`` (one float32 logit per query head that joins the softmax denominator).

Each launch is a custom op, ``torch.ops.phaseattn.<name>`` (:mod:`kernels._ops`), so ``torch.compile`` traces the
public functions without graph breaks.

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

from kernels import _ops  # noqa: F401  (registers torch.ops.phaseattn.*, which the public functions call)
from kernels._paged import PAGE_SIZES
from kernels._plan import Workspace
from kernels.decode import PagedDecodePlan, paged_decode_attention
from kernels.hf import register_transformers
from kernels.kv_cache import WriteKVPlan, write_kv_cache
from kernels.merge import merge_attention_states
from kernels.paged_prefill import PagedPrefillPlan, paged_prefill_attention
from kernels.prefill import PrefillPlan, prefill_attention

__all__ = [
    "HEAD_DIMS",
    "INTERPRET",
    "PAGE_SIZES",
    "PagedDecodePlan",
    "PagedPrefillPlan",
    "PrefillPlan",
    "Workspace",
    "WriteKVPlan",
    "debug_enabled",
    "merge_attention_states",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_attention",
    "register_transformers",
    "set_debug",
    "write_kv_cache",
]
