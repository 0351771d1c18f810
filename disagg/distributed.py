"""``torchrun --nproc-per-node N -m disagg run --prefill-ranks P ...``: the ``run`` command with its stages on
separate ranks (:mod:`disagg.ranks` holds the roles and the protocol, :mod:`disagg.transport` the messages).

Start-up, on every rank:

1. the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) says
   who this rank is; on a GPU machine it runs on GPU LOCAL_RANK (modulo the GPUs there);
2. the process group, waiting at most ``--timeout`` for the others: control messages always go over gloo; KV
   payloads go over NCCL when every rank on a node has a GPU of its own, else over gloo through host memory;
3. the model, the requests (every rank parses the same command line) and this rank's stage and pool;
4. a check that the ranks agree, before any work: an all_gather of (protocol version, started or not, digest of
   the model fingerprint with the KV dtype, digest of the requests and options, pool pages). A difference is
   refused on every rank with an error that names it, and a non-zero exit.

Then every rank serves its role. Rank 0 prints the outputs in request order, in the single-process ``run``'s
format, plus each request's transfer (prefill and decode rank, KV bytes, seconds, bandwidth, wait for the ACK), the
run's transfer totals, each rank's pool and the faults seen. Every rank's last line on stderr gives its exit status
and its pool's free pages; all ranks exit with the run's status (non-zero if a request failed or a rank was lost).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import kernels
from disagg.cli import KV_DTYPES, _report, _requests
from disagg.decode import DecodeStage, reserved_tokens
from disagg.engine import make_pool
from disagg.errors import DistributedError, EngineError
from disagg.export import fingerprint
from disagg.loader import load_model
from disagg.metrics import Metrics
from disagg.prefill import PrefillStage
from disagg.ranks import KV_DTYPE_CODES, DecodeRank, Layout, PrefillRank, Rank, assign_requests
from disagg.request import Request, RequestOutput
from disagg.transport import Transport, lost_reason

PROTOCOL_VERSION = 1
_NOT_CHECKED = {"command", "model", "json", "prompt", "prompt_ids", "dtype", "kv_dtype"}  # covered otherwise


def run_distributed(args: argparse.Namespace) -> int:
    """Run ``args`` (the ``run`` command's) as this process's rank; returns the exit status."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    if env["RANK"] is None or env["WORLD_SIZE"] is None:
        raise DistributedError("--prefill-ranks needs a distributed launch: torchrun --nproc-per-node N -m disagg run")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if args.prefill_ranks is None:
        raise DistributedError(f"launched as rank {rank} of {world}: give --prefill-ranks")
    if not 1 <= args.prefill_ranks < world:
        raise DistributedError(f"--prefill-ranks must leave at least one decode rank of {world}: 1 .. {world - 1}")
    layout = Layout(world, args.prefill_ranks)

    def log(message: str) -> None:
        print(f"[rank {rank} {layout.role(rank)}] {message}", file=sys.stderr, flush=True)

    local_rank = int(env["LOCAL_RANK"] or 0)
    device, payload_device, backend = _placement(local_rank, int(env["LOCAL_WORLD_SIZE"] or world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout))
    except Exception as e:  # the rendezvous failed or timed out (e.g. the ranks were given different WORLD_SIZEs)
        log(f"error: could not join the process group of {world} ranks: {lost_reason(e)}")
        log("exit 1")
        return 1
    node: Rank | None = None
    status, normal_end = 1, False
    try:
        node, model, tokenizer = _start(args, layout, rank, device, payload_device, log)
        start = time.perf_counter()
        node.run()
        if rank == 0:
            outputs, extra, metrics = _assemble(node, args, layout, payload_device, time.perf_counter() - start)
            status = int(any(o.error is not None for o in outputs) or bool(metrics["faults"]))
            if not node.finish(status):  # then the others have logged their last line and are leaving
                status = 1
            _report(args, model, tokenizer, outputs, metrics, extra)
            if not args.json:
                print(format_distributed(metrics))
        else:
            node.transport.flush()
            status = 1 if node.status is None or node.faults else node.status
        normal_end = True
    except EngineError as e:
        log(f"error: {e}")
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        pool = ""
        if node is not None:
            node.stage.abort_all()  # frees whatever a failure left behind; a finished run holds nothing
            pool = f", pool {node.stage.pool.num_free_pages}/{node.stage.pool.num_pages} pages free"
        log(f"exit {status}{pool}")
        if node is not None and normal_end and rank != 0:
            node.goodbye()
        if node is not None and not node.transport.close(wait=normal_end):
            # a thread still waits inside gloo on a peer that neither answers nor closes: finalizing the
            # interpreter under it would abort the process, so leave now, with the status already decided
            sys.stdout.flush()
            os._exit(status)
        dist.destroy_process_group()
    return status


def _placement(local_rank: int, local_world: int) -> tuple[torch.device, torch.device, str]:
    """(this rank's device, where KV payloads travel from, process group backend)."""
    cpu = torch.device("cpu")
    if kernels.INTERPRET:
        return cpu, cpu, "gloo"
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if local_world <= torch.cuda.device_count():  # NCCL needs a GPU per rank
        return device, device, "cpu:gloo,cuda:nccl"
    return device, cpu, "gloo"


def _start(args, layout: Layout, rank: int, device, payload_device, log) -> tuple[Rank, Any, Any]:
    """Load, check that every rank agrees, and build this rank's role; returns it, the model and the tokenizer."""
    model = tokenizer = requests = pool = None
    failure: EngineError | None = None
    decode_page_size = args.decode_page_size or args.page_size
    page_size = args.page_size if layout.role(rank) == "prefill" else decode_page_size
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
        requests = _requests(args, tokenizer)
        pool = make_pool(
            model,
            page_size=page_size,
            num_pages=args.num_pages,
            kv_dtype=KV_DTYPES[args.kv_dtype],
            prefix_cache=not args.no_prefix_cache,
        )
    except EngineError as e:
        failure = e
    model_id = options = None
    if failure is None:
        kv_dtype = str(pool.dtype).removeprefix("torch.")
        model_id = {"fingerprint": fingerprint(model), "kv_dtype": kv_dtype, "kv_scale": pool.kv_scale}
        options = {
            "requests": [[r.prompt_ids, r.sampling.to_dict()] for r in requests],
            "options": {k: v for k, v in vars(args).items() if k not in _NOT_CHECKED},
        }
    try:
        pool_pages = check_ranks(failure is None, model_id, options, pool.num_pages if pool is not None else 0)
    except DistributedError:
        if failure is not None:
            raise failure from None
        raise
    if payload_device.type == "cuda":
        _connect_payload_pairs(layout, rank, payload_device)

    meta = (KV_DTYPE_CODES.index(model_id["kv_dtype"]), *_digest(model_id))
    decode = layout.role(rank) == "decode"
    free_pages = (lambda: pool.num_free_pages) if decode else (lambda: -1)
    transport = Transport(rank, layout.peers(rank), args.timeout, free_pages, payload_device)
    common = (rank, layout, transport, requests, log)
    where = f"pool {pool.num_pages} pages x {pool.page_size} tokens on {device}, KV over {_backend(payload_device)}"
    if not decode:
        context = model.config.max_position_embeddings
        assignment = assign_requests([len(r.prompt_ids) for r in requests], layout.num_prefill)
        node = PrefillRank(
            *common,
            stage=PrefillStage(model, pool, max_batch_tokens=args.max_batch_tokens),
            assignment=assignment,
            decode_pages={d: pool_pages[d] for d in layout.decode_ranks},
            pages_needed=lambda n, max_new: -(-reserved_tokens(n, max_new, context) // decode_page_size),
            meta=meta,
        )
        log(f"{assignment.count(rank)} of {len(requests)} requests; {where}")
    else:
        node = DecodeRank(
            *common,
            stage=DecodeStage(
                model, pool, max_batch_size=args.max_batch_size, cuda_graph=not args.no_cuda_graph, compile=args.compile
            ),
            meta=meta,
        )
        log(where)
    return node, model, tokenizer


def _connect_payload_pairs(layout: Layout, rank: int, device: torch.device) -> None:
    """NCCL creates a pair's communicator at its first send/recv, blocking both ranks until the other one joins; a
    decode rank posting its first payload receive before acknowledging would wait for a sender that waits for the
    acknowledgement. So every prefill-decode pair exchanges one value now, in the same order on every rank."""
    one = torch.ones(1, device=device)
    with _start_up_collective():
        if layout.role(rank) == "prefill":
            for d in layout.decode_ranks:
                dist.send(one, d)
        else:
            for p in layout.prefill_ranks:
                dist.recv(one, p)
        torch.cuda.synchronize(device)


def _backend(payload_device: torch.device) -> str:
    return "nccl" if payload_device.type == "cuda" else "gloo"


def _digest(obj: Any) -> tuple[int, int]:
    """128 bits of sha256 over ``obj`` as canonical JSON, as two int64 (0, 0 for None)."""
    if obj is None:
        return 0, 0
    return struct.unpack("<qq", hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()[:16])


def check_ranks(started: bool, model_id: dict | None, options: dict | None, pool_pages: int) -> list[int]:
    """Collective: raise DistributedError on every rank unless all ranks started, speak this protocol version, run
    the same model with the same KV dtype, and got the same requests and options. Returns each rank's pool pages."""
    mine = [PROTOCOL_VERSION, int(started), *_digest(model_id), *_digest(options), pool_pages]
    rows = _all_gather(torch.tensor(mine))
    for r, row in enumerate(rows):
        if row[0] != PROTOCOL_VERSION:
            raise DistributedError(
                f"rank {r} speaks protocol version {row[0]}, this rank {PROTOCOL_VERSION}: run the same phaseattn"
            )
    failed = [str(r) for r, row in enumerate(rows) if not row[1]]
    if failed:
        raise DistributedError(f"rank {', '.join(failed)} could not start (see its error); no rank serves")
    if any(row[2:4] != rows[0][2:4] for row in rows):
        ids = [json.loads(b) for b in _all_gather_bytes(json.dumps(model_id).encode())]
        raise DistributedError(model_difference(ids))
    for r, row in enumerate(rows):
        if row[4:6] != rows[0][4:6]:
            raise DistributedError(
                f"rank {r} got other requests or options than rank 0: every rank needs the same command line"
            )
    return [row[6] for row in rows]


def model_difference(ids: list[dict]) -> str:
    """What differs between the first rank whose model identity (fingerprint, KV dtype and scale) is not rank 0's
    and rank 0, in words."""
    flat = [{**i["fingerprint"], "KV dtype": i["kv_dtype"], "KV scale": i["kv_scale"]} for i in ids]
    r = next(r for r, f in enumerate(flat) if f != flat[0])
    key = next((k for k in flat[0] if flat[r].get(k) != flat[0][k]), "model")
    return (
        f"fingerprint mismatch: rank {r} has {key} {flat[r].get(key)!r}, rank 0 has {flat[0][key]!r}; every rank must "
        "load the same model with the same --dtype and --kv-dtype"
    )


@contextlib.contextmanager
def _start_up_collective() -> Iterator[None]:
    """A rank lost between the rendezvous and the end of the start-up check (killed, stopped, still loading after
    the timeout, or launched with another WORLD_SIZE) makes gloo/NCCL raise inside a collective: say so in words."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL raise RuntimeError or its subclass DistBackendError
        reason = lost_reason(e)
        if "timed out" in str(e).lower():
            reason = "no answer within --timeout (a rank stopped, is still starting, or has another WORLD_SIZE)"
        raise DistributedError(f"a rank was lost during the start-up check: {reason}") from None


def _all_gather(t: torch.Tensor) -> list[list[int]]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    with _start_up_collective():
        dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _all_gather_bytes(data: bytes) -> list[bytes]:
    sizes = [s[0] for s in _all_gather(torch.tensor([len(data)]))]
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty_like(buf) for _ in sizes]
    with _start_up_collective():
        dist.all_gather(out, buf)
    return [o[:n].numpy().tobytes() for o, n in zip(out, sizes, strict=True)]


def _assemble(node: Rank, args, layout: Layout, payload_device, wall_s: float):
    """Rank 0: every request's output (from the rank that finished or failed it; lost ones explained), the
    per-request transfer fields, and the run's metrics."""
    requests: list[Request] = node.requests
    reports = {**node.reports, 0: node.report()}
    lost = node.transport.lost
    found: dict[int, RequestOutput] = {}
    transfers: dict[int, dict[str, Any]] = {}
    for rep in reports.values():
        for o in rep["outputs"]:
            i = int(o["request_id"])
            if i not in found or found[i].error is not None:
                found[i] = RequestOutput(**o)
        transfers |= {int(i): t for i, t in rep.get("transfers", {}).items()}
    assignment = assign_requests([len(r.prompt_ids) for r in requests], layout.num_prefill)
    outputs, extra = [], {}
    for i, r in enumerate(requests):
        t = transfers.get(i, {})
        if i not in found:
            d, p = t.get("decode_rank"), assignment[i]
            why = (
                f"{layout.name(d)} was lost ({lost[d]}) while serving it"
                if d in lost
                else f"{layout.name(p)} was lost ({lost[p]}) before handing it over"
                if p in lost
                else "no rank reported it"
            )
            found[i] = RequestOutput(r.request_id, r.prompt_ids, error=f"request {i}: {why}")
        found[i].cached_tokens = t.get("cached_tokens", found[i].cached_tokens)  # known to the prefill rank
        outputs.append(found[i])
        keys = ("decode_rank", "kv_transfer_bytes", "kv_transfer_s", "kv_transfer_bytes_per_s", "kv_ack_wait_s")
        row = {"prefill_rank": assignment[i], **{k: t.get(k) for k in keys}}
        extra[r.request_id] = row if args.json else _transfer_text(row)

    totals = Metrics()
    for rep in reports.values():
        for f in dataclasses.fields(Metrics):
            setattr(totals, f.name, getattr(totals, f.name) + rep["metrics"][f.name])
    moved = [t for t in transfers.values() if t.get("kv_transfer_bytes") is not None]
    nbytes, seconds = sum(t["kv_transfer_bytes"] for t in moved), sum(t["kv_transfer_s"] for t in moved)
    faults = list(dict.fromkeys(f for r in sorted(reports) for f in reports[r]["faults"]))
    ranks = []
    for r in range(layout.world_size):
        rep = reports.get(r, {})
        ranks.append(
            {
                "rank": r,
                "role": layout.role(r),
                "lost": lost.get(r),
                "pool_pages": rep.get("pool_pages"),
                "pool_free_pages": rep.get("pool_free_pages"),
                "prefill_tokens": rep["metrics"]["prefill_tokens"] if rep else None,
                "decode_tokens": rep["metrics"]["decode_tokens"] if rep else None,
                "acks_delayed": rep.get("acks_delayed"),
            }
        )
    metrics = {
        **totals.summary(outputs),
        "wall_time_s": wall_s,
        "world_size": layout.world_size,
        "prefill_ranks": layout.num_prefill,
        "decode_ranks": layout.world_size - layout.num_prefill,
        "payload_backend": _backend(payload_device),
        "kv_transfers": len(moved),
        "kv_bytes_transferred": nbytes,
        "kv_transfer_time_s": seconds,
        "kv_transfer_bytes_per_s": nbytes / seconds if seconds > 0 else 0.0,
        "ranks": ranks,
        "faults": faults,
    }
    return outputs, extra, metrics


def _transfer_text(row: dict[str, Any]) -> dict[str, str]:
    if row["kv_transfer_bytes"] is None:
        return {"transfer": f"prefill rank {row['prefill_rank']}, no KV transfer"}
    return {
        "transfer": (
            f"prefill rank {row['prefill_rank']} -> decode rank {row['decode_rank']}: {row['kv_transfer_bytes']:,} "
            f"bytes in {row['kv_transfer_s'] * 1e3:.3g} ms ({row['kv_transfer_bytes_per_s'] / 1e6:.4g} MB/s), "
            f"acknowledged {row['kv_ack_wait_s'] * 1e3:.3g} ms after it was offered"
        )
    }


def format_distributed(m: dict[str, Any]) -> str:
    """The text mode's lines on transfers, ranks and faults."""
    lines = [
        f"KV transfer: {m['kv_transfers']} requests, {m['kv_bytes_transferred']:,} bytes in "
        f"{m['kv_transfer_time_s'] * 1e3:.4g} ms ({m['kv_transfer_bytes_per_s'] / 1e6:.4g} MB/s) over "
        f"{m['payload_backend']}; {m['prefill_ranks']} prefill + {m['decode_ranks']} decode ranks"
    ]
    for r in m["ranks"]:
        state = f"lost ({r['lost']})" if r["lost"] else f"pool {r['pool_free_pages']}/{r['pool_pages']} pages free"
        delayed = f", {r['acks_delayed']} acknowledgements delayed" if r["acks_delayed"] else ""
        lines.append(f"rank {r['rank']} {r['role']}: {state}{delayed}")
    return "\n".join(lines + [f"fault: {f}" for f in m["faults"]])
