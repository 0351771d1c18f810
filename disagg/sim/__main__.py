"""Command line of the serving simulator.

    python -m disagg.sim simulate [--deployment colocated|disaggregated] [--rate R] ... [--json]
    python -m disagg.sim search --rate R [--devices h100,h200] [--link ib-ndr] ... [--json]
    python -m disagg.sim validate [--json]

``simulate`` serves one request stream on one deployment and prints the model, workload and SLOs it used, its
latency, SLO and throughput summary; ``search`` finds the cheapest colocated and the cheapest disaggregated
deployment that serve ``--rate`` requests/s with ``--attainment`` of them within the SLOs, and their costs per
million requests, printing a line per simulated deployment as it goes (Ctrl-C prints the best plans found so far);
``validate`` compares the simulator's throughput with a published table (``disagg.sim.validate``).
``--bench-results FILE`` (repeat for several devices) calibrates the devices from ``python -m bench`` results;
without it every number is a stated default and the output says so. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from disagg.roofline import LLAMA3_8B, LLAMA3_70B, ModelShape
from disagg.sim.calibration import calibrated_devices
from disagg.sim.cluster import Colocated, Deployment, Disaggregated, Pool, Serving
from disagg.sim.costs import CostModel
from disagg.sim.devices import DATASHEETS, Device
from disagg.sim.engine import simulate
from disagg.sim.links import LINKS, link
from disagg.sim.metrics import SLO, Summary, summarize
from disagg.sim.search import Search, Target, instance_types
from disagg.sim.validate import DATA, validate
from disagg.sim.workload import Bursty, Poisson, TraceLengths, Workload, length_dist

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


SERVING_HELP = {
    "max_batch": "sequences an instance runs at once (vLLM's max_num_seqs)",
    "token_budget": "tokens in one step (vLLM's max_num_batched_tokens)",
    "page_size": "KV page size, tokens",
    "mem_util": "fraction of the memory left after weights and activations that holds KV",
    "dtype_bytes": "bytes per weight and GEMM input: 2 bf16, 1 fp8 (fp8 weights and fp8 GEMMs)",
    "kv_bytes": "bytes per KV element: 2 bf16, 1 fp8",
}
TERMS_HELP = {
    "fp8_gemm": "with --dtype-bytes 1, run GEMMs at the fp8 tensor-core ceiling (off: weight-only fp8)",
    "kernel_latency": "fixed GPU seconds per kernel (XLA's sm_90 matmul table)",
    "tiles": "round work up to GEMM rows of 64, causal tiles of 128 and KV pages",
    "elementwise": "cost norms, RoPE/KV write, SwiGLU and sampling as memory-bound passes",
    "host_overhead": "host seconds per step (vLLM RFC #6854: ~4 ms)",
    "host_per_request": "host seconds per sequence in a step (TensorRT-LLM PR #10273: 45 ms for 1,536)",
    "overlap": "host work of the next step overlaps the GPU step (TensorRT-LLM, SGLang, vLLM V1)",
    "activation_memory": "reserve the activations of a token_budget step before sizing the KV pool",
    "unquantized_head": "with --dtype-bytes 1, keep the LM head and embedding in bf16 (ModelOpt's FP8 recipe)",
}


def _terms_group(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("cost model terms (disagg.sim.costs.CostModel; each can be switched off)")
    for f in dataclasses.fields(CostModel):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=TERMS_HELP[f.name])
        else:
            g.add_argument(flag, type=float, default=f.default, help=TERMS_HELP[f.name])


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m disagg.sim", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model, traffic and targets")
    g.add_argument("--model", type=model_shape, default="llama-3-8b", help="llama-3-8b, llama-3-70b or a config.json")
    g.add_argument("--rate", type=float, default=10.0, help="requests per second")
    g.add_argument("--burst-cv", type=float, default=None, help="gamma arrivals with this CV (default: Poisson)")
    g.add_argument("--prompt", type=length_dist, default="lognormal:1024,0.8,8192",
                   help="prompt lengths: fixed:N, uniform:LOW,HIGH or lognormal:MEAN,SIGMA[,MAX]")  # fmt: skip
    g.add_argument("--output", type=length_dist, default="lognormal:256,0.8,2048",
                   help="output lengths (counting the first token), same forms as --prompt")  # fmt: skip
    g.add_argument("--trace", default=None, help="CSV/JSON of (prompt, output) lengths, instead of --prompt/--output")
    g.add_argument("--requests", type=int, default=None, help="default: 2000 (simulate); sized to the target (search)")
    g.add_argument("--seed", type=int, default=0, help="seed of the request stream")
    g.add_argument("--ttft", type=float, default=0.5, help="TTFT SLO, seconds")
    g.add_argument("--tpot", type=float, default=0.05, help="TPOT SLO, seconds")
    g.add_argument("--trim", type=float, default=0.1, help="fraction of requests at each end not judged (warm-up)")
    g = common.add_argument_group("hardware and serving")
    g.add_argument("--bench-results", action="append", default=[], help="bench results JSON (repeatable)")
    g.add_argument("--price", action="append", default=[], metavar="DEVICE=USD", help="hourly price per GPU")
    g.add_argument("--link", default="ib-ndr", choices=sorted(LINKS), help="prefill -> decode link")
    for f in dataclasses.fields(Serving):
        if f.name in SERVING_HELP:
            g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=SERVING_HELP[f.name])  # fmt: skip
    g.add_argument("--json", action="store_true", help="print one JSON document")
    _terms_group(common)

    s = sub.add_parser("simulate", parents=[common], help="serve one stream on one deployment", formatter_class=fmt)
    s.add_argument("--deployment", choices=("colocated", "disaggregated"), default="colocated", help="deployment")
    s.add_argument("--policy", choices=("prefill-first", "chunked"), default="chunked", help="colocated scheduling")
    s.add_argument("--device", default="h100", choices=sorted(DATASHEETS), help="colocated instances' GPU")
    s.add_argument("--tp", type=int, default=1, help="colocated tensor-parallel size")
    s.add_argument("--instances", type=int, default=1, help="colocated instances")
    s.add_argument("--prefill-device", default="h100", choices=sorted(DATASHEETS), help="prefill instances' GPU")
    s.add_argument("--prefill-tp", type=int, default=1, help="prefill tensor-parallel size")
    s.add_argument("--prefill", type=int, default=1, help="prefill instances")
    s.add_argument("--decode-device", default="h100", choices=sorted(DATASHEETS), help="decode instances' GPU")
    s.add_argument("--decode-tp", type=int, default=1, help="decode tensor-parallel size")
    s.add_argument("--decode", type=int, default=1, help="decode instances")

    s = sub.add_parser("search", parents=[common], help="cheapest deployments meeting a goodput target",
                       formatter_class=fmt)  # fmt: skip
    s.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs")
    s.add_argument("--devices", default="h100", help="comma-separated presets to consider")
    s.add_argument("--tps", default="1,2,4,8", help="tensor-parallel sizes to consider")
    s.add_argument("--max-instances", type=int, default=256, help="most instances per pool before giving up")

    s = sub.add_parser("validate", help="predicted against published throughput", formatter_class=fmt)
    s.add_argument("--table", default=str(DATA), help="the published table (JSON, see disagg.sim.validate)")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    _terms_group(s)
    return ap


def terms(args: argparse.Namespace) -> CostModel:
    return CostModel(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CostModel)})


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
    try:
        args = parser().parse_args(argv)
        if args.command == "validate":
            return _validate(args)
        devs = devices(args)
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Serving) if f.name in SERVING_HELP}
        serving = Serving(**fields, terms=terms(args))
        wl = workload(args)
        slo = SLO(args.ttft, args.tpot)
        if args.command == "simulate":
            return _simulate(args, devs, serving, wl, slo)
        return _search(args, devs, serving, wl, slo)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def describe_run(args: argparse.Namespace, serving: Serving, slo: SLO) -> dict:
    """What a run used: the model, the workload, the SLOs and the serving knobs, as plain values."""
    lengths = {"trace": args.trace} if args.trace else {"prompt": repr(args.prompt), "output": repr(args.output)}
    return {
        "model": dataclasses.asdict(args.model),
        "workload": {"rate": args.rate, "arrivals": f"gamma cv {args.burst_cv}" if args.burst_cv else "poisson",
                     **lengths, "seed": args.seed},
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot, "trim": args.trim},
        "serving": {k: v for k, v in dataclasses.asdict(serving).items() if k != "terms"},
        "cost_model": dataclasses.asdict(serving.terms),
    }  # fmt: skip


def header(args: argparse.Namespace, serving: Serving, slo: SLO) -> str:
    lengths = f"trace {args.trace}" if args.trace else f"prompts {args.prompt}, outputs {args.output}"
    arrivals = f"gamma (cv {args.burst_cv})" if args.burst_cv else "Poisson"
    m = args.model
    return "\n".join(
        [
            f"model {m.name} ({m.params / 1e9:.1f}B parameters, {m.layers} layers, {m.q_heads}/{m.kv_heads} heads); "
            f"weights {serving.dtype_bytes} B, KV {serving.kv_bytes:g} B per element",
            f"workload {args.rate:g} req/s {arrivals}; {lengths}; seed {args.seed}",
            f"SLOs TTFT {slo.ttft:g} s, TPOT {slo.tpot:g} s (first and last {args.trim:.0%} of requests not judged)",
            f"cost model: {serving.terms.describe()}",
        ]
    )


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
    if args.json:
        print(json.dumps({**describe_run(args, serving, slo), **as_dict(summary)}, indent=1))
    else:
        print(header(args, serving, slo))
        print(summary.table())
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
    title = (
        f"{args.model.name}: {args.rate} req/s, {args.attainment:.0%} within TTFT {args.ttft}s and TPOT {args.tpot}s"
    )
    print(title, file=sys.stderr if args.json else sys.stdout)
    if not args.json:
        print(header(args, serving, slo))
    sys.stdout.flush()

    def progress(dep: Deployment, summary: Summary, ok: bool) -> None:
        print(f"  [{len(search.trials)}] {dep.describe()}: attainment {summary.attainment:.1%} "
              f"{'meets' if ok else 'misses'}", file=sys.stderr, flush=True)  # fmt: skip

    search = Search(args.model, wl, target, serving, args.requests, args.seed, args.max_instances, args.trim,
                    on_trial=progress)  # fmt: skip
    interrupted = False
    try:
        plans = {
            "colocated": search.colocated(kinds),
            "disaggregated": search.disaggregated(kinds, kinds, link(args.link)),
        }
    except KeyboardInterrupt:
        interrupted = True
        plans = {"colocated": search.best_so_far(Colocated), "disaggregated": search.best_so_far(Disaggregated)}
        print(f"interrupted after {len(search.trials)} simulations: the best plans found so far", file=sys.stderr)
    if args.json:
        doc = {
            k: None if p is None else {"deployment": p.deployment.describe(), "cost_per_million": p.cost_per_million,
                                       "summary": as_dict(p.summary)}
            for k, p in plans.items()
        }  # fmt: skip
        print(json.dumps({"target": dataclasses.asdict(target), **describe_run(args, serving, slo), "plans": doc,
                          "simulations": len(search.trials), "interrupted": interrupted}))  # fmt: skip
        return 130 if interrupted else 0
    for kind, plan in plans.items():
        if plan is None:
            print(f"{kind}: no deployment {'found so far' if interrupted else f'up to {args.max_instances} instances'} "
                  f"meets the target")  # fmt: skip
        else:
            print(f"{kind}: ${plan.cost_per_million:.2f} per million requests")
            print(plan.summary.table())
    if all(plans.values()):
        ratio = plans["colocated"].cost_per_million / plans["disaggregated"].cost_per_million
        print(f"disaggregation costs {1 / ratio:.2f}× what colocation does ({len(search.trials)} simulations)")
    return 130 if interrupted else 0


def _validate(args) -> int:
    result = validate(args.table, terms(args))
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
