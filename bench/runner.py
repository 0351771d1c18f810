"""Measuring one contender on one shape, the same way for every kernel and peer.

A contender is a list of calls (one per rotated input set) that return its output, the context it must run in
(e.g. a forced SDPA backend) and a view that puts its output in a common layout. The first call is the
correctness check (against our kernel's output on the same inputs) and pays any compile/autotune cost, which is
recorded as ``first_call_s``; then the steady state is timed (:mod:`bench.timing`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import timing
from bench.results import Ceilings, ResultsFile, clip, measurement, not_measured, shape_label

AGREE_TOL = 3e-2
"""max_rel_err above which a contender is flagged as disagreeing with ours (bf16 outputs: a few ulps at most)."""


@dataclass
class RunContext:
    """What every case needs: the device, the run's ceilings, where results go, and the timing options."""

    device: torch.device
    results: ResultsFile
    ceilings: Ceilings | None
    peers: tuple[str, ...]
    warmup_ms: float
    rep_ms: float
    l2_bytes: int | None
    memory_budget: int
    seed: int = 0
    log: Callable[[str], None] = print

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)


@dataclass
class Contender:
    name: str
    kind: str  # "ours" or "peer"
    calls: list[Callable[[], torch.Tensor]]
    layout: Callable[[torch.Tensor], torch.Tensor] = lambda out: out
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    extra: dict[str, Any] = field(default_factory=dict)


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf when out has a NaN or inf, or the shapes differ)."""
    if out.shape != ref.shape:
        return float("inf")
    diff = (out.float() - ref.float()).abs().max()
    if not torch.isfinite(diff):
        return float("inf")
    return float(diff) / max(float(ref.float().abs().max()), 1e-30)


def _failure(exc: BaseException, caught: list[warnings.WarningMessage]) -> str:
    """A one-line status for a contender that could not run: "skipped: why" when it refused the shape or ran
    out of memory, "error: ..." for anything else."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    refusal = any(s in str(exc) for s in ("No available kernel", "No viable backend", "not supported", "Unsupported"))
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "skipped: out of device memory"
    if refusal:
        # On CUDA the backend explains itself in warnings ("... not used because:", then the reasons).
        why = list(dict.fromkeys(line for w in caught for line in str(w.message).strip().splitlines()[:1]))
        return f"skipped: refuses this shape ({clip('; '.join(why), 400) or text})"
    return f"error: {text}"


def run_contender(
    ctx: RunContext,
    c: Contender,
    *,
    phase: str,
    tier: str,
    shape: dict[str, Any],
    flops: float,
    nbytes: float,
    reference: torch.Tensor | None,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Check, time and record one contender; return its entry and its output (in the common layout)."""
    common = {"tier": tier, "rotation_sets": len(c.calls), **c.extra}
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with c.context():
                out, first_s = timing.first_call(c.calls[0], ctx.device)
                out = c.layout(out)
                err = max_rel_err(out, reference) if reference is not None else None
                fn = timing.rotating(c.calls)
                t = timing.measure(fn, ctx.device, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms)
        except Exception as exc:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
                torch.cuda.empty_cache()
            entry = not_measured(phase, c.name, c.kind, shape, flops, nbytes, _failure(exc, caught), **common)
            ctx.results.add(entry)
            return entry, None
    if err is not None:
        common.update(max_rel_err=err, agrees_with_ours=err <= AGREE_TOL)
    entry = measurement(phase, c.name, c.kind, shape, flops, nbytes, t, ctx.ceilings, first_call_s=first_s, **common)
    ctx.results.add(entry)
    return entry, out


def run_all(
    ctx: RunContext,
    contenders: list[Contender],
    *,
    phase: str,
    tier: str,
    shape: dict[str, Any],
    flops: float,
    nbytes: float,
    reference: torch.Tensor | None = None,
) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """Run the contenders in order, ours first (its output becomes the reference the others are checked
    against); log one line each. Returns the entries and the reference (for contenders run later on the same
    inputs)."""
    entries = []
    for c in contenders:
        start = time.perf_counter()
        entry, out = run_contender(
            ctx, c, phase=phase, tier=tier, shape=shape, flops=flops, nbytes=nbytes, reference=reference
        )
        if c.kind == "ours":
            reference = out
        del out
        entries.append(entry)
        ctx.log(_line(entry, time.perf_counter() - start))
    return entries, reference


def _line(e: dict[str, Any], wall_s: float) -> str:
    head = f"{e['phase']:<7} {shape_label(e['phase'], e['shape']):<44} {e['contender']:<24}"
    if e["status"] != "ok":
        return f"{head} {clip(e['status'], 100)}"
    rate = f"{e['tflops']:7.1f} TFLOP/s" if e["phase"] == "prefill" else f"{e['gbps']:7.0f} GB/s"
    err = f" err {e['max_rel_err']:.1e}" if e.get("max_rel_err") is not None else ""
    return f"{head} {e['time_ms'] * 1e3:10.1f} us {rate}{err} ({wall_s:.1f} s)"


def case_meta(case: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`run_all` that describe a sweep case (phase, tier, shape, flops, bytes)."""
    return {"phase": case.phase, "tier": case.tier, "shape": case.shape, "flops": case.flops, "nbytes": case.nbytes}


def skip_all(ctx: RunContext, case: Any, names: list[str], why: str) -> list[dict[str, Any]]:
    """Record every named contender (ours is "phaseattn") as skipped on ``case`` with the reason ``why``."""
    entries = []
    for name in names:
        kind = "ours" if name == "phaseattn" else "peer"
        entry = not_measured(
            case.phase, name, kind, case.shape, case.flops, case.nbytes, f"skipped: {why}", tier=case.tier
        )
        ctx.results.add(entry)
        entries.append(entry)
    ctx.log(f"{case.phase:7} {shape_label(case.phase, case.shape)}: skipped: {why}")
    return entries
