"""What the stages measure: per request time to first token (TTFT) and time per output token (TPOT); per phase
tokens and busy time; the prefix cache's hits; bytes of KV exported and the time spent exporting and importing it.

Times are wall-clock seconds from ``time.perf_counter``. On a GPU the stages synchronize once per step anyway
(the sampled tokens are read back to decide who stops), so step times include the kernels' work.
- TTFT: from the request's arrival at the stage that computes its prompt to its first token being sampled.
- TPOT: (time of the last token - time the first token appeared) / (output tokens - 1).
- prefill tokens/s counts computed prompt tokens (cached ones aside) over the time of the steps that carried prompt
  chunks; decode tokens/s counts decode rows over the time of the steps that carried decode rows. A colocated step
  carrying both (a "mixed" step) counts in both, so the two rates are each phase's rate while it runs.
- prefix cache hit rate: prompt tokens taken from the cache / prompt tokens of the prefilled requests.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from disagg.request import RequestOutput


@dataclass
class Metrics:
    """Totals a run accumulates; both stages of a run may share one instance."""

    prefill_tokens: int = 0
    prefill_time_s: float = 0.0
    prefill_batches: int = 0
    decode_tokens: int = 0
    decode_time_s: float = 0.0
    decode_steps: int = 0
    mixed_steps: int = 0  # steps that carried decode rows and prompt chunks together (colocated)
    mixed_time_s: float = 0.0
    prompt_tokens: int = 0  # of prefilled requests, cached or computed
    cached_tokens: int = 0
    kv_import_skipped_tokens: int = 0  # imported tokens whose pages the decode pool had cached
    kv_bytes_exported: int = 0
    exports: int = 0
    export_time_s: float = 0.0
    imports: int = 0
    import_time_s: float = 0.0

    def record_step(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None:
        """One model step that carried ``decode_rows`` decode rows and ``prompt_tokens`` prompt-chunk tokens."""
        if prompt_tokens:
            self.prefill_tokens += prompt_tokens
            self.prefill_time_s += seconds
            self.prefill_batches += 1
        if decode_rows:
            self.decode_tokens += decode_rows
            self.decode_time_s += seconds
            self.decode_steps += 1
        if prompt_tokens and decode_rows:
            self.mixed_steps += 1
            self.mixed_time_s += seconds

    def summary(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The run's metrics as a flat JSON-ready dict."""
        ok = [o for o in outputs if o.error is None]
        ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
        tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
        pure_steps = self.decode_steps - self.mixed_steps
        return {
            "num_requests": len(outputs),
            "num_failed": len(outputs) - len(ok),
            "prefill_tokens": self.prefill_tokens,
            "prefill_time_s": self.prefill_time_s,
            "prefill_tokens_per_s": _rate(self.prefill_tokens, self.prefill_time_s),
            "prefill_batches": self.prefill_batches,
            "decode_tokens": self.decode_tokens,
            "decode_time_s": self.decode_time_s,
            "decode_tokens_per_s": _rate(self.decode_tokens, self.decode_time_s),
            "decode_steps": self.decode_steps,
            "mean_decode_batch": self.decode_tokens / self.decode_steps if self.decode_steps else 0.0,
            "mixed_steps": self.mixed_steps,
            "decode_step_mean_s": (self.decode_time_s - self.mixed_time_s) / pure_steps if pure_steps else None,
            "mixed_step_mean_s": self.mixed_time_s / self.mixed_steps if self.mixed_steps else None,
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
            "ttft_max_s": max(ttft) if ttft else None,
            "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefix_cache_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "kv_import_skipped_tokens": self.kv_import_skipped_tokens,
            "kv_bytes_exported": self.kv_bytes_exported,
            "exports": self.exports,
            "export_time_s": self.export_time_s,
            "imports": self.imports,
            "import_time_s": self.import_time_s,
        }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
