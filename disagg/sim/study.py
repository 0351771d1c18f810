"""The experiments of ``notebooks/disaggregation.ipynb``, as functions: one model, one traffic mix, one question.

``Scenario`` fixes the model, the traffic, the SLOs, the target rate and attainment, the hardware on offer and the
link; its methods answer, each with a handful of small simulations:

- ``curves``: SLO attainment and goodput against the request rate, for deployments of the same GPU count;
- ``max_rate``: the highest rate a deployment sustains at the target attainment (its goodput, DistServe-style);
- ``compare``: the cheapest colocated and disaggregated deployments at the target rate, with the P:D frontier;
- ``length_ratios`` / ``links``: how that comparison moves with the prompt:output length ratio and the link;
- ``conclusion``: the findings as sentences, written from those numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from disagg.roofline import ModelShape
from disagg.sim.cluster import Colocated, Deployment, Disaggregated, Serving
from disagg.sim.devices import DEFAULT, Device
from disagg.sim.engine import simulate
from disagg.sim.links import Link
from disagg.sim.metrics import SLO, Summary, summarize
from disagg.sim.search import InstanceType, Plan, Search, Target, requests_for
from disagg.sim.validate import Validation
from disagg.sim.workload import LogNormal, Workload


@dataclass(frozen=True)
class Comparison:
    """The cheapest plan of each deployment at one target, and the disaggregated P:D frontier behind its plan."""

    colocated: Plan | None
    disaggregated: Plan | None
    frontier: list[Plan]
    simulations: int

    @property
    def disaggregated_over_colocated(self) -> float | None:
        """Cost of the disaggregated plan over the colocated one (below 1: disaggregation is cheaper)."""
        if self.colocated is None or self.disaggregated is None:
            return None
        return self.disaggregated.cost_per_million / self.colocated.cost_per_million


@dataclass(frozen=True)
class Scenario:
    model: ModelShape
    workload: Workload  # its rate is ignored: each experiment sets its own
    slo: SLO
    rate: float  # the target, requests/s
    kinds: tuple[InstanceType, ...]  # (device, tp) on offer, for both deployments
    link: Link
    attainment: float = 0.9
    serving: Serving = field(default_factory=Serving)
    n_requests: int | None = None  # None: sized to the target (search.requests_for)
    seed: int = 0
    max_instances: int = 64
    trim: float = 0.1  # judge the steady state: see metrics

    @property
    def target(self) -> Target:
        return Target(self.rate, self.slo, self.attainment)

    def run(self, deployment: Deployment, rate: float) -> Summary:
        n = self.n_requests or requests_for(self.workload, self.target)
        requests = self.workload.with_rate(rate).generate(n, self.seed)
        return summarize(simulate(deployment, requests, self.model, self.serving), self.slo, self.trim)

    def curves(self, deployments: list[Deployment], rates: list[float]) -> dict[Deployment, list[Summary]]:
        return {d: [self.run(d, r) for r in rates] for d in deployments}

    def max_rate(self, deployment: Deployment, rel_tol: float = 0.03) -> float:
        """The highest rate (to ``rel_tol``) at which ``deployment`` meets the attainment: doubling, then bisection.
        0 when it misses even at 1/64 request per second."""
        lo, hi = 0.0, 1.0
        while self.run(deployment, hi).attainment >= self.attainment:
            lo, hi = hi, 2 * hi
        while lo == 0.0 and hi > 1 / 64:
            hi /= 2
            if self.run(deployment, hi).attainment >= self.attainment:
                lo, hi = hi, 2 * hi
        if lo == 0.0:
            return 0.0
        while hi - lo > rel_tol * lo:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.run(deployment, mid).attainment >= self.attainment else (lo, mid)
        return lo

    def search(self, workload: Workload | None = None) -> Search:
        return Search(self.model, workload or self.workload, self.target, self.serving, self.n_requests, self.seed,
                      self.max_instances, self.trim)  # fmt: skip

    def compare(self, workload: Workload | None = None, link: Link | None = None, extend: int = 0) -> Comparison:
        """The cheapest colocated and disaggregated deployments over ``kinds`` (optionally for another workload or
        link), and the P:D frontier of the disaggregated plan's device pair (``extend``: see
        ``Search.disaggregated_frontier``)."""
        s = self.search(workload)
        link = link or self.link
        colocated = s.colocated(self.kinds)
        disaggregated = s.disaggregated(self.kinds, self.kinds, link)
        frontier = []
        if disaggregated is not None:
            d = disaggregated.deployment
            pair = (d.prefill.device, d.prefill.tp), (d.decode.device, d.decode.tp)
            frontier = s.disaggregated_frontier(*pair, link, extend)
        return Comparison(colocated, disaggregated, frontier, len(s.trials))

    def length_ratios(self, ratios: list[float], total: float, sigma: float = 0.8) -> list[Comparison]:
        """``compare`` with lognormal prompt and output lengths of mean prompt:output = ratio and mean prompt +
        output = ``total`` tokens, for each ratio."""
        out = []
        for r in ratios:
            prompt, output = total * r / (1 + r), total / (1 + r)
            wl = Workload(self.workload.arrivals, LogNormal(max(1.0, prompt), sigma, high=int(8 * total)),
                          LogNormal(max(2.0, output), sigma, low=2, high=int(8 * total)))  # fmt: skip
            out.append(self.compare(workload=wl))
        return out

    def links(self, links: list[Link]) -> list[Plan | None]:
        """The cheapest disaggregated deployment over each link."""
        s = self.search()
        return [s.disaggregated(self.kinds, self.kinds, link) for link in links]

    def with_(self, **changes) -> Scenario:
        return dataclasses.replace(self, **changes)


def describe_devices(devices: list[Device]) -> str:
    """Whether the costs rest on measured or default numbers, in one sentence."""
    measured = [d.name for d in devices if d.provenance.ceilings != DEFAULT]
    if not measured:
        return (
            "Every device number here is a stated default (datasheet ceilings derated, default kernel "
            "efficiencies): default, not measured. Run `python -m bench` on the GPUs and pass the results to calibrate."
        )
    return f"Ceilings measured by bench for {', '.join(measured)}; see each device's line for what is still default."


def verdict(comparison: Comparison, kinds: tuple[InstanceType, ...]) -> str | None:
    """ "cheaper", "dearer" or "within one instance" (disaggregated against colocated), or None when either has no
    plan. The resolution of the answer is one instance of the cheapest kind on offer, as a share of the colocated
    cost: a smaller difference is one instance more or less, not a verdict."""
    ratio = comparison.disaggregated_over_colocated
    if ratio is None:
        return None
    resolution = min(k[0].price_per_hour * k[1] for k in kinds) / comparison.colocated.deployment.hourly_cost
    return "cheaper" if ratio < 1 - resolution else "dearer" if ratio > 1 + resolution else "within one instance"


def conclusion(
    scenario: Scenario,
    comparison: Comparison,
    ratios: list[float],
    ratio_comparisons: list[Comparison],
    links: list[Link],
    link_plans: list[Plan | None],
    sensitivity: Scenario | None = None,
    goodputs: dict[Deployment, float] | None = None,
    validation: Validation | None = None,
) -> str:
    """The findings as a few sentences of Markdown, every number taken from the results passed in (``sensitivity``:
    the scenario the ratio and link sweeps ran on, when not ``scenario``; ``goodputs``: ``max_rate`` of some
    deployments; ``validation``: how far the simulator's throughput is from a published table, stated beside the
    cost ratio so the reader can weigh one against the other)."""
    c, d = comparison.colocated, comparison.disaggregated
    wl_prompt, wl_output = scenario.workload.mean_lengths()
    lines = [
        f"**{scenario.model.name}**, prompts ~{wl_prompt:.0f} and outputs ~{wl_output:.0f} tokens, "
        f"{scenario.rate:g} req/s with {scenario.attainment:.0%} of requests within TTFT {scenario.slo.ttft * 1e3:.0f} "
        f"ms and TPOT {scenario.slo.tpot * 1e3:.0f} ms."
    ]
    if goodputs:
        best = {
            kind: max(
                ((r / dep.gpus, dep) for dep, r in goodputs.items() if isinstance(dep, cls)),
                key=lambda x: x[0],
                default=None,
            )
            for kind, cls in (("colocated", Colocated), ("disaggregated", Disaggregated))
        }
        if all(best.values()):
            (rc, dc), (rd, dd) = best["colocated"], best["disaggregated"]
            lines.append(
                f"Per GPU, the best colocated deployment tried ({dc.describe()}) sustains {rc:.1f} req/s at the "
                f"target attainment and the best disaggregated split ({dd.describe()}) {rd:.1f} req/s: "
                f"{rd / rc:.2f}× the goodput per GPU."
            )
    if c is None or d is None:
        missing = "colocated" if c is None else "disaggregated"
        lines.append(f"No {missing} deployment of up to {scenario.max_instances} instances meets the target.")
        return "\n\n".join(lines)
    ratio = comparison.disaggregated_over_colocated
    found = verdict(comparison, scenario.kinds)
    text = {
        "cheaper": f"disaggregation **pays**: it costs {ratio:.2f}× what colocation does",
        "dearer": f"disaggregation **does not pay**: it costs {ratio:.2f}× what colocation does",
        "within one instance": f"**neither is clearly cheaper**: {ratio:.2f}×, within one instance of each other",
    }[found]
    trust = ""
    if validation is not None:
        trust = (
            f" (the cost model behind it predicts a published serving-throughput table to within "
            f"{validation.median_abs_error:.0%} median and {validation.max_abs_error:.0%} max error: "
            f"`python -m disagg.sim validate`)"
        )
    lines.append(
        f"The cheapest colocated deployment is {c.deployment.describe()} at ${c.cost_per_million:.2f} per million "
        f"requests; the cheapest disaggregated one is {d.deployment.describe()} at ${d.cost_per_million:.2f}: "
        f"{text}{trust}."
    )
    p, q = d.deployment.prefill, d.deployment.decode
    lines.append(
        f"The cost-optimal split is {p.count}:{q.count} prefill:decode instances ({p.gpus}:{q.gpus} GPUs; "
        f"{len(comparison.frontier)} prefill counts tried, each with the fewest decode instances that meet the target)."
    )
    groups: dict[str | None, list[str]] = {"cheaper": [], "dearer": [], "within one instance": [], None: []}
    swept = sensitivity or scenario
    for r, cmp in zip(ratios, ratio_comparisons, strict=True):
        x = cmp.disaggregated_over_colocated
        groups[verdict(cmp, swept.kinds)].append(f"{r:g}:1" + (f" ({x:.2f}×)" if x is not None else ""))
    on = f"{', '.join(k[0].name for k in swept.kinds)} only; " if swept.kinds != scenario.kinds else ""
    text = f"Over prompt:output length ratios ({on}mean prompt + output held fixed), disaggregation is " + "; ".join(
        f"{key} at {', '.join(groups[key])}" for key in ("cheaper", "dearer", "within one instance") if groups[key]
    )
    if groups[None]:
        text += f"; at {', '.join(groups[None])} one deployment cannot meet the target"
    lines.append(text + ".")
    priced = [(link, plan) for link, plan in zip(links, link_plans, strict=True) if plan is not None]
    if priced:
        best = min(plan.cost_per_million for _, plan in priced)
        worse = [link for link, plan in priced if plan.cost_per_million > 1.005 * best]
        unmet = [link.name for link, plan in zip(links, link_plans, strict=True) if plan is None]
        text = (
            f"Over links ({on}the cheapest disaggregated deployment per link), "
            f"the cost is lowest (${best:.2f}) at "
            f"{', '.join(link.name for link, plan in priced if plan.cost_per_million <= 1.005 * best)}"
        )
        if worse:
            text += f"; it rises over {', '.join(f'{x.name} ({x.bandwidth / 1e9:g} GB/s)' for x in worse)}"
        if unmet:
            text += f"; no deployment meets the target over {', '.join(unmet)}"
        lines.append(text + ".")
    lines.append(describe_devices([k[0] for k in scenario.kinds]))
    return "\n\n".join(lines)
