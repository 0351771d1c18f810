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


class MetricsSummary(dict):
    """The dict :meth:`Metrics.summary` returns; ``str()`` formats it as the command line's table."""

    def __str__(self) -> str:
        return format_metrics(self)


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

    def summary(self, outputs: list[RequestOutput]) -> MetricsSummary:
        """The run's metrics as a flat JSON-ready dict; ``print()`` shows it as the command line's table."""
        ok = [o for o in outputs if o.error is None]
        ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
        tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
        pure_steps = self.decode_steps - self.mixed_steps
        summary = {
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
        return MetricsSummary(summary)


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def format_metrics(m: dict[str, Any]) -> str:
    """A summary (:meth:`Metrics.summary`, maybe with the command line's ``wall_time_s``, ``kernels`` and
    ``device``) as the command line's short table; stages that did nothing in this process are left out."""

    def f(x: float | None, unit: str = " s") -> str:
        return "-" if x is None else f"{x:.4g}{unit}"

    lines = [f"{'stage':<10}{'tokens':>10}{'time':>12}{'tokens/s':>12}"]
    for stage in ("prefill", "decode"):
        tokens, seconds = m[f"{stage}_tokens"], m[f"{stage}_time_s"]
        if tokens:
            lines.append(f"{stage:<10}{tokens:>10}{f(seconds):>12}{f(m[f'{stage}_tokens_per_s'], ''):>12}")
    lines.append(
        f"requests {m['num_requests']} ({m['num_failed']} failed)   TTFT mean {f(m['ttft_mean_s'])} "
        f"(max {f(m['ttft_max_s'])})   TPOT mean {f(m['tpot_mean_s'])}"
    )
    kv = []
    if m["exports"]:
        kv.append(
            f"KV export: {m['kv_bytes_exported']:,} bytes for {plural(m['exports'], 'request')}, {f(m['export_time_s'])}"
        )
    if m["imports"]:
        kv.append(f"KV import: {plural(m['imports'], 'request')}, {f(m['import_time_s'])}")
    if m["kv_import_skipped_tokens"]:
        kv.append(f"{m['kv_import_skipped_tokens']} imported tokens found cached")
    if m["decode_steps"]:
        mixed = f" ({m['mixed_steps']} with prefill chunks)" if m["mixed_steps"] else ""
        kv.append(f"decode: {m['decode_steps']} steps{mixed}, mean batch {f(m['mean_decode_batch'], '')}")
    lines += ["   ".join(kv)] if kv else []
    if m["prompt_tokens"]:
        lines.append(
            f"prefix cache: {m['cached_tokens']} of {m['prompt_tokens']} prompt tokens reused "
            f"(hit rate {m['prefix_cache_hit_rate']:.1%})"
        )
    if "kernels" in m:  # the command line adds how the kernels ran, and the wall time
        lines.append(f"wall {f(m.get('wall_time_s'))}, kernels: {m['kernels']} on {m['device']}")
    return "\n".join(lines)
