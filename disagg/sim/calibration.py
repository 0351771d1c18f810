"""Calibrating devices from a ``python -m bench`` results file (schema ``phaseattn-bench/1``, see bench/results.py).

What is read, each piece optional (what a file lacks stays at its default, labelled so):

- ``environment.device_name`` (which preset the file calibrates) and ``environment.memory_bytes``;
- ``ceilings.matmul_flops`` (FLOP/s) and ``ceilings.copy_bandwidth`` (bytes/s): the device's two roofs;
- ``measurements``: our kernels' rows (``kind == "ours"``, or a contender named ``phaseattn...``) with
  ``status == "ok"``. A prefill row's efficiency is ``frac_matmul``, a decode row's ``frac_copy``; where a row lacks
  the fraction it is computed from its rate (``tflops``/``gbps``, or ``flops``/``bytes`` over ``time_ms``) and the
  file's ceilings. A phase's efficiency is the median over its rows: one figure for the whole sweep, short and long,
  small and large batches alike.

Older or hand-written files are read too where they spell the same things a little differently (``device`` for
``device_name`` at the top or under ``environment``/``env``/``device``; ``matmul_tflops`` / ``copy_gbps`` ceilings;
``results`` for ``measurements``). A file that says its numbers are not performance numbers (``--smoke``, CPU
interpreter timings) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass
from typing import Any

from disagg.sim.devices import DATASHEETS, Device, preset_for

# Accepted spellings and the scale that turns each into FLOP/s or bytes/s.
_FLOPS_KEYS = {"matmul_flops": 1.0, "flops": 1.0, "matmul_tflops": 1e12, "tflops": 1e12}
_BANDWIDTH_KEYS = {"copy_bandwidth": 1.0, "bandwidth": 1.0, "copy_gbps": 1e9, "gbps": 1e9, "copy_tbps": 1e12}
_FRACTION_KEYS = {"prefill": ("frac_matmul", "fraction"), "decode": ("frac_copy", "fraction")}
_RATE_KEYS = {"prefill": ("tflops", 1e12), "decode": ("gbps", 1e9)}
_AMOUNT_KEYS = {"prefill": "flops", "decode": "bytes"}


@dataclass(frozen=True)
class Measured:
    """What one results file says about its device; ``None`` where it says nothing. Efficiencies are fractions of
    the file's own ceilings."""

    source: str
    device_name: str | None
    flops: float | None
    bandwidth: float | None
    memory: float | None
    prefill_attention: float | None
    decode_attention: float | None


def read_results(path: str | os.PathLike) -> Measured:
    """Read a bench results file; ValueError if it is not a JSON object or holds no performance numbers."""
    path = os.fspath(path)
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"results: {path} is not a JSON object")
    if doc.get("performance_numbers") is False or doc.get("smoke") is True:
        raise ValueError(f"results: {path} holds no performance numbers (a --smoke run); it cannot calibrate")
    env = next((doc[k] for k in ("environment", "env", "device") if isinstance(doc.get(k), dict)), {})
    ceilings = doc.get("ceilings") if isinstance(doc.get("ceilings"), dict) else {}
    flops = _scaled(ceilings, _FLOPS_KEYS)
    bandwidth = _scaled(ceilings, _BANDWIDTH_KEYS)
    rows = doc.get("measurements", doc.get("results", []))
    rows = [r for r in rows if isinstance(r, dict) and _is_ours(r) and r.get("status", "ok") == "ok"]
    return Measured(
        source=path,
        device_name=_first_str(env, ("device_name", "device", "name", "gpu"))
        or _first_str(doc, ("device_name", "device", "gpu")),
        flops=flops,
        bandwidth=bandwidth,
        memory=_positive(env.get("memory_bytes")),
        prefill_attention=_median([_fraction(r, "prefill", flops) for r in rows if r.get("phase") == "prefill"]),
        decode_attention=_median([_fraction(r, "decode", bandwidth) for r in rows if r.get("phase") == "decode"]),
    )


def calibrate(base: Device, measured: Measured) -> Device:
    """``base`` with every quantity ``measured`` gives replaced by it, and its provenance saying so. Ceilings are
    taken only in pairs: a roofline from one measured roof and one assumed roof would be neither."""
    label = f"measured: {measured.source}"
    dev, prov, eff = base, base.provenance, base.efficiency
    if measured.flops and measured.bandwidth:
        fp8 = measured.flops * dev.fp8_flops / dev.flops if dev.fp8_flops else None  # the datasheet's fp8:bf16 ratio
        dev = dataclasses.replace(dev, flops=measured.flops, bandwidth=measured.bandwidth, fp8_flops=fp8)
        prov = dataclasses.replace(prov, ceilings=label)
    if measured.memory:
        dev = dataclasses.replace(dev, memory=measured.memory)
    for name in ("prefill_attention", "decode_attention"):
        value = getattr(measured, name)
        if value is not None:
            eff = dataclasses.replace(eff, **{name: min(value, 1.0)})
            prov = dataclasses.replace(prov, **{name: label})
    return dataclasses.replace(dev, efficiency=eff, provenance=prov)


def calibrated_devices(paths: list[str | os.PathLike]) -> dict[str, Device]:
    """Preset devices calibrated by results files, keyed by preset name (``h100``, ...). A file whose device
    matches no preset is refused; a later file for the same device replaces an earlier one."""
    out: dict[str, Device] = {}
    for path in paths:
        m = read_results(path)
        key = preset_for(m.device_name or "")
        if key is None:
            raise ValueError(f"results: {path}: device {m.device_name!r} matches no preset ({', '.join(DATASHEETS)})")
        out[key] = calibrate(DATASHEETS[key].device(), m)
    return out


def _positive(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 < v < float("inf")
    return float(v) if ok else None


def _first_str(d: dict, keys: tuple[str, ...]) -> str | None:
    return next((d[k] for k in keys if isinstance(d.get(k), str) and d[k]), None)


def _scaled(d: dict, keys: dict[str, float]) -> float | None:
    return next((_positive(d[k]) * s for k, s in keys.items() if _positive(d.get(k))), None)


def _is_ours(row: dict) -> bool:
    return row.get("kind") == "ours" or "phaseattn" in str(row.get("contender", row.get("name", ""))).lower()


def _fraction(row: dict, phase: str, ceiling: float | None) -> float | None:
    """The row's fraction of its phase's ceiling: as written, else from its rate, else from amount over time."""
    for key in _FRACTION_KEYS[phase]:
        if _positive(row.get(key)):
            return _positive(row[key])
    if not ceiling:
        return None
    key, scale = _RATE_KEYS[phase]
    if _positive(row.get(key)):
        return _positive(row[key]) * scale / ceiling
    amount, ms = _positive(row.get(_AMOUNT_KEYS[phase])), _positive(row.get("time_ms"))
    return amount / (ms * 1e-3) / ceiling if amount and ms else None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
