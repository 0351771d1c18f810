"""Colocated against disaggregated: the same requests through both deployments of one engine, measured side by side.

:func:`compare` serves one request set twice, with an :class:`~disagg.engine.Engine` in each mode and the same
settings (model, pools, chunk budget, prefix cache, kernels), and collects for each: TTFT and TPOT percentiles,
each phase's tokens/s, the KV bytes moved between the stages (none when colocated), and the mean time of a decode
step without and with prompt chunks in it (the interference disaggregation removes). :func:`synthetic_requests`
draws a workload in the simulator's length syntax (:func:`disagg.sim.workload.length_dist`) with Poisson arrivals.
Numbers are wall-clock on this machine; on CPU the kernels run in Triton's interpreter, so they measure the
interpreter, and every table says which.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import kernels
from disagg.engine import MODES, Engine
from disagg.model import CausalLM
from disagg.request import Request, RequestOutput, SamplingParams
from disagg.sim.workload import LengthDist, Poisson

QUANTILES = (50, 90, 99)


def synthetic_requests(
    num_requests: int,
    prompt_len: LengthDist,
    output_len: LengthDist,
    *,
    vocab_size: int,
    context: int,
    rate: float | None = None,
    seed: int = 0,
    sampling: SamplingParams | None = None,
) -> tuple[list[Request], list[float]]:
    """``num_requests`` requests with random token ids, prompt and output lengths drawn from the distributions
    (prompts cut to fit ``context`` with their outputs), never stopping early; and their arrival times (seconds):
    Poisson at ``rate`` requests/s, or all at 0. Request i gets the id "i" and the seed ``sampling.seed + i``."""
    rng = np.random.default_rng(seed)
    prompts, outputs = prompt_len.sample(rng, num_requests), output_len.sample(rng, num_requests)
    base = sampling or SamplingParams()
    requests = []
    for i, (n, m) in enumerate(zip(prompts.tolist(), outputs.tolist(), strict=True)):
        m = min(m, context - 1)
        n = max(1, min(n, context - m))
        ids = rng.integers(0, vocab_size, size=n).tolist()
        params = SamplingParams(
            max_new_tokens=m,
            temperature=base.temperature,
            top_k=base.top_k,
            top_p=base.top_p,
            seed=base.seed + i,
            eos_token_ids=(),
        )
        requests.append(Request(str(i), ids, params))
    arrivals = np.cumsum(Poisson(rate).gaps(rng, num_requests)).tolist() if rate else [0.0] * num_requests
    return requests, arrivals


def percentiles(values: list[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": (float(np.percentile(arr, q)) if arr.size else None) for q in QUANTILES}


def where() -> dict[str, str]:
    """The device and how the kernels run (every number of a comparison is labelled with it)."""
    if kernels.INTERPRET:
        return {"device": "cpu", "kernels": "interpreted"}
    return {"device": torch.cuda.get_device_name(), "kernels": "compiled"}


def compare(
    model: CausalLM, requests: list[Request], arrivals: list[float] | None = None, **engine_options: Any
) -> dict[str, Any]:
    """Serve ``requests`` (arriving at ``arrivals``) in each mode with ``Engine(model, mode=..., **engine_options)``.

    Returns ``{"device", "kernels", "same_tokens", "modes": {mode: {...metrics, "ttft_s": {p50, p90, p99},
    "tpot_s": {...}, "kv_bytes_moved", "wall_time_s"}}, "outputs": {mode: [RequestOutput, ...]}}``.
    """
    if not kernels.INTERPRET:  # compile every kernel once, outside the measured runs
        for mode in MODES:
            Engine(model, mode=mode, **engine_options).generate(requests[:1])
    result: dict[str, Any] = {**where(), "modes": {}, "outputs": {}}
    for mode in MODES:
        engine = Engine(model, mode=mode, **engine_options)
        start = time.perf_counter()
        outputs = engine.generate(requests, arrivals=arrivals)
        wall = time.perf_counter() - start
        summary = engine.metrics.summary(outputs)
        ok = [o for o in outputs if o.error is None]
        result["modes"][mode] = {
            **summary,
            "ttft_s": percentiles([o.ttft_s for o in ok if o.ttft_s is not None]),
            "tpot_s": percentiles([o.tpot_s for o in ok if o.tpot_s is not None]),
            "kv_bytes_moved": summary["kv_bytes_exported"],
            "wall_time_s": wall,
        }
        result["outputs"][mode] = outputs
    tokens = [[(o.output_ids, o.error) for o in outs] for outs in result["outputs"].values()]
    result["same_tokens"] = all(t == tokens[0] for t in tokens)
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a table, one column per mode, every number labelled with the device and kernel mode."""
    modes = result["modes"]
    label = f"[{result['device']}, {result['kernels']}]"

    def num(x: Any, unit: str = "") -> str:
        if x is None:
            return "-"
        if isinstance(x, int):
            return f"{x:,}{unit}"
        return f"{x:.4g}{unit}"

    rows: list[tuple[str, list[str]]] = [
        ("requests (failed)", [f"{m['num_requests']} ({m['num_failed']})" for m in modes.values()]),
    ]
    for metric in ("ttft_s", "tpot_s"):
        for q in QUANTILES:
            rows.append((f"{metric[:4].upper()} p{q}", [num(m[metric][f"p{q}"], " s") for m in modes.values()]))
    rows += [
        ("prefill tokens/s", [num(m["prefill_tokens_per_s"]) for m in modes.values()]),
        ("decode tokens/s", [num(m["decode_tokens_per_s"]) for m in modes.values()]),
        ("decode step, decode rows only", [num(m["decode_step_mean_s"], " s") for m in modes.values()]),
        ("decode step, with prefill chunks", [num(m["mixed_step_mean_s"], " s") for m in modes.values()]),
        ("steps with prefill chunks", [num(m["mixed_steps"]) for m in modes.values()]),
        ("KV bytes moved", [num(m["kv_bytes_moved"]) for m in modes.values()]),
        ("prefix cache hit rate", [num(m["prefix_cache_hit_rate"]) for m in modes.values()]),
        ("wall time", [num(m["wall_time_s"], " s") for m in modes.values()]),
    ]
    width = max(len(name) for name, _ in rows) + 2
    cols = [max(len(f"{mode} {label}"), 14) + 2 for mode in modes]
    lines = ["".ljust(width) + "".join(f"{mode} {label}".rjust(c) for mode, c in zip(modes, cols, strict=True))]
    for name, values in rows:
        lines.append(name.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cols, strict=True)))
    same = "yes" if result["same_tokens"] else "NO"
    lines.append(f"same tokens in both modes: {same}")
    if result["kernels"] == "interpreted":
        lines.append(
            "(kernels ran in Triton's interpreter on CPU: these times measure the interpreter, not the kernels)"
        )
    return "\n".join(lines)


def output_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per request, its outputs in both modes (for ``--json``)."""
    outs: dict[str, list[RequestOutput]] = result["outputs"]
    first = next(iter(outs.values()))
    return [
        {"request_id": o.request_id, "prompt_ids": o.prompt_ids, **{m: _row(outs[m][i]) for m in outs}}
        for i, o in enumerate(first)
    ]


def _row(o: RequestOutput) -> dict[str, Any]:
    d = o.to_dict()
    del d["request_id"], d["prompt_ids"]
    return d
