"""Command line of the serving simulator.

    python -m disagg.sim simulate [--deployment colocated|disaggregated] [--rate R] ... [--json]
    python -m disagg.sim search --rate R [--devices h100,h200] [--link ib-ndr] ... [--json]

``simulate`` serves one request stream on one deployment and prints its latency and SLO summary; ``search`` finds
the cheapest colocated and the cheapest disaggregated deployment that serve ``--rate`` requests/s with
``--attainment`` of them within the SLOs, and their costs per million requests. ``--bench-results FILE`` (repeat
for several devices) calibrates the devices from ``python -m bench`` results; without it every number is a stated
default and the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from disagg.roofline import LLAMA3_8B, LLAMA3_70B, ModelShape
from disagg.sim.calibration import calibrated_devices
from disagg.sim.cluster import Colocated, Disaggregated, Pool, Serving
from disagg.sim.devices import DATASHEETS, Device
from disagg.sim.engine import simulate
from disagg.sim.links import LINKS, link
from disagg.sim.metrics import SLO, Summary, summarize
from disagg.sim.search import Search, Target, instance_types
from disagg.sim.workload import Bursty, LogNormal, Poisson, TraceLengths, Workload, length_dist

MODELS = {m.name: m for m in (LLAMA3_8B, LLAMA3_70B)}


def model_shape(spec: str) -> ModelShape:
    """A preset name or a Hugging Face config.json (or its folder)."""
    if spec in MODELS:
        return MODELS[spec]
    try:
        return ModelShape.from_hf_config(spec)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: not a preset ({', '.join(MODELS)}) nor a readable config: {e}"
        ) from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m disagg.sim", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model, traffic and targets")
    g.add_argument("--model", type=model_shape, default=LLAMA3_8B, help="llama-3-8b, llama-3-70b or a config.json")
    g.add_argument("--rate", type=float, default=10.0, help="requests per second")
    g.add_argument("--burst-cv", type=float, default=None, help="gamma arrivals with this CV (default: Poisson)")
    g.add_argument("--prompt", type=length_dist, default=LogNormal(1024, 0.8, high=8192))
    g.add_argument("--output", type=length_dist, default=LogNormal(256, 0.8, high=2048))
    g.add_argument("--trace", default=None, help="CSV/JSON of (prompt, output) lengths, instead of --prompt/--output")
    g.add_argument("--requests", type=int, default=None, help="default: 2000 (simulate); sized to the target (search)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ttft", type=float, default=0.5, help="TTFT SLO, seconds")
    g.add_argument("--tpot", type=float, default=0.05, help="TPOT SLO, seconds")
    g.add_argument("--trim", type=float, default=0.1, help="fraction of requests at each end not judged (warm-up)")
    g = common.add_argument_group("hardware and serving")
    g.add_argument("--bench-results", action="append", default=[], help="bench results JSON (repeatable)")
    g.add_argument("--price", action="append", default=[], metavar="DEVICE=USD", help="hourly price per GPU")
    g.add_argument("--link", default="ib-ndr", choices=sorted(LINKS), help="prefill -> decode link")
    for f in dataclasses.fields(Serving):
        g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    g.add_argument("--json", action="store_true", help="print one JSON document")

    s = sub.add_parser("simulate", parents=[common], help="serve one stream on one deployment")
    s.add_argument("--deployment", choices=("colocated", "disaggregated"), default="colocated")
    s.add_argument("--policy", choices=("prefill-first", "chunked"), default="chunked")
    s.add_argument("--device", default="h100", choices=sorted(DATASHEETS), help="colocated instances")
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--instances", type=int, default=1)
    s.add_argument("--prefill-device", default="h100", choices=sorted(DATASHEETS))
    s.add_argument("--prefill-tp", type=int, default=1)
    s.add_argument("--prefill", type=int, default=1, help="prefill instances")
    s.add_argument("--decode-device", default="h100", choices=sorted(DATASHEETS))
    s.add_argument("--decode-tp", type=int, default=1)
    s.add_argument("--decode", type=int, default=1, help="decode instances")

    s = sub.add_parser("search", parents=[common], help="cheapest deployments meeting a goodput target")
    s.add_argument("--attainment", type=float, default=0.9)
    s.add_argument("--devices", default="h100", help="comma-separated presets to consider")
    s.add_argument("--tps", default="1,2,4,8", help="tensor-parallel sizes to consider")
    s.add_argument("--max-instances", type=int, default=256)
    return ap


def devices(args: argparse.Namespace) -> dict[str, Device]:
    out = {key: sheet.device() for key, sheet in DATASHEETS.items()}
    out.update(calibrated_devices(args.bench_results))
    for item in args.price:
        name, _, usd = item.partition("=")
        if name.lower() not in out:
            raise SystemExit(f"--price: unknown device {name!r}")
        out[name.lower()] = out[name.lower()].with_price(float(usd))
    return out


def workload(args: argparse.Namespace) -> Workload:
    arrivals = Bursty(args.rate, args.burst_cv) if args.burst_cv else Poisson(args.rate)
    if args.trace:
        return Workload(arrivals, trace=TraceLengths.from_file(args.trace))
    return Workload(arrivals, args.prompt, args.output)


def as_dict(summary: Summary) -> dict:
    return dataclasses.asdict(summary)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        devs = devices(args)
        serving = Serving(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Serving)})
        wl = workload(args)
        slo = SLO(args.ttft, args.tpot)
        if args.command == "simulate":
            return _simulate(args, devs, serving, wl, slo)
        return _search(args, devs, serving, wl, slo)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _simulate(args, devs, serving, wl, slo) -> int:
    if args.deployment == "colocated":
        dep = Colocated(Pool(devs[args.device], args.instances, args.tp), args.policy)
    else:
        dep = Disaggregated(
            Pool(devs[args.prefill_device], args.prefill, args.prefill_tp),
            Pool(devs[args.decode_device], args.decode, args.decode_tp),
            link(args.link),
        )
    summary = summarize(
        simulate(dep, wl.generate(args.requests or 2000, args.seed), args.model, serving), slo, args.trim
    )
    print(json.dumps(as_dict(summary), indent=1) if args.json else summary.table())
    return 0


def _search(args, devs, serving, wl, slo) -> int:
    kinds = instance_types(
        [devs[d.strip().lower()] for d in args.devices.split(",")],
        args.model,
        [int(t) for t in args.tps.split(",")],
        serving,
    )
    if not kinds:
        raise ValueError(f"{args.model.name} fits none of the devices {args.devices} at tp {args.tps}")
    target = Target(args.rate, slo, args.attainment)
    search = Search(args.model, wl, target, serving, args.requests, args.seed, args.max_instances, args.trim)
    plans = {"colocated": search.colocated(kinds), "disaggregated": search.disaggregated(kinds, kinds, link(args.link))}
    if args.json:
        doc = {
            k: None if p is None else {"deployment": p.deployment.describe(), "cost_per_million": p.cost_per_million,
                                       "summary": as_dict(p.summary)}
            for k, p in plans.items()
        }  # fmt: skip
        print(json.dumps({"target": dataclasses.asdict(target), "plans": doc, "simulations": len(search.trials)}))
        return 0
    print(f"{args.model.name}: {args.rate} req/s, {args.attainment:.0%} within TTFT {args.ttft}s and TPOT {args.tpot}s")
    for kind, plan in plans.items():
        if plan is None:
            print(f"{kind}: no deployment up to {args.max_instances} instances meets the target")
        else:
            print(f"{kind}: ${plan.cost_per_million:.2f} per million requests")
            print(plan.summary.table())
    if all(plans.values()):
        ratio = plans["colocated"].cost_per_million / plans["disaggregated"].cost_per_million
        print(f"disaggregation costs {1 / ratio:.2f}× what colocation does ({len(search.trials)} simulations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
