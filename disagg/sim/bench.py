"""How fast the simulator is: a 1,000-GPU cluster serving 100k requests, timed on one CPU core.

    python -m disagg.sim.bench [--gpus 1000] [--requests 100000] [--rate-per-gpu 8] [--prefill-share 0.3]

Runs Llama-3-8B on H100s (default, uncalibrated costs) under Poisson traffic with lognormal prompt (mean 1024)
and output (mean 256) lengths, once colocated (chunked prefill) and once disaggregated, and prints the wall time
of each simulation next to what it simulated. The simulator is single-threaded Python: pin it to one core
(``taskset -c 0``) to measure it as the README quotes it.
"""

from __future__ import annotations

import argparse
import time

from disagg.roofline import LLAMA3_8B
from disagg.sim.cluster import Colocated, Disaggregated, Pool
from disagg.sim.devices import device
from disagg.sim.engine import simulate
from disagg.sim.links import IB_NDR
from disagg.sim.metrics import SLO, summarize
from disagg.sim.workload import LogNormal, Poisson, Workload


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m disagg.sim.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--rate-per-gpu", type=float, default=8.0, help="offered requests/s per GPU")
    ap.add_argument("--prefill-share", type=float, default=0.3, help="fraction of GPUs that prefill (disaggregated)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    h100 = device("h100")
    workload = Workload(
        Poisson(args.rate_per_gpu * args.gpus), LogNormal(1024, 0.8, high=8192), LogNormal(256, 0.8, high=2048)
    )
    t0 = time.perf_counter()
    requests = workload.generate(args.requests, args.seed)
    print(f"generated {args.requests} requests in {time.perf_counter() - t0:.2f} s")
    n_prefill = max(1, round(args.gpus * args.prefill_share))
    deployments = (
        Colocated(Pool(h100, args.gpus), "chunked"),
        Disaggregated(Pool(h100, n_prefill), Pool(h100, args.gpus - n_prefill), IB_NDR),
    )
    slo = SLO(ttft=1.0, tpot=0.05)
    for dep in deployments:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        result = simulate(dep, requests, LLAMA3_8B)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        steps = sum(i.steps for i in result.instances)
        tokens = sum(i.decode_tokens for i in result.instances)
        print(
            f"{dep.describe()}: {wall:.1f} s wall ({cpu:.1f} s CPU) for {result.makespan:.0f} s simulated, "
            f"{steps:,} steps, {tokens:,} decode tokens ({steps / wall / 1e3:.0f}k steps/s)"
        )
        print(summarize(result, slo).table())


if __name__ == "__main__":
    main()
