"""What a simulation measured, per request and overall, and how it is judged against latency targets.

- TTFT (time to first token) = first token − arrival: queueing + prefill (the first token comes out of prefill).
- TPOT (time per output token) = (finish − first token) / (output − 1): everything after the first token, KV
  transfer and decode queueing included, spread over the remaining tokens (undefined for one-token outputs, which
  then meet any TPOT target).
- SLO attainment: the fraction of requests meeting both targets (a rejected request meets neither).
- Goodput: requests per second that meet both targets = attainment × the offered rate, the rate estimated from the
  arrivals as (n − 1) / (last − first arrival).
- Cost per million requests: the deployment's hourly price over the goodput it sustains, scaled to 10⁶ requests.
- Throughput: completed requests, and their output and prompt tokens, over the makespan (first arrival to last
  finish) of the whole run, untrimmed: what a throughput benchmark reports.

``trim``: the fraction of requests, at each end of the arrival order, left out of the judgement. A finite run
starts empty (the first requests find no queue) and ends draining (the last ones decode in shrinking batches):
both ends flatter the deployment, and trimming them measures the steady state in between.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds: time to first token and time per output token."""

    ttft: float
    tpot: float

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tpot > 0):
            raise ValueError(f"SLO: ttft and tpot must be > 0, got {self.ttft}, {self.tpot}")


@dataclass(frozen=True)
class InstanceStats:
    role: str
    busy_time: float  # seconds spent running steps
    steps: int
    prefill_tokens: int
    decode_tokens: int
    capacity_pages: int
    min_free_pages: int  # the fullest the KV pool got
    free_pages_at_end: int


@dataclass(frozen=True)
class SimResult:
    """Per-request arrays (seconds; NaN where a request never got that far, i.e. was rejected) and totals."""

    deployment: str
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    rejected: np.ndarray  # bool: its KV could never fit an instance
    in_system: np.ndarray  # requests arrived and unfinished just after each arrival (itself included)
    kv_bytes_sent: float  # over the prefill -> decode link (0 when colocated)
    gpus: int
    hourly_cost: float  # USD
    devices: tuple[str, ...]  # every device's numbers and where they came from
    instances: tuple[InstanceStats, ...]

    @property
    def ttft(self) -> np.ndarray:
        return np.where(self.rejected, np.inf, self.first_token - self.arrival)

    @property
    def tpot(self) -> np.ndarray:
        """NaN for one-token outputs; inf for rejected requests."""
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (self.finish - self.first_token) / (self.output - 1)
        return np.where(self.rejected, np.inf, np.where(self.output > 1, t, np.nan))

    @property
    def offered_rate(self) -> float:
        n = len(self.arrival)
        span = self.arrival[-1] - self.arrival[0] if n else 0.0
        return (n - 1) / span if span > 0 else math.nan

    @property
    def makespan(self) -> float:
        """Seconds from the first arrival to the last finish (0 when nothing finished)."""
        done = np.isfinite(self.finish)
        return float(self.finish[done].max() - self.arrival.min()) if np.any(done) else 0.0

    def utilisation(self, role: str | None = None) -> float:
        """Mean fraction of the run (to the last finish) that instances (of ``role``) spent running steps."""
        busy = [i.busy_time for i in self.instances if role is None or i.role == role]
        return float(np.mean(busy)) / self.makespan if busy and self.makespan > 0 else 0.0


@dataclass(frozen=True)
class Throughput:
    """What a run served over its makespan (first arrival to last finish), counting completed requests only."""

    output_tokens_per_s: float
    prompt_tokens_per_s: float
    requests_per_s: float
    makespan_s: float


def throughput(result: SimResult) -> Throughput:
    """Completed requests, their output and prompt tokens, each over the makespan: what a throughput benchmark
    reports (trtllm-bench's total output throughput, vLLM's benchmark_throughput). 0 when nothing completed."""
    done = np.isfinite(result.finish) & ~result.rejected
    span = result.makespan
    if span <= 0:
        return Throughput(0.0, 0.0, 0.0, span)
    return Throughput(
        output_tokens_per_s=float(result.output[done].sum()) / span,
        prompt_tokens_per_s=float(result.prompt[done].sum()) / span,
        requests_per_s=float(done.sum()) / span,
        makespan_s=span,
    )


def judged(n: int, trim: float) -> slice:
    """The requests (in arrival order) that count once ``trim`` of them is left out at each end."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim: must be in [0, 0.5), got {trim}")
    cut = int(n * trim)
    return slice(cut, n - cut)


def met(result: SimResult, slo: SLO) -> np.ndarray:
    """Per request: did it meet both targets?"""
    tpot = result.tpot
    return (result.ttft <= slo.ttft) & (np.isnan(tpot) | (tpot <= slo.tpot))


def attainment(result: SimResult, slo: SLO, trim: float = 0.0) -> float:
    ok = met(result, slo)[judged(len(result.arrival), trim)]
    return float(np.mean(ok)) if len(ok) else math.nan


def goodput(result: SimResult, slo: SLO, trim: float = 0.0) -> float:
    return attainment(result, slo, trim) * result.offered_rate


def cost_per_million(hourly_cost: float, rate: float) -> float:
    """USD per 10⁶ requests for a deployment costing ``hourly_cost`` USD/h that serves ``rate`` requests/s."""
    return hourly_cost / (rate * 3600) * 1e6 if rate > 0 else math.inf


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile (0-100) ignoring NaN (undefined TPOTs); inf counts (rejected requests)."""
    v = values[~np.isnan(values)]
    return float(np.percentile(v, q)) if len(v) else math.nan


def meets_percentiles(result: SimResult, slo: SLO, q: float = 90) -> bool:
    """The percentile form of an SLO: the q-th percentile TTFT and TPOT are each within target."""
    return percentile(result.ttft, q) <= slo.ttft and percentile(result.tpot, q) <= slo.tpot


@dataclass(frozen=True)
class Summary:
    deployment: str
    requests: int  # judged
    rejected: int
    offered_rate: float
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    goodput: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    gpus: int
    hourly_cost: float
    cost_per_million: float  # per request within SLO: hourly cost over goodput
    kv_bytes_sent: float
    output_tokens_per_s: float  # over the whole run, completed requests (see ``throughput``)
    prompt_tokens_per_s: float
    requests_per_s: float
    makespan_s: float
    devices: tuple[str, ...]

    def table(self) -> str:
        ms = lambda s: f"{s * 1e3:.1f} ms"
        return "\n".join(
            [
                self.deployment,
                f"  requests {self.requests} ({self.rejected} rejected) at {self.offered_rate:.2f} req/s; "
                f"{self.gpus} GPUs, ${self.hourly_cost:.2f}/h",
                f"  SLO attainment {self.attainment:.1%} (TTFT {self.ttft_attainment:.1%}, TPOT "
                f"{self.tpot_attainment:.1%}); goodput {self.goodput:.2f} req/s, "
                f"${self.cost_per_million:.2f} per million requests within SLO",
                f"  TTFT p50/p90/p99 {ms(self.ttft_p50)} / {ms(self.ttft_p90)} / {ms(self.ttft_p99)}",
                f"  TPOT p50/p90/p99 {ms(self.tpot_p50)} / {ms(self.tpot_p90)} / {ms(self.tpot_p99)}",
                f"  throughput {self.output_tokens_per_s:,.0f} output tokens/s, {self.prompt_tokens_per_s:,.0f} prompt "
                f"tokens/s, {self.requests_per_s:.2f} requests/s over a makespan of {self.makespan_s:.1f} s",
                f"  KV sent {self.kv_bytes_sent / 1e9:.1f} GB",
                *(f"  device {d}" for d in self.devices),
            ]
        )


def summarize(result: SimResult, slo: SLO, trim: float = 0.0) -> Summary:
    """Latency percentiles and SLO figures over the judged requests (all but ``trim`` at each end)."""
    window = judged(len(result.arrival), trim)
    ttft, tpot = result.ttft[window], result.tpot[window]
    good = goodput(result, slo, trim)
    return Summary(
        deployment=result.deployment,
        requests=len(ttft),
        rejected=int(result.rejected[window].sum()),
        offered_rate=result.offered_rate,
        attainment=attainment(result, slo, trim),
        ttft_attainment=float(np.mean(ttft <= slo.ttft)),
        tpot_attainment=float(np.mean(np.isnan(tpot) | (tpot <= slo.tpot))),
        goodput=good,
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99),
        tpot_p50=percentile(tpot, 50),
        tpot_p90=percentile(tpot, 90),
        tpot_p99=percentile(tpot, 99),
        gpus=result.gpus,
        hourly_cost=result.hourly_cost,
        cost_per_million=cost_per_million(result.hourly_cost, good),
        kv_bytes_sent=result.kv_bytes_sent,
        **dataclasses.asdict(throughput(result)),
        devices=result.devices,
    )
