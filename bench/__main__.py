"""``python -m bench prefill|decode|extend|all [--smoke] [--quick] [--out FILE] [shape options]``

Measures the device's ceilings, then our kernels and their peers on every shape of the sweep, writing the JSON
results file after every measurement and printing a table at the end. See ``bench/NOTES.md``.

``python -m bench host [--out FILE]`` measures the CPU cost of our launch path instead (kernels stubbed; runs on
CPU and GPU alike): see :mod:`bench.host`.

``python -m bench step [--smoke] [--compile] [--out FILE]`` times whole decode steps of the engine, CUDA graphs on
and off: see :mod:`bench.step`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import re
import shlex
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_OUT = Path(__file__).resolve().parents[1] / "out" / "bench-smoke.json"


def _ints(text: str) -> tuple[int, ...]:
    """'512,1k,16k' -> (512, 1024, 16384)."""
    values = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", item)
        if not m:
            raise argparse.ArgumentTypeError(f"not an integer list: {text!r}")
        values.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return tuple(values)


def _heads(text: str) -> tuple[tuple[int, int], ...]:
    """'32/8,32/32' -> ((32, 8), (32, 32))."""
    pairs = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", item)
        if not m or int(m.group(2)) < 1 or int(m.group(1)) % int(m.group(2)):
            raise argparse.ArgumentTypeError(f"heads must be q/kv pairs with q a multiple of kv, got {item!r}")
        pairs.append((int(m.group(1)), int(m.group(2))))
    return tuple(pairs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if items == ("none",):
            return ()
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)} (or 'none')")
        return items

    return parse


_SWEEP_DEFAULTS = "a list left unset takes the sweep's default (smaller ones with --smoke)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench import peers  # light: torch only
    from disagg.cli_help import DefaultsHelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Microbenchmarks of phaseattn's kernels against PyTorch SDPA and FlexAttention, with the "
        "device's ceilings measured in the same run.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "what",
        choices=("prefill", "decode", "extend", "all", "host", "step"),
        help="which kernels to measure (host: the launch path's CPU cost; step: engine decode steps)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the interpreter (not performance)")
    p.add_argument("--quick", action="store_true", help="only the headline shapes the README quotes")
    p.add_argument("--out", type=Path, help="results file (default: bench/results/<device>-<date>.json)")
    p.add_argument("--budget-s", type=float, help="start no new shape after this many seconds; the results say so")
    p.add_argument(
        "--peers",
        type=_choices(peers.PEERS),
        default=",".join(peers.PEERS),  # argparse runs string defaults through `type`
        help=f"comma list of {','.join(peers.PEERS)}, or 'none'",
    )
    p.add_argument(
        "--sweep-peers",
        type=_choices(peers.PEERS),
        help="peers for the sweep shapes (default: --peers); the headline shapes always get --peers",
    )
    p.add_argument(
        "--no-autotune",
        action="store_true",
        help="our kernels use their heuristic tile configs (PHASEATTN_AUTOTUNE=0): no autotuning cost",
    )
    g = p.add_argument_group("prefill sweep", _SWEEP_DEFAULTS)
    g.add_argument("--seqlens", type=_ints, help="e.g. 512,1k,2k,4k,8k,16k")
    g.add_argument("--head-dims", type=_ints, help="e.g. 128,64,256")
    g.add_argument("--causal", choices=("both", "causal", "full"), help="masks to sweep (default: both)")
    g.add_argument("--total-tokens", type=_ints, help="tokens per prefill batch (batch = total / seqlen)")
    g = p.add_argument_group("decode sweep", _SWEEP_DEFAULTS)
    g.add_argument("--batches", type=_ints, help="e.g. 1,4,16,64,256")
    g.add_argument("--contexts", type=_ints, help="e.g. 512,2k,8k,32k,128k")
    g.add_argument("--page-sizes", type=_ints, help="e.g. 16,64")
    g.add_argument("--kv-dtypes", type=_choices(("bf16", "fp8")), help="e.g. bf16,fp8")
    g = p.add_argument_group("both sweeps", _SWEEP_DEFAULTS)
    g.add_argument("--heads", type=_heads, help="q/kv head pairs, e.g. 32/8,32/32")
    g = p.add_argument_group("host (launch-path CPU cost)")
    g.add_argument("--calls", type=_positive_int, default=200, help="calls per timing round")
    g.add_argument("--rounds", type=_positive_int, default=7, help="timing rounds (the median is reported)")
    g.add_argument(
        "--engine-batches",
        type=lambda text: () if text.strip() == "none" else _ints(text),
        default=(1, 64),
        help="decode batch sizes of the engine part, or 'none'",
    )
    g.add_argument("--engine-layers", type=_positive_int, default=32, help="layers of the engine part's model")
    g.add_argument("--engine-steps", type=_positive_int, default=5, help="timed decode steps per batch size")
    g = p.add_argument_group("step (engine decode steps; --batches: default 1,64, with --smoke 1,2)")
    g.add_argument("--models", type=_choices(("tiny", "llama8b")), default="tiny,llama8b", help="models to run")
    g.add_argument("--prompt-len", type=_positive_int, help="prompt tokens (default 512; 16 with --smoke)")
    g.add_argument("--steps", type=_positive_int, help="timed full-batch steps (default 30; 2 with --smoke)")
    g.add_argument("--warmup-steps", type=_count, help="full-batch steps before them (default 5; 1 with --smoke)")
    g.add_argument("--compile", action="store_true", help="also time torch.compile'd steps, graphs off and on")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time per measurement")
    g.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per measurement")
    g.add_argument("--memory-fraction", type=float, default=0.85, help="of the free device memory shapes may use")
    g.add_argument("--cache-dir", type=Path, help="Triton/Inductor compile cache to reuse across runs")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--commit", help="the project's git commit, recorded when the tree has no .git (copied checkouts)")
    args = p.parse_args(argv)
    if args.total_tokens is not None and len(args.total_tokens) != 1:
        p.error("--total-tokens takes one value")
    return args


def build_cases(args: argparse.Namespace) -> list:
    """Headline shapes first, then the sweep; for ``all`` the phases alternate so that a time budget leaves
    each covered. A sweep shape equal to a headline shape is run once."""
    from bench import decode, extend, prefill

    smoke = args.smoke
    phases = ("prefill", "decode", "extend") if args.what == "all" else (args.what,)
    heads = args.heads
    lists = {"prefill": [], "decode": [], "extend": []}
    if "prefill" in phases:
        lists["prefill"] = prefill.headline(smoke)
        if not args.quick:
            masks = {"both": (True, False), "causal": (True,), "full": (False,), None: None}[args.causal]
            causal = masks or (prefill.SMOKE_CAUSAL if smoke else (True, False))
            lists["prefill"] += prefill.cases(
                seqlens=args.seqlens or (prefill.SMOKE_SEQLENS if smoke else prefill.DEFAULT_SEQLENS),
                head_dims=args.head_dims or (prefill.SMOKE_HEAD_DIMS if smoke else prefill.DEFAULT_HEAD_DIMS),
                causal=causal,
                heads=heads or (prefill.SMOKE_HEADS if smoke else prefill.DEFAULT_HEADS),
                total_tokens=(
                    args.total_tokens or (prefill.SMOKE_TOTAL_TOKENS if smoke else prefill.DEFAULT_TOTAL_TOKENS,)
                )[0],
            )
    if "decode" in phases:
        lists["decode"] = decode.headline(smoke)
        if not args.quick:
            lists["decode"] += decode.cases(
                batches=args.batches or (decode.SMOKE_BATCHES if smoke else decode.DEFAULT_BATCHES),
                contexts=args.contexts or (decode.SMOKE_CONTEXTS if smoke else decode.DEFAULT_CONTEXTS),
                page_sizes=args.page_sizes or (decode.SMOKE_PAGE_SIZES if smoke else decode.DEFAULT_PAGE_SIZES),
                kv_dtypes=args.kv_dtypes or tuple(decode.KV_DTYPES),
                heads=heads or (decode.SMOKE_HEADS if smoke else decode.DEFAULT_HEADS),
            )
    if "extend" in phases:
        lists["extend"] = extend.headline(smoke)
        if not args.quick and not smoke:
            lists["extend"] += extend.cases(heads=(heads or (extend.HEADS,))[0])
    merged, seen = [], set()
    for case in itertools.chain.from_iterable(
        itertools.zip_longest(lists["prefill"], lists["decode"], lists["extend"])
    ):
        if case is not None and case.key not in seen:
            seen.add(case.key)
            merged.append(case)
    return merged


def default_out(env: dict, smoke: bool, prefix: str = "") -> Path:
    """bench/results/<prefix><device>-<date>.json; smoke runs: out/bench-<prefix>smoke.json."""
    if smoke:
        return SMOKE_OUT.with_name(f"bench-{prefix}smoke.json")
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{prefix}{slug}-{stamp}.json"


def host_main(args: argparse.Namespace) -> int:
    """``python -m bench host``: the table on stdout, the document in ``--out`` when given."""
    import json

    from bench import host

    data = host.run(
        calls=args.calls,
        rounds=args.rounds,
        engine_batches=args.engine_batches,
        engine_layers=args.engine_layers,
        engine_steps=args.engine_steps,
        commit=args.commit,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"device: {data['environment']['device_name']}; kernels: {data['environment']['kernels_mode']}")
    print(host.format_table(data))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"results: {args.out}")
    return 0


def set_environment(args: argparse.Namespace) -> None:
    """What must be decided before kernels is imported: smoke runs always go through the interpreter on CPU."""
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.no_autotune:
        os.environ["PHASEATTN_AUTOTUNE"] = "0"
    if args.cache_dir:
        cache = args.cache_dir.resolve()
        os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        os.environ["TRITON_CACHE_AUTOTUNING"] = "1"


def step_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``python -m bench step``: the table on stdout, the document rewritten after every row (``--out``, default
    bench/results/step-<device>-<date>.json; with --smoke out/bench-step-smoke.json)."""
    import kernels
    from bench import results, step

    if kernels._runtime.DEVICE_TYPE == "cpu" and not args.smoke:
        print("no CUDA device: only `--smoke` runs here (its numbers are not performance numbers)", file=sys.stderr)
        return 2
    smoke = step.SMOKE if args.smoke else {}
    out: list[Path] = []

    def save(data: dict) -> None:
        if not out:
            out.append(args.out or default_out(data["environment"], args.smoke, "step-"))
        results.write_json(out[0], data)

    data = step.run(
        models=args.models,
        batches=args.batches or smoke.get("batches", (1, 64)),
        prompt_len=args.prompt_len or smoke.get("prompt_len", 512),
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else smoke.get("warmup_steps", 5),
        steps=args.steps or smoke.get("steps", 30),
        with_compile=args.compile,
        smoke=args.smoke,
        command="python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        commit=args.commit,
        save=save,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(step.format_table(data))
    print(f"results: {out[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C exits 130 with one line; a results file already started keeps every measurement taken, with status
    "interrupted"."""
    progress: dict = {}  # "file", "cases", "done", filled in as the run gets there
    try:
        return _main(argv, progress)
    except KeyboardInterrupt:
        if "file" not in progress:
            print("interrupted", file=sys.stderr)
        else:
            cases, done = progress.get("cases", 0), progress.get("done", 0)
            progress["file"].finish("interrupted", cases - done)
            print(
                f"interrupted after {done} of {cases} shapes; partial results: {progress['file'].path}", file=sys.stderr
            )
        return 130


def _main(argv: list[str] | None, progress: dict) -> int:
    args = parse_args(argv)
    if args.what == "host":
        return host_main(args)
    set_environment(args)
    if args.what == "step":
        return step_main(args, argv)

    import torch
    from tqdm import tqdm

    import kernels
    from bench import results
    from bench.ceilings import measure_ceilings
    from bench.runner import RunContext

    def log(line: str) -> None:  # flushed: a run killed at its time limit still shows its lines
        tqdm.write(line)
        sys.stdout.flush()

    device = torch.device(kernels._runtime.DEVICE_TYPE)
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: only `--smoke` runs here (its numbers are not performance numbers)", file=sys.stderr)
        return 2
    env = results.environment(device, kernels.INTERPRET, args.commit)
    out = args.out or default_out(env, args.smoke)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    file = progress["file"] = results.ResultsFile(out, command=command, env=env, smoke=args.smoke)
    if args.smoke:
        log(results.SMOKE_NOTICE)
    log(f"device: {env['device_name']}; results: {out}")

    start = time.monotonic()
    ceilings, entries = measure_ceilings(device, smoke=args.smoke, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    file.set_ceilings(ceilings, entries)
    log(
        f"ceilings: bf16 matmul {ceilings.matmul_flops / 1e12:.1f} TFLOP/s, "
        f"device copy {ceilings.copy_bandwidth / 1e9:.0f} GB/s (read + written)"
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        budget = int(torch.cuda.mem_get_info(device)[0] * args.memory_fraction)
    else:
        budget = 2 << 30
    ctx = RunContext(
        device=device,
        results=file,
        ceilings=ceilings,
        peers=args.peers,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        l2_bytes=env.get("l2_bytes"),
        memory_budget=budget,
        seed=args.seed,
        log=log,
    )

    cases = build_cases(args)
    progress["cases"] = len(cases)
    sweep_peers = args.peers if args.sweep_peers is None else args.sweep_peers
    status, not_run = "complete", 0
    # The bar shows on a terminal; captured output (disable=None: not a TTY) gets an [i/n] prefix per line instead.
    bar = tqdm(cases, desc="shapes", unit="shape", file=sys.stderr, mininterval=2.0, dynamic_ncols=True, disable=None)
    for i, case in enumerate(bar):
        progress["done"] = i
        ctx.log = lambda line, i=i: log(f"[{i + 1}/{len(cases)}] {line}")
        ctx.peers = args.peers if case.tier == "headline" else sweep_peers
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            status, not_run = f"stopped: time budget of {args.budget_s:.0f} s reached", len(cases) - i
            log(f"{status}; {not_run} shapes not run")
            break
        try:
            case.run(ctx)
        except Exception as exc:  # a failure in one shape's setup must not lose the rest of the run
            file.add(
                results.not_measured(
                    case.phase,
                    "phaseattn",
                    "ours",
                    case.shape,
                    case.flops,
                    case.nbytes,
                    f"error: shape setup failed: {type(exc).__name__}: {exc}".splitlines()[0],
                    tier=case.tier,
                )
            )
            log(f"{case.phase} {case.shape}: setup failed: {type(exc).__name__}: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    file.finish(status, not_run)

    print()
    print(results.format_table(file.data))
    print()
    print(results.headline_summary(file.data))
    print(f"\n{status} in {time.monotonic() - start:.0f} s; results: {out}")
    if args.smoke:
        print(results.SMOKE_NOTICE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
