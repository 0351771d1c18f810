"""The cheapest deployment that serves a target request rate within the latency targets.

A deployment *meets* a ``Target`` when, serving a stream at ``rate`` requests/s, at least ``attainment`` of the
requests meet both SLOs (DistServe's definition of goodput: the highest rate a deployment sustains at that
attainment). Every candidate serves the very same requests (one draw of the workload at the target rate), so
candidates differ only in how they serve them.

The search per instance type is a doubling-then-bisection on instance counts from a lower bound no deployment can
beat (the compute and weight-read time every request needs, at the best batching memory allows); for the
disaggregated deployment it walks the prefill count upward, finding the fewest decode instances for each, until
more prefill instances alone cost more than the best plan found. Attainment is taken as monotone in the instance
counts, as it is up to simulation noise.

Cost per million requests = the deployment's hourly price / (rate × 3600) × 10⁶: what serving the target rate
costs, per request served.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from disagg.roofline import ModelShape
from disagg.sim.cluster import Colocated, Deployment, Disaggregated, Policy, Pool, Serving
from disagg.sim.costs import StepCost
from disagg.sim.devices import Device
from disagg.sim.engine import simulate
from disagg.sim.links import Link
from disagg.sim.metrics import SLO, Summary, cost_per_million, summarize
from disagg.sim.workload import Workload

InstanceType = tuple[Device, int]  # (device, tensor-parallel size)


@dataclass(frozen=True)
class Target:
    """Serve ``rate`` requests/s with at least ``attainment`` of them meeting ``slo``."""

    rate: float
    slo: SLO
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment: must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True)
class Plan:
    deployment: Deployment
    summary: Summary
    cost_per_million: float  # USD per 10⁶ requests at the target rate


@dataclass
class Search:
    """Simulates candidates against one draw of the workload at the target rate, remembering every trial."""

    model: ModelShape
    workload: Workload
    target: Target
    serving: Serving = field(default_factory=Serving)
    n_requests: int | None = None  # None: enough for five request lifetimes at the SLOs (see requests_for)
    seed: int = 0
    max_instances: int = 512  # per pool: beyond it a candidate is given up
    trim: float = 0.1  # judge the steady state: see metrics
    trials: dict[Deployment, Summary] = field(default_factory=dict)
    on_trial: Callable[[Deployment, Summary, bool], None] | None = None  # called after each new simulation

    def __post_init__(self) -> None:
        n = self.n_requests or requests_for(self.workload, self.target)
        self.requests = self.workload.with_rate(self.target.rate).generate(n, self.seed)

    def evaluate(self, deployment: Deployment) -> Summary:
        if deployment not in self.trials:
            result = simulate(deployment, self.requests, self.model, self.serving)
            self.trials[deployment] = summarize(result, self.target.slo, self.trim)
            if self.on_trial is not None:
                self.on_trial(deployment, self.trials[deployment], self.meets(deployment))
        return self.trials[deployment]

    def best_so_far(self, kind: type) -> Plan | None:
        """The cheapest deployment of class ``kind`` (``Colocated`` or ``Disaggregated``) among those simulated so
        far that meets the target: what an interrupted search has found."""
        plans = [
            Plan(d, s, cost_per_million(d.hourly_cost, self.target.rate))
            for d, s in list(self.trials.items())
            if isinstance(d, kind) and s.attainment >= self.target.attainment
        ]
        return min(plans, key=_rank, default=None)

    def meets(self, deployment: Deployment) -> bool:
        return self.evaluate(deployment).attainment >= self.target.attainment

    def plan(self, deployment: Deployment) -> Plan:
        return Plan(deployment, self.evaluate(deployment), cost_per_million(deployment.hourly_cost, self.target.rate))

    def _cost(self, kind: InstanceType) -> StepCost:
        return self.serving.cost(self.model, kind[0], kind[1])

    def _fits(self, kind: InstanceType) -> bool:
        return self.serving.kv_capacity_tokens(self._cost(kind)) >= self.serving.page_size

    def lower_bounds(self, kind: InstanceType) -> tuple[int, int]:
        """Instances of ``kind`` that prefilling alone, and decoding alone, need at the least: the target rate times
        the mean work of the simulated requests at a speed no schedule can beat. Prefill: its GEMM and attention
        FLOPs at the compute roofs. Decode, per token: the larger of its GEMM FLOPs and its share of one weight read
        at the largest batch memory allows, plus its context's KV bytes at the bandwidth roof."""
        cost, s, model = self._cost(kind), self.serving, self.model
        prompt, output = self.requests.prompt.tolist(), self.requests.output.tolist()
        n = len(prompt)
        prefill = sum(
            model.gemm_flops(p, logits=1) / cost.gemm_roof.flops
            + model.prefill_attention_flops(p) / cost.prefill_roof.flops
            for p in prompt
        )
        batch = max(
            1,
            min(
                s.max_batch,
                s.kv_capacity_tokens(cost) // min(p + o for p, o in zip(prompt, output, strict=True)),
            ),
        )
        per_token = max(
            model.gemm_flops(1) / cost.gemm_roof.flops,
            model.gemm_bytes(0, s.dtype_bytes) / cost.gemm_roof.bandwidth / batch,
        )
        # Decode token j of a request reads the K and V of prompt + j tokens.
        contexts = sum((o - 1) * p + o * (o - 1) // 2 for p, o in zip(prompt, output, strict=True))
        kv_per_context_token = model.decode_attention_bytes(1, 1, s.kv_bytes) - model.decode_attention_bytes(
            1, 0, s.kv_bytes
        )
        decode = sum(o - 1 for o in output) * per_token + contexts * kv_per_context_token / cost.decode_roof.bandwidth
        rate = self.target.rate
        return max(1, math.ceil(rate * prefill / n - 1e-9)), max(1, math.ceil(rate * decode / n - 1e-9))

    def fewest(self, make: Callable[[int], Deployment], low: int, high: int | None = None) -> int | None:
        """The smallest count n in [low, high or max_instances] for which ``make(n)`` meets the target."""
        high = min(high or self.max_instances, self.max_instances)
        if low > high:
            return None
        n, failed = low, low - 1
        while not self.meets(make(n)):  # double until it meets
            failed = n
            if n >= high:
                return None
            n = min(2 * n, high)
        while n - failed > 1:  # bisect between the last failure and the first success
            mid = (failed + n) // 2
            if self.meets(make(mid)):
                n = mid
            else:
                failed = mid
        return n

    def colocated(
        self,
        kinds: Iterable[InstanceType],
        policies: Iterable[Policy] = ("prefill-first", "chunked"),
        chunks: Iterable[int | None] = (512, 2048, None),
    ) -> Plan | None:
        """The cheapest colocated deployment over instance types, scheduling policies and (chunked prefill) chunk
        sizes: the baseline tuned as well as the disaggregated deployment is. Ties go to the higher attainment."""
        best: Plan | None = None
        chunks = tuple(chunks)
        for kind in kinds:
            if not self._fits(kind):
                continue
            low = max(self.lower_bounds(kind))
            for policy in policies:
                for chunk in chunks if policy == "chunked" else (None,):
                    make = lambda n, k=kind, p=policy, c=chunk: Colocated(Pool(k[0], n, k[1]), p, c)
                    n = self.fewest(make, low)
                    if n is not None and (best is None or _rank(self.plan(make(n))) < _rank(best)):
                        best = self.plan(make(n))
        return best

    def disaggregated_frontier(
        self, prefill: InstanceType, decode: InstanceType, link: Link, extend: int = 0
    ) -> list[Plan]:
        """For each prefill count from the fewest that can work up, the fewest decode instances that meet the
        target, while adding prefill instances can still lower the cost (and ``extend`` counts more, to show the
        curve past its minimum). The cheapest of these plans is the cost-optimal P:D."""
        if not (self._fits(prefill) and self._fits(decode)):
            return []
        pools = lambda p, d: Disaggregated(Pool(prefill[0], p, prefill[1]), Pool(decode[0], d, decode[1]), link)
        d_low = self.lower_bounds(decode)[1]
        # The fewest prefill instances that meet the target with decode instances to spare (idle ones cost the
        # simulation nothing): below it no decode count helps.
        p_min = self.fewest(lambda p: pools(p, self.max_instances), self.lower_bounds(prefill)[0])
        if p_min is None:
            return []
        p_price = prefill[0].price_per_hour * prefill[1]
        d_price = decode[0].price_per_hour * decode[1]
        plans: list[Plan] = []
        d_high = None
        stop = None  # the prefill count past which no plan can be cheaper
        for p in range(p_min, self.max_instances + 1):
            if stop is None and plans and p * p_price + d_low * d_price >= min(x.deployment.hourly_cost for x in plans):
                stop = p
            if stop is not None and p >= stop + extend:
                break
            d = self.fewest(lambda d, p=p: pools(p, d), d_low, d_high)
            if d is None:
                break
            plans.append(self.plan(pools(p, d)))
            if d == d_low and stop is None:
                stop = p + 1
            d_high = d  # more prefill instances never need more decode instances
        return plans

    def disaggregated(
        self, prefill_kinds: Iterable[InstanceType], decode_kinds: Iterable[InstanceType], link: Link
    ) -> Plan | None:
        """The cheapest disaggregated deployment over pairs of prefill and decode instance types."""
        decode_kinds = list(decode_kinds)
        plans = [
            plan
            for p in prefill_kinds
            for d in decode_kinds
            for plan in self.disaggregated_frontier(p, d, link)
        ]  # fmt: skip
        return min(plans, key=_rank, default=None)


def _rank(plan: Plan) -> tuple[float, float]:
    """Cheaper first; at equal cost, the higher attainment."""
    return plan.deployment.hourly_cost, -plan.summary.attainment


def requests_for(workload: Workload, target: Target, lifetimes: float = 5, low: int = 1000, high: int = 10_000) -> int:
    """How many requests make a run last ``lifetimes`` request lifetimes (TTFT target + mean output × TPOT target),
    within [low, high]: long enough that an overloaded deployment shows it, whether prefill or decode overflows."""
    lifetime = target.slo.ttft + workload.mean_lengths()[1] * target.slo.tpot
    return int(min(high, max(low, math.ceil(target.rate * lifetimes * lifetime))))


def instance_types(
    devices: Iterable[Device], model: ModelShape, tps: Iterable[int] = (1, 2, 4, 8), serving: Serving | None = None
) -> list[InstanceType]:
    """Every (device, tp) in which ``model`` fits with room for at least one KV page, smallest tp per device
    first."""
    serving = serving or Serving()
    out = []
    for dev in devices:
        for tp in sorted(tps):
            if serving.kv_capacity_tokens(serving.cost(model, dev, tp)) >= serving.page_size:
                out.append((dev, tp))
    return out
