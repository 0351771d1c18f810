"""Request streams: when requests arrive and how long their prompts and outputs are.

A ``Workload`` draws ``Requests`` (three arrays, one entry per request) from an arrival process and two length
distributions, or from a trace of (prompt, output) length pairs. Draws are seeded and independent per stream:
the same seed gives the same lengths at every rate, and arrival times that only scale with 1/rate, so curves over
the request rate compare like with like (common random numbers).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class LengthDist(Protocol):
    """A distribution of token counts (>= 1)."""

    @property
    def mean(self) -> float: ...

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Fixed:
    value: int

    def __post_init__(self) -> None:
        _positive_int("value", self.value)

    @property
    def mean(self) -> float:
        return float(self.value)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    """Integers uniform on [low, high], both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _positive_int("low", self.low)
        if self.high < self.low:
            raise ValueError(f"high: must be >= low ({self.low}), got {self.high}")

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)


@dataclass(frozen=True)
class LogNormal:
    """A lognormal with the given ``mean`` and log-space ``sigma``, rounded and clipped to [low, high]: the heavy
    right tail that real prompt and output lengths show. ``mean`` is that of the distribution before rounding and
    clipping."""

    mean: float
    sigma: float
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        if not self.mean >= 1:
            raise ValueError(f"mean: must be >= 1, got {self.mean}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma: must be >= 0, got {self.sigma}")
        _positive_int("low", self.low)
        if self.high is not None and self.high < self.low:
            raise ValueError(f"high: must be >= low ({self.low}), got {self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma**2 / 2
        x = np.rint(rng.lognormal(mu, self.sigma, size=n))
        return np.clip(x, self.low, self.high if self.high is not None else np.inf).astype(np.int64)


def length_dist(spec: str) -> Fixed | Uniform | LogNormal:
    """Parse ``fixed:N``, ``uniform:LOW,HIGH`` or ``lognormal:MEAN,SIGMA[,MAX]`` (the length syntax of every
    command line that draws lengths: ``python -m disagg.sim`` and ``python -m disagg compare``); an argparse type."""
    kind, _, args = spec.partition(":")
    try:
        values = [float(v) for v in args.split(",")] if args else []
        if kind == "fixed" and len(values) == 1:
            return Fixed(int(values[0]))
        if kind == "uniform" and len(values) == 2:
            return Uniform(int(values[0]), int(values[1]))
        if kind == "lognormal" and len(values) in (2, 3):
            return LogNormal(values[0], values[1], high=int(values[2]) if len(values) == 3 else None)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e}") from None
    raise argparse.ArgumentTypeError(f"{spec!r}: expected fixed:N, uniform:LOW,HIGH or lognormal:MEAN,SIGMA[,MAX]")


@dataclass(frozen=True)
class Poisson:
    """Exponential inter-arrival times at ``rate`` requests per second."""

    rate: float

    def __post_init__(self) -> None:
        _positive("rate", self.rate)

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0, size=n) / self.rate


@dataclass(frozen=True)
class Bursty:
    """Gamma inter-arrival times at ``rate`` requests per second with coefficient of variation ``cv`` (> 1: bursts
    and lulls; 1 is Poisson). The same knob as the ``--burstiness`` of vLLM's serving benchmark (= 1/cv²)."""

    rate: float
    cv: float

    def __post_init__(self) -> None:
        _positive("rate", self.rate)
        _positive("cv", self.cv)

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / shape, size=n) / self.rate


@dataclass(frozen=True)
class TraceLengths:
    """(prompt, output) length pairs of a trace, drawn jointly (with replacement) so that their correlation holds."""

    prompt: tuple[int, ...]
    output: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.prompt) != len(self.output) or not self.prompt:
            raise ValueError(f"trace: needs equally many prompt and output lengths, at least one; got "
                             f"{len(self.prompt)} and {len(self.output)}")  # fmt: skip
        if min(self.prompt) < 1 or min(self.output) < 1:
            raise ValueError("trace: lengths must be >= 1")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TraceLengths:
        """Read a CSV (a header naming the columns, e.g. ``prompt_len,output_len`` or the Azure LLM trace's
        ``ContextTokens,GeneratedTokens``; or two bare integer columns) or a JSON file (a list of objects with such
        keys, or an object of two lists)."""
        path = os.fspath(path)
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            doc = json.loads(text)
            rows = [doc] if isinstance(doc, dict) else doc
            if isinstance(doc, dict):
                p, o = _pick_columns(list(doc), path)
                return cls(tuple(map(int, doc[p])), tuple(map(int, doc[o])))
            p, o = _pick_columns(list(rows[0]), path)
            return cls(tuple(int(r[p]) for r in rows), tuple(int(r[o]) for r in rows))
        rows = [r for r in csv.reader(text.splitlines()) if r]
        if rows and not rows[0][0].strip().lstrip("-").isdigit():
            p, o = _pick_columns(rows[0], path)
            pi, oi = rows[0].index(p), rows[0].index(o)
            rows = rows[1:]
        else:
            pi, oi = 0, 1
        return cls(tuple(int(r[pi]) for r in rows), tuple(int(r[oi]) for r in rows))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.prompt), size=n)
        return np.asarray(self.prompt, dtype=np.int64)[idx], np.asarray(self.output, dtype=np.int64)[idx]


@dataclass(frozen=True)
class Requests:
    """The simulator's input: per request its ``arrival`` time (s, non-decreasing), ``prompt`` and ``output``
    token counts (>= 1; the output counts the first token, which prefill produces)."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrival)
        if len(self.prompt) != n or len(self.output) != n:
            raise ValueError("requests: arrival, prompt and output must have one entry per request")
        if n and (np.any(np.diff(self.arrival) < 0) or not np.all(np.isfinite(self.arrival))):
            raise ValueError("arrival: must be finite and non-decreasing")
        if n and (self.prompt.min() < 1 or self.output.min() < 1):
            raise ValueError("prompt, output: lengths must be >= 1")

    def __len__(self) -> int:
        return len(self.arrival)


@dataclass(frozen=True)
class Workload:
    """An arrival process with either two length distributions (``prompt``, ``output``) or a ``trace``."""

    arrivals: Poisson | Bursty
    prompt: LengthDist | None = None
    output: LengthDist | None = None
    trace: TraceLengths | None = None

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.prompt is None or self.output is None):
            raise ValueError("workload: give either prompt and output distributions or a trace, not both")

    @property
    def rate(self) -> float:
        return self.arrivals.rate

    def with_rate(self, rate: float) -> Workload:
        return dataclasses.replace(self, arrivals=dataclasses.replace(self.arrivals, rate=rate))

    def mean_lengths(self) -> tuple[float, float]:
        """Mean prompt and output lengths (of the distributions before clipping, or of the trace)."""
        if self.trace is not None:
            return float(np.mean(self.trace.prompt)), float(np.mean(self.trace.output))
        return self.prompt.mean, self.output.mean

    def generate(self, n: int, seed: int = 0) -> Requests:
        """``n`` requests, the first arriving one gap after time 0."""
        _positive_int("n", n)
        s_arrival, s_prompt, s_output = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        arrival = np.cumsum(self.arrivals.gaps(s_arrival, n))
        if self.trace is not None:
            prompt, output = self.trace.sample(s_prompt, n)
        else:
            prompt, output = self.prompt.sample(s_prompt, n), self.output.sample(s_output, n)
        return Requests(arrival, prompt, output)


_PROMPT_COLUMNS = ("prompt_len", "prompt_tokens", "input_len", "input_tokens", "contexttokens", "context_tokens",
                   "prompt", "input")  # fmt: skip
_OUTPUT_COLUMNS = ("output_len", "output_tokens", "generatedtokens", "generated_tokens", "completion_tokens",
                   "output")  # fmt: skip


def _pick_columns(names: list[str], path: str) -> tuple[str, str]:
    lower = {n.strip().lower(): n for n in names}
    p = next((lower[c] for c in _PROMPT_COLUMNS if c in lower), None)
    o = next((lower[c] for c in _OUTPUT_COLUMNS if c in lower), None)
    if p is None or o is None:
        raise ValueError(f"trace: {path}: no prompt/output length columns among {names}")
    return p, o


def _positive(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
        raise ValueError(f"{name}: must be a positive finite number, got {v!r}")


def _positive_int(name: str, v: int) -> None:
    if not (isinstance(v, (int, np.integer)) and v >= 1):
        raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
