"""The benchmark's JSON results file: what a run measured, on what, and how it was counted.

One file per run. It is rewritten (atomically) after every measurement, so a run that is cut off still leaves
every number it took; ``status`` says whether the run completed. Layout::

    {
      "schema": "phaseattn-bench/1",
      "performance_numbers": true,          # false for --smoke runs (CPU interpreter): never plot those
      "notice": "...",                      # says plainly when the numbers are not performance numbers
      "status": "running" | "complete" | "stopped: ..." | "interrupted",
      "command": "python -m bench ...",
      "environment": {device_name, sm_count, memory_bytes, l2_bytes, torch, triton, cuda, cudnn, git_commit, ...},
      "conventions": {...},                 # how FLOPs, bytes and errors are counted (text)
      "ceilings": {"matmul_flops": FLOP/s, "copy_bandwidth": bytes/s} | null,
      "measurements": [ {phase, contender, kind, tier, shape, flops, bytes, intensity, status, time_ms, tflops,
                         gbps, frac_matmul, frac_copy, first_call_s, max_rel_err, ...}, ... ],
      "cases_not_run": int
    }

Every contender on a shape is credited the same FLOPs and bytes (the least work the shape needs, from
``disagg.roofline``), so TFLOP/s and GB/s are effective rates that compare across contenders exactly as times do.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.timing import Timing
from disagg import roofline

SCHEMA = "phaseattn-bench/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_NOTICE = (
    "SMOKE RUN: tiny shapes on CPU through Triton's interpreter, timed with the wall clock. "
    "These are NOT performance numbers; they only prove that the benchmark's command path works."
)
CONVENTIONS = {
    "prefill_flops": "4*B*Hq*Sq*Sk*D; causal counts only visible (query, key) pairs (about half for Sq == Sk)",
    "prefill_bytes": "q, k, v read once and out written once",
    "decode_flops": "4*B*Hq*context*D",
    "decode_bytes": "every K and V element of the context read once at the cache dtype + q read + out written",
    "ceilings": "bf16 torch.matmul n^3 at 2*n^3 FLOPs; device-to-device copy at bytes read + written",
    "rates": "every contender on a shape is credited the same FLOPs/bytes: TFLOP/s and GB/s are effective rates",
    "time": "median of the timed runs (time_ms_q20/q80: 20th/80th percentiles)",
    "max_rel_err": "max |x - ours| / max |ours| over all output elements, on the same inputs, before timing",
}


@dataclass(frozen=True)
class Ceilings:
    """Measured ceilings: FLOP/s of the bf16 matmul, bytes/s of the device-to-device copy."""

    matmul_flops: float
    copy_bandwidth: float

    def roofline(self) -> roofline.Roofline:
        return roofline.Roofline(flops=self.matmul_flops, bandwidth=self.copy_bandwidth)


def clip(text: str, width: int) -> str:
    """``text`` on one line in at most ``width`` characters, cut at a word boundary with " ..." (never mid-word)."""
    return textwrap.shorten(text, width, placeholder=" ...")


def measurement(
    phase: str,
    contender: str,
    kind: str,
    shape: dict[str, Any],
    flops: float,
    nbytes: float,
    t: Timing,
    ceilings: Ceilings | None,
    **extra: Any,
) -> dict[str, Any]:
    """One timed contender on one shape, with its rates and fractions of the run's ceilings."""
    seconds = t.median_ms * 1e-3
    entry = {
        "phase": phase,
        "contender": contender,
        "kind": kind,
        "shape": shape,
        "flops": flops,
        "bytes": nbytes,
        "intensity": roofline.intensity(flops, nbytes) if flops else 0.0,
        "status": "ok",
        "time_ms": t.median_ms,
        "time_ms_q20": t.q20_ms,
        "time_ms_q80": t.q80_ms,
        "timing_method": t.method,
        "tflops": flops / seconds / 1e12,
        "gbps": nbytes / seconds / 1e9,
    }
    if ceilings is not None:
        entry["frac_matmul"] = flops / seconds / ceilings.matmul_flops
        entry["frac_copy"] = nbytes / seconds / ceilings.copy_bandwidth
    entry.update(extra)
    return entry


def not_measured(
    phase: str, contender: str, kind: str, shape: dict[str, Any], flops: float, nbytes: float, status: str, **extra: Any
) -> dict[str, Any]:
    """A contender that was not timed on a shape; ``status`` is "skipped: <reason>" or "error: <what>"."""
    entry = {"phase": phase, "contender": contender, "kind": kind, "shape": shape, "flops": flops, "bytes": nbytes}
    entry["intensity"] = roofline.intensity(flops, nbytes) if flops else 0.0
    entry["status"] = status
    entry.update(extra)
    return entry


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device, interpret: bool, commit: str | None = None) -> dict[str, Any]:
    """Where and with what the numbers were taken. ``commit`` names the project's commit when the code runs from
    a copied tree without ``.git`` (as on a lent GPU machine); otherwise git is asked."""
    import triton

    from kernels import _runtime

    found = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if found else None
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": found or commit or "unknown (not a git checkout; pass --commit)",
        "git_commit_source": "git" if found else "--commit" if commit else None,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kernels_mode": "Triton interpreter (CPU)" if interpret else "compiled (CUDA)",
        "kernels_autotune": _runtime.AUTOTUNE,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=getattr(props, "L2_cache_size", None),
            compute_capability=f"{props.major}.{props.minor}",
        )
    else:
        env.update(
            device_name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            sm_count=None,
            memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None,
            l2_bytes=None,
        )
    return env


class ResultsFile:
    """The results of one run, rewritten to ``path`` after every change."""

    def __init__(self, path: Path, *, command: str, env: dict[str, Any], smoke: bool) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "performance_numbers": not smoke,
            "notice": SMOKE_NOTICE if smoke else "",
            "status": "running",
            "command": command,
            "environment": env,
            "conventions": CONVENTIONS,
            "ceilings": None,
            "measurements": [],
            "cases_not_run": 0,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def set_ceilings(self, ceilings: Ceilings, entries: list[dict[str, Any]]) -> None:
        self.data["ceilings"] = {"matmul_flops": ceilings.matmul_flops, "copy_bandwidth": ceilings.copy_bandwidth}
        self.data["measurements"].extend(entries)
        self.write()

    def add(self, entry: dict[str, Any]) -> None:
        self.data["measurements"].append(entry)
        self.write()

    def finish(self, status: str, cases_not_run: int = 0) -> None:
        self.data["status"] = status
        self.data["cases_not_run"] = cases_not_run
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole or not at all (a run killed mid-write leaves the previous version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


REQUIRED = ("schema", "performance_numbers", "status", "environment", "ceilings", "measurements")
REQUIRED_ENV = ("device_name", "sm_count", "memory_bytes", "torch", "triton", "cuda", "git_commit", "date")


def validate(data: dict[str, Any]) -> None:
    """Raise ValueError when ``data`` is not a results file this code understands."""
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"not a phaseattn results file: missing {missing}")
    if data["schema"] != SCHEMA:
        raise ValueError(f"results schema {data['schema']!r}, expected {SCHEMA!r}")
    missing = [k for k in REQUIRED_ENV if k not in data["environment"]]
    if missing:
        raise ValueError(f"results environment lacks {missing}")
    for m in data["measurements"]:
        for k in ("phase", "contender", "kind", "shape", "flops", "bytes", "status"):
            if k not in m:
                raise ValueError(f"measurement lacks {k!r}: {m}")
        if m["status"] == "ok" and not (m.get("time_ms") or 0) > 0:
            raise ValueError(f"measurement marked ok without a positive time: {m}")


def load(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    validate(data)
    return data


def ceilings_of(data: dict[str, Any]) -> Ceilings | None:
    c = data.get("ceilings")
    return Ceilings(c["matmul_flops"], c["copy_bandwidth"]) if c else None


def shape_label(phase: str, shape: dict[str, Any]) -> str:
    """A short readable name for a shape."""
    heads = f"{shape.get('q_heads')}/{shape.get('kv_heads')}"
    if phase == "prefill":
        mask = "causal" if shape["causal"] else "full"
        return f"S={shape['seqlen']} B={shape['batch']} d{shape['head_dim']} {heads} {mask}"
    if phase == "decode":
        return (
            f"B={shape['batch']} ctx={shape['context']} d{shape['head_dim']} {heads} "
            f"page{shape['page_size']} {shape['kv_dtype']}"
        )
    if phase == "extend":
        return (
            f"B={shape['batch']} prefix={shape['prefix']} new={shape['new']} d{shape['head_dim']} {heads} "
            f"page{shape['page_size']}"
        )
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(data: dict[str, Any]) -> str:
    """All measurements, grouped by shape, one row per contender; 'ours x' is the peer's time over ours
    (above 1: ours is faster)."""
    lines = []
    if not data["performance_numbers"]:
        lines += [data["notice"], ""]
    env = data["environment"]
    lines.append(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}")
    lines.append(f"commit: {env['git_commit']}{' (dirty)' if env.get('git_dirty') else ''}  date: {env['date']}")
    if data["ceilings"]:
        c = data["ceilings"]
        lines.append(
            f"ceilings: bf16 matmul {c['matmul_flops'] / 1e12:.1f} TFLOP/s, copy {c['copy_bandwidth'] / 1e9:.0f} GB/s"
        )
    header = f"{'contender':<30} {'time us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'%mm':>5} {'%copy':>5} {'ours x':>6}  err"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in data["measurements"]:
        if m["phase"] == "ceiling":
            continue
        groups.setdefault((m["phase"], shape_label(m["phase"], m["shape"])), []).append(m)
    for (phase, label), rows in groups.items():
        lines += ["", f"{phase} {label}", header]
        ours = next((r for r in rows if r["kind"] == "ours" and r["status"] == "ok"), None)
        for r in rows:
            name = r["contender"]
            if r["status"] != "ok":
                lines.append(f"{name:<30} {clip(r['status'], 90)}")
                continue
            ratio = r["time_ms"] / ours["time_ms"] if ours else None
            lines.append(
                f"{name:<30} {r['time_ms'] * 1e3:>10.1f} {r['tflops']:>8.1f} {r['gbps']:>8.0f} "
                f"{_fmt(_pct(r.get('frac_matmul')), '>5.0f')} {_fmt(_pct(r.get('frac_copy')), '>5.0f')} "
                f"{_fmt(ratio, '>6.2f')}  {_fmt(r.get('max_rel_err'), '.1e')}"
            )
    return "\n".join(lines)


def _pct(frac: float | None) -> float | None:
    return None if frac is None else 100 * frac


def headline_summary(data: dict[str, Any]) -> str:
    """One line per headline shape: our rate, its fraction of the ceiling, and ours against the best peer."""
    lines = ["headline shapes (ours / best peer: time of the fastest peer over ours; above 1 = ours faster):"]
    if not data["performance_numbers"]:
        lines.insert(0, "NOT PERFORMANCE NUMBERS (smoke run)")
    seen = []
    for m in data["measurements"]:
        if m.get("tier") == "headline" and m["kind"] == "ours":
            seen.append(m)
    for ours in seen:
        label = shape_label(ours["phase"], ours["shape"])
        if ours["status"] != "ok":
            lines.append(f"  {ours['phase']} {label}: {ours['status']}")
            continue
        peers = [
            m
            for m in data["measurements"]
            if m["kind"] == "peer"
            and m["status"] == "ok"
            and m["phase"] == ours["phase"]
            and m["shape"] == ours["shape"]
            and not m.get("includes_gather")
        ]
        best = min(peers, key=lambda m: m["time_ms"], default=None)
        if ours["phase"] == "prefill" or (ours["phase"] == "extend" and ours["shape"]["new"] > 16):
            rate = f"{ours['tflops']:.0f} TFLOP/s = {_fmt(_pct(ours.get('frac_matmul')), '.0f')}% of matmul"
        else:
            rate = f"{ours['gbps']:.0f} GB/s = {_fmt(_pct(ours.get('frac_copy')), '.0f')}% of copy"
        vs = f"{best['time_ms'] / ours['time_ms']:.2f}x vs {best['contender']}" if best else "no peer measured"
        lines.append(f"  {ours['phase']} {label}: {rate}; {vs}")
    return "\n".join(lines)


def roofline_points(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every timed kernel of a results file as a roofline point: intensity (FLOP/byte) and achieved FLOP/s.
    Smoke files give no points: their numbers are not performance numbers."""
    if not data["performance_numbers"]:
        return []
    points = []
    for m in data["measurements"]:
        if m["phase"] in ("prefill", "decode") and m["status"] == "ok" and m["flops"] > 0:
            points.append(
                {
                    "phase": m["phase"],
                    "contender": m["contender"],
                    "kind": m["kind"],
                    "label": shape_label(m["phase"], m["shape"]),
                    "intensity": roofline.intensity(m["flops"], m["bytes"]),
                    "flops_per_s": m["flops"] / (m["time_ms"] * 1e-3),
                    "device": data["environment"]["device_name"],
                }
            )
    return points
