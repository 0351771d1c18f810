"""How one contender is timed: warm-up, then the median of many runs measured with device events, on input sets
rotated so that the L2 cache never holds what the next run reads.

On CUDA this is ``triton.testing.do_bench`` (it also flushes L2 by writing a buffer before every timed run);
the quantiles returned are the median and the 20th/80th percentiles. Host-side launch overhead is inside the
measurement only when it is longer than that flush, which is what a real serving loop would see too.

On CPU (``--smoke`` only) the same interface times with the wall clock: the numbers prove the command path
works and are not performance numbers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIN_ROTATION_FACTOR = 2
"""Input sets are rotated until together they are at least this many times the L2 size."""

MAX_ROTATION_SETS = 64


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th / 80th percentiles of the timed runs."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    method: str


def rotation_sets(set_bytes: int, l2_bytes: int | None) -> int:
    """How many independent input sets to cycle through so that together they exceed ``MIN_ROTATION_FACTOR`` L2
    sizes (1 when one set is already that large, or when the L2 size is unknown, as on CPU)."""
    if not l2_bytes or set_bytes <= 0:
        return 1
    return max(1, min(MAX_ROTATION_SETS, math.ceil(MIN_ROTATION_FACTOR * l2_bytes / set_bytes)))


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``calls[0]``, ``calls[1]``, ... in turn, one per invocation."""
    if not calls:
        raise ValueError("rotating needs at least one call")
    state = {"i": 0}

    def run() -> object:
        i = state["i"]
        state["i"] = (i + 1) % len(calls)
        return calls[i]()

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """Run ``fn`` once and return its result and the wall time in seconds: for compiled contenders this is the
    compile/autotune cost, which the results record separately from the steady-state timing."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def measure(
    fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3
) -> Timing:
    """Time ``fn`` (already called once: compiled and autotuned) on ``device``."""
    if device.type == "cuda":
        import triton.testing

        median, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(median), float(q20), float(q80), "triton.testing.do_bench (CUDA events, L2 flushed)")
    times = []  # no separate warm-up: the first (correctness) call already ran everything once
    for _ in range(max(1, cpu_reps)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times, "wall clock on CPU (smoke: not a performance number)")


def summarize(times_ms: Sequence[float], method: str) -> Timing:
    """The median and 20th / 80th percentiles (nearest rank) of at least one time in milliseconds."""
    if not times_ms:
        raise ValueError("summarize needs at least one time")
    times = sorted(times_ms)
    lo, hi = times[int(0.2 * (len(times) - 1))], times[math.ceil(0.8 * (len(times) - 1))]
    return Timing(statistics.median(times), lo, hi, method)
