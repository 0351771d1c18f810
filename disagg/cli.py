"""``python -m disagg run | prefill | decode | eval``: the engine's command line.

- ``run``: both stages in one process; prints each request's output and a metrics table (``--json``: one JSON
  document ``{"requests": [...], "metrics": {...}}``).
- ``prefill --export-dir DIR``: the prefill stage alone; writes one ``request-NNNNNN.safetensors`` per request
  into DIR (new or without exports, so decode never mixes two runs).
- ``decode --import-dir DIR``: the decode stage alone, over every export in DIR (in file-name order); its output
  equals what ``run`` prints for the same requests.
- ``run --mode colocated``: one pool, every step carrying the running decodes and prompt chunks together.
- ``compare``: the same requests through both modes, measured side by side (:mod:`disagg.compare`).
- ``eval --text-file FILE``: teacher-forced NLL, perplexity and bits per byte of a text (:mod:`disagg.evaluate`).

Request i gets the id "i" and the seed ``--seed + i``. A request that fails (empty or too long prompt, a refused
export) is reported with its reason and the others go on; the exit status is then 1. Errors are printed without a
traceback; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import kernels
from disagg.cli_help import DefaultsHelpFormatter
from disagg.compare import compare, format_comparison, output_rows, synthetic_requests
from disagg.decode import DecodeStage
from disagg.engine import MODES, Engine, make_pool
from disagg.errors import EngineError
from disagg.evaluate import evaluate
from disagg.export import read_export_file, write_export
from disagg.kv_pool import PAGE_SIZES, KVPool
from disagg.loader import load_model
from disagg.metrics import format_metrics, plural
from disagg.prefill import PrefillStage
from disagg.request import Request, RequestOutput, SamplingParams
from disagg.sim.workload import Poisson, length_dist
from disagg.tokenizer import Tokenizer

DEFAULT_PROMPTS = (
    "Disaggregated serving runs prefill and decode on different machines.",
    "The quick brown fox",
    "Paged attention stores the KV cache in fixed-size pages, so",
    "Hello",
)
KV_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
MAX_PAGES = 2**31 - 1


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _pages(text: str) -> int:
    value = _positive(text)
    if value > MAX_PAGES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PAGES} (block tables hold int32 page ids), got {value}")
    return value


def _text(text: str) -> str:
    """A prompt from the command line: the OS hands undecodable bytes over as surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text: {text.encode('utf-8', 'surrogateescape')!r}") from None
    return text


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = DefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m disagg", description=__doc__.split("\n\n")[0], formatter_class=defaults
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="both stages in one process", formatter_class=defaults)
    prefill = commands.add_parser(
        "prefill", help="the prefill stage: prompts in, KV exports out", formatter_class=defaults
    )
    decode = commands.add_parser("decode", help="the decode stage: KV exports in, tokens out", formatter_class=defaults)
    comp = commands.add_parser(
        "compare", help="the same requests colocated and disaggregated, side by side", formatter_class=defaults
    )
    scoring = commands.add_parser(
        "eval", help="teacher-forced perplexity of a text file through the kernels", formatter_class=defaults
    )
    for p in (run, prefill, decode, comp, scoring):
        p.add_argument(
            "--model", default="tiny", help="'tiny' (trained, embedded), 'tiny-random' or a Hugging Face directory"
        )
        p.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "float16", "bfloat16"],
            help="weights and activations (auto: float32 on CPU, the checkpoint's 16-bit dtype on GPU)",
        )
        p.add_argument("--kv-dtype", default="auto", choices=list(KV_DTYPES), help="KV cache dtype (auto: the model's)")
        p.add_argument("--page-size", type=int, default=16, choices=PAGE_SIZES, help="KV page size of the pool(s)")
        p.add_argument("--num-pages", type=_pages, default=None, help="pages per pool (default: 16384 tokens)")
        p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
        p.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt token (no page reuse)")
    for p in (run, prefill, comp):
        prompts = p.add_mutually_exclusive_group()
        prompts.add_argument(
            "--prompt",
            nargs="+",
            action="extend",
            type=_text,
            metavar="TEXT",
            help="prompts as text (needs a tokenizer)",
        )
        prompts.add_argument(
            "--prompt-ids", nargs="+", action="extend", type=_token_ids, metavar="IDS", help="prompts as ids: 1,2,3"
        )
        p.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate per request")
        p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
        p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: off")
        p.add_argument(
            "--top-p", type=float, default=1.0, help="nucleus sampling: smallest set of tokens with this mass; 1.0: off"
        )
        p.add_argument(
            "--min-p",
            type=float,
            default=0.0,
            help="drop tokens below this fraction of the likeliest's probability; 0: off",
        )
        p.add_argument("--seed", type=int, default=0, help="request i samples with seed SEED + i")
        p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
        p.add_argument(
            "--max-batch-tokens", type=_positive, default=8192, help="prompt tokens per step (longer prompts: chunks)"
        )
    for p in (run, decode, comp):
        p.add_argument("--max-batch-size", type=_positive, default=64, help="sequences per decode step")
        p.add_argument(
            "--no-cuda-graph",
            action="store_true",
            help="run decode steps eagerly (default on CUDA: replay CUDA graphs captured per batch size; CPU: none)",
        )
        p.add_argument(
            "--compile", action="store_true", help="run decode steps under torch.compile (fullgraph, inductor)"
        )
    for p in (run, comp):
        p.add_argument(
            "--decode-page-size", type=int, choices=PAGE_SIZES, help="decode pool page size (default: --page-size)"
        )
    run.add_argument("--mode", choices=MODES, default="disaggregated", help="deployment (colocated: single-process)")
    comp.add_argument("--num-requests", type=_positive, help="a synthetic workload of N requests (default 8)")
    comp.add_argument("--prompt-len", type=length_dist, default=length_dist("uniform:8,64"), metavar="DIST",
                      help="synthetic prompt lengths: fixed:N | uniform:LO,HI | lognormal:MEAN,SIGMA[,MAX]")  # fmt: skip
    comp.add_argument("--output-len", type=length_dist, default=length_dist("fixed:8"), metavar="DIST",
                      help="synthetic output lengths (same syntax)")  # fmt: skip
    comp.add_argument("--rate", type=_seconds, help="Poisson arrivals, requests/s (default: all at once)")
    run.add_argument(
        "--prefill-ranks",
        type=_positive,
        help="under torchrun: ranks 0..N-1 prefill, the others decode (see the README's Distributed section)",
    )
    run.add_argument(
        "--timeout", type=_seconds, default=60.0, help="distributed: seconds of silence before a peer rank is lost"
    )
    prefill.add_argument(
        "--export-dir", type=Path, required=True, help="new or empty directory for the request-NNNNNN.safetensors"
    )
    decode.add_argument("--import-dir", type=Path, required=True, help="directory of exports written by prefill")
    scoring.add_argument("--text-file", type=Path, required=True, help="UTF-8 text to score")
    scoring.add_argument(
        "--max-batch-tokens",
        type=_positive,
        default=128,
        help="tokens per prefill chunk: later chunks of a window read earlier ones' K/V from the paged cache",
    )
    return parser


def _requests(args: argparse.Namespace, tokenizer: Tokenizer | None) -> list[Request]:
    if args.prompt_ids is not None:
        prompts = args.prompt_ids
    elif tokenizer is None:
        raise EngineError(f"{args.model} has no tokenizer.json: give prompts as --prompt-ids 1,2,3")
    else:
        prompts = [tokenizer.encode(text) for text in (args.prompt or DEFAULT_PROMPTS)]
    requests = []
    for i, ids in enumerate(prompts):
        sampling = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed + i,
            eos_token_ids=() if args.ignore_eos else None,
        )
        requests.append(Request(str(i), ids, sampling))
    return requests


def _report(args, model, tokenizer, outputs: list[RequestOutput], metrics: dict[str, Any], extra=None) -> int:
    metrics = {**metrics, "model": str(args.model), "dtype": str(model.dtype).removeprefix("torch."), **_mode()}
    if args.json:
        rows = []
        for o in outputs:
            row = o.to_dict()
            if tokenizer is not None and o.error is None:
                row["text"] = tokenizer.decode(o.output_ids)
            rows.append({**row, **(extra or {}).get(o.request_id, {})})
        print(json.dumps({"requests": rows, "metrics": metrics}, indent=2))
    else:
        print(
            f"model {args.model} ({model.config.architecture}, {model.config.num_layers} layers, {metrics['dtype']})"
            f" on {metrics['device']}"
        )
        if str(args.model) in _NOTES:
            print(_NOTES[str(args.model)])
        for o in outputs:
            cached = f", {o.cached_tokens} cached" if o.cached_tokens else ""
            print(
                f"\n[{o.request_id}] prompt {_show(tokenizer, o.prompt_ids)} ({plural(len(o.prompt_ids), 'token')}{cached})"
            )
            if o.error is not None:
                print("    failed (the error is on stderr)")
                continue
            print(
                f"    output {_show(tokenizer, o.output_ids)} ({plural(len(o.output_ids), 'token')}, {o.finish_reason})"
            )
            for key, value in (extra or {}).get(o.request_id, {}).items():
                print(f"    {key}: {value}")
        print("\n" + format_metrics(metrics))
    for o in outputs:
        if o.error is not None:
            print(f"error: {o.error}", file=sys.stderr)
    return 1 if any(o.error is not None for o in outputs) else 0


_NOTES = {
    "tiny": "(tiny: 0.84 M parameters trained for minutes on Python's help texts; English-like words, no sense)",
    "tiny-random": "(tiny-random has random weights: its text is noise)",
}


def _show(tokenizer: Tokenizer | None, ids: list[int]) -> str:
    ids_text = ",".join(map(str, ids)) if len(ids) <= 24 else ",".join(map(str, ids[:24])) + ",..."
    return f"{tokenizer.decode(ids)!r} [{ids_text}]" if tokenizer is not None else f"[{ids_text}]"


def _mode() -> dict[str, str]:
    if kernels.INTERPRET:
        return {"device": "cpu", "kernels": "triton interpreter"}
    return {"device": torch.cuda.get_device_name(), "kernels": "compiled"}


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "page_size": args.page_size,
        "num_pages": args.num_pages,
        "decode_page_size": args.decode_page_size,
        "kv_dtype": KV_DTYPES[args.kv_dtype],
        "max_batch_size": args.max_batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "prefix_cache": not args.no_prefix_cache,
        "cuda_graph": not args.no_cuda_graph,
        "compile": args.compile,
    }


def _pool(args: argparse.Namespace, model) -> KVPool:
    """The pool of a one-stage command (``prefill``, ``decode``)."""
    kv_dtype, cache = KV_DTYPES[args.kv_dtype], not args.no_prefix_cache
    return make_pool(model, page_size=args.page_size, num_pages=args.num_pages, kv_dtype=kv_dtype, prefix_cache=cache)


def cmd_run(args: argparse.Namespace) -> int:
    if args.prefill_ranks is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if args.mode == "colocated":
            raise EngineError("--mode colocated runs in one process: drop torchrun / --prefill-ranks")
        from disagg.distributed import run_distributed

        return run_distributed(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    requests = _requests(args, tokenizer)
    engine = Engine(model, mode=args.mode, **_engine_options(args))
    start = time.perf_counter()
    outputs = engine.generate(requests, progress=True)
    metrics = {**engine.metrics.summary(outputs), "mode": args.mode, "wall_time_s": time.perf_counter() - start}
    return _report(args, model, tokenizer, outputs, metrics)


def cmd_compare(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if args.prompt is not None or args.prompt_ids is not None:
        if args.num_requests is not None:
            raise EngineError("give either prompts (--prompt / --prompt-ids) or --num-requests, not both")
        requests = _requests(args, tokenizer)
        rng = np.random.default_rng(args.seed)
        gaps = Poisson(args.rate).gaps(rng, len(requests)) if args.rate else np.zeros(len(requests))
        arrivals = np.cumsum(gaps).tolist()
    else:
        base = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        requests, arrivals = synthetic_requests(
            args.num_requests or 8,
            args.prompt_len,
            args.output_len,
            vocab_size=model.config.vocab_size,
            context=model.config.max_position_embeddings,
            rate=args.rate,
            seed=args.seed,
            sampling=base,
        )
    result = compare(model, requests, arrivals, **_engine_options(args))
    failed = any(o.error is not None for outs in result["outputs"].values() for o in outs)
    if args.json:
        doc = {k: v for k, v in result.items() if k != "outputs"}
        print(json.dumps({**doc, "model": str(args.model), "requests": output_rows(result)}, indent=2))
    else:
        print(f"model {args.model} ({model.config.architecture}, {model.config.num_layers} layers), "
              f"{len(requests)} requests, {sum(len(r.prompt_ids) for r in requests)} prompt tokens, "
              f"max-batch-tokens {args.max_batch_tokens}, prefix cache {'off' if args.no_prefix_cache else 'on'}")  # fmt: skip
        print(format_comparison(result))
    return 1 if failed else 0


def cmd_prefill(args: argparse.Namespace) -> int:
    if args.export_dir.is_dir() and any(args.export_dir.glob("*.safetensors")):
        raise EngineError(f"{args.export_dir} already holds *.safetensors files: give an empty or new directory")
    try:
        args.export_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"--export-dir {args.export_dir}: cannot create the directory ({e.strerror})") from None
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    requests = _requests(args, tokenizer)
    pool = _pool(args, model)
    stage = PrefillStage(model, pool, max_batch_tokens=args.max_batch_tokens)
    start = time.perf_counter()
    outputs: dict[str, RequestOutput] = {}
    files: dict[str, dict[str, Any]] = {}
    for r in requests:
        try:
            stage.add(r)
        except EngineError as e:
            outputs[r.request_id] = RequestOutput(r.request_id, r.prompt_ids, error=str(e))
    with tqdm(total=len(requests) - len(outputs), unit="req", disable=None, delay=1.0, leave=False) as bar:
        while stage.has_work:
            for res in stage.step():
                rid = res.request.request_id
                path = args.export_dir / f"request-{int(rid):06d}.safetensors"
                write_export(path, res.export)
                outputs[rid] = RequestOutput(
                    rid,
                    res.request.prompt_ids,
                    [res.first_token],
                    "prefilled",
                    ttft_s=res.ttft_s,
                    cached_tokens=res.cached_tokens,
                )
                files[rid] = {"export": str(path)}
                bar.update(1)
    ordered = [outputs[r.request_id] for r in requests]
    metrics = {**stage.metrics.summary(ordered), "wall_time_s": time.perf_counter() - start}
    return _report(args, model, tokenizer, ordered, metrics, files)


def _export_files(directory: Path) -> list[Path]:
    """The exports in ``directory`` in name order; an EngineError says why there are none."""
    if not directory.exists():
        raise EngineError(f"--import-dir {directory} does not exist")
    if not directory.is_dir():
        raise EngineError(f"--import-dir {directory} is not a directory")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        what = "holds no *.safetensors exports" if any(directory.iterdir()) else "is empty"
        raise EngineError(f"--import-dir {directory} {what}")
    return files


def cmd_decode(args: argparse.Namespace) -> int:
    files = _export_files(args.import_dir)  # before the model loads: a wrong directory fails at once
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    pool = _pool(args, model)
    stage = DecodeStage(
        model, pool, max_batch_size=args.max_batch_size, cuda_graph=not args.no_cuda_graph, compile=args.compile
    )
    start = time.perf_counter()
    # One result per file, by position: a request id chosen by a file's author can never overwrite another
    # file's result (the stage itself refuses a request id it already holds).
    results: list[RequestOutput | None] = [None] * len(files)
    file_of: dict[str, int] = {}
    for i, path in enumerate(files):
        try:
            file_of[stage.add(read_export_file(path, pool))] = i
        except EngineError as e:
            results[i] = RequestOutput(path.name, [], error=f"{path.name}: {e}")
    with tqdm(unit="tok", disable=None, delay=1.0, leave=False) as bar:
        while stage.has_work:
            before = stage.metrics.decode_tokens
            for out in stage.step():
                results[file_of[out.request_id]] = out
            bar.update(stage.metrics.decode_tokens - before)
    ordered = [r for r in results if r is not None]
    if len(ordered) != len(files):
        raise RuntimeError("the decode stage returned no result for an export it accepted")  # a bug, not bad input
    metrics = {**stage.metrics.summary(ordered), "wall_time_s": time.perf_counter() - start}
    return _report(args, model, tokenizer, ordered, metrics)


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        text = args.text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"cannot read --text-file {args.text_file}: {e}") from None
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise EngineError(f"{args.model} has no tokenizer.json: eval needs one to read text")
    kv_dtype = KV_DTYPES[args.kv_dtype] or model.dtype
    result = evaluate(
        model,
        tokenizer,
        text,
        kv_dtype=kv_dtype,
        max_batch_tokens=args.max_batch_tokens,
        page_size=args.page_size,
        num_pages=args.num_pages,
    )
    dtype = str(model.dtype).removeprefix("torch.")
    info = {"model": str(args.model), "text_file": str(args.text_file), "dtype": dtype, **_mode()}
    info["kv_dtype"] = str(kv_dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps({**result.to_dict(), **info}, indent=2))
        return 0
    r = result
    print(f"model {args.model} ({dtype}, KV {info['kv_dtype']}) on {info['device']}, kernels: {info['kernels']}")
    print(
        f"{args.text_file}: {r.bytes:,} bytes, {r.tokens:,} tokens scored in {plural(r.windows, 'window')} of up to "
        f"{model.config.max_position_embeddings} tokens, prefilled in chunks of {r.chunk_tokens}"
    )
    print(
        f"mean NLL {r.nll_per_token:.4f} nats/token   perplexity {r.perplexity:.4g}   {r.bits_per_byte:.4f} bits/byte"
        f"   ({r.time_s:.1f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "run": cmd_run,
            "prefill": cmd_prefill,
            "decode": cmd_decode,
            "compare": cmd_compare,
            "eval": cmd_eval,
        }
        return commands[args.command](args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}): try a smaller --num-pages", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CPU allocations fail with a plain RuntimeError naming the allocator)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)
