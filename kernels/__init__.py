"""phaseattn kernels: Triton attention kernels specialised for the two phases of LLM inference.

Public API:
    prefill_attention   FlashAttention forward over packed varlen batches (causal, GQA, window, softcap)

The kernels run compiled on CUDA tensors when a CUDA device is present, and in Triton's interpreter on CPU
tensors otherwise (``TRITON_INTERPRET`` set by the user wins). See :mod:`kernels._runtime`.

Note: another PyPI package also imports as ``kernels`` (Hugging Face's kernel hub client); install phaseattn in an
environment without it.
"""

from kernels import _runtime
from kernels._runtime import INTERPRET, debug_enabled, set_debug

if _runtime.INTERPRET:
    from kernels import _interpreter_fixes

    _interpreter_fixes.apply()

from kernels.prefill import prefill_attention

__all__ = ["INTERPRET", "debug_enabled", "prefill_attention", "set_debug"]
