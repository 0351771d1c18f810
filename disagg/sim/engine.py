"""The discrete-event loop: requests arrive, are routed, prefilled, (moved,) decoded and leave.

Events are instance steps ending and KV transfers ending, kept in one heap; arrivals come from the sorted
request array and are merged in. Each instance runs one step at a time; when a step ends it plans the next at
once (continuous batching), so an instance with work is never idle.

Routing: a colocated request goes to the instance with the fewest unfinished requests; a disaggregated one to the
prefill instance with the fewest prompt tokens still to prefill, and after prefill to the decode instance with the
most free KV pages. A request whose KV can never fit an instance is rejected on arrival (counted as missing its
SLOs). When no decode instance has room, prefilled requests wait in arrival order, holding their prefill KV, so a
full decode tier slows prefill down (back-pressure) instead of losing requests.

KV transfer: a request's prompt KV (prompt × kv_bytes_per_token) goes from its prefill to its decode instance once
its prefill step ends (no layer-by-layer overlap), at the link bandwidth times the smaller of the two tensor-
parallel sizes (one link per GPU), plus the link latency. Each instance's link carries one transfer at a time, in
order; there is no other network contention.
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np

from disagg.roofline import ModelShape
from disagg.sim.cluster import Colocated, Deployment, Disaggregated, Pool, Serving
from disagg.sim.instance import CHUNKED, DECODE, FIRST, PREFILL, Instance
from disagg.sim.metrics import InstanceStats, SimResult
from disagg.sim.workload import Requests

_STEP, _TRANSFER = 0, 1


class _LeastLoaded:
    """The index with the smallest key among ``n``, with keys that change: a heap of (key, index) entries where
    an entry whose key is no longer the index's current one is stale and skipped."""

    def __init__(self, keys: list[int]) -> None:
        self.key = list(keys)
        self.heap = [(k, i) for i, k in enumerate(keys)]
        heapq.heapify(self.heap)

    def add(self, i: int, delta: int) -> None:
        self.key[i] += delta
        heapq.heappush(self.heap, (self.key[i], i))

    def best(self) -> int:
        heap, key = self.heap, self.key
        while heap[0][0] != key[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0][1]


def _pool(
    pool: Pool, role: str, first_idx: int, model: ModelShape, serving: Serving, shared: tuple, budget: int | None = None
) -> list[Instance]:
    cost = serving.cost(model, pool.device, pool.tp)
    pages = serving.kv_capacity_tokens(cost) // serving.page_size
    if pages == 0:
        raise ValueError(
            f"deployment: {model.name} does not fit {pool.describe()} with mem_util {serving.mem_util} "
            f"({cost.weight_bytes / 1e9:.0f} GB of weights): raise tp"
        )
    return [
        Instance(
            first_idx + i,
            role,
            cost,
            pages,
            serving.page_size,
            serving.max_batch,
            budget or serving.token_budget,
            *shared,
        )
        for i in range(pool.count)
    ]


def simulate(
    deployment: Deployment, requests: Requests, model: ModelShape, serving: Serving | None = None
) -> SimResult:
    """Serve ``requests`` on ``deployment`` and return every request's timings (see ``SimResult``)."""
    serving = serving or Serving()
    n = len(requests)
    arrival = requests.arrival.tolist()
    prompt = requests.prompt.tolist()
    output = requests.output.tolist()
    progress = [0] * n
    shared = (prompt, output, progress)
    first = [float("nan")] * n
    finish = [float("nan")] * n
    rejected = [False] * n
    in_system_at = [0] * n
    prefill_of = [0] * n

    disagg = isinstance(deployment, Disaggregated)
    if disagg:
        prefill = _pool(deployment.prefill, PREFILL, 0, model, serving, shared)
        decode = _pool(deployment.decode, DECODE, len(prefill), model, serving, shared)
        instances = prefill + decode
        link = deployment.link
        link_gpus = min(deployment.prefill.tp, deployment.decode.tp)
        kv_per_token = prefill[0].cost.kv_bytes_per_token
        router = _LeastLoaded([0] * len(prefill))  # prompt tokens queued per prefill instance
        decode_room = _LeastLoaded([-d.free for d in decode])  # most free pages first
        prefill_cap, decode_cap = prefill[0].capacity, decode[0].capacity
    elif isinstance(deployment, Colocated):
        role = CHUNKED if deployment.policy == "chunked" else FIRST
        instances = _pool(deployment.pool, role, 0, model, serving, shared, deployment.chunk)
        router = _LeastLoaded([0] * len(instances))  # unfinished requests per instance
    else:
        raise TypeError(f"deployment: expected Colocated or Disaggregated, got {type(deployment).__name__}")

    events: list[tuple[float, int, int, int, int]] = []
    seq = 0
    pending: deque[int] = deque()  # prefilled, waiting for room on a decode instance
    kv_sent = 0.0
    in_system = 0
    idle_with_work: list[Instance] = []

    def start(inst: Instance, now: float) -> None:
        nonlocal seq
        duration = inst.plan(now)
        if duration is None:
            inst.busy = False
            return
        inst.busy = True
        inst.busy_time += duration
        seq += 1
        heapq.heappush(events, (now + duration, seq, _STEP, inst.idx, inst.version))

    def add_work(inst: Instance, queue: deque, rid: int, now: float) -> None:
        """Queue ``rid`` on ``inst``: start it if idle (once every arrival at this instant is queued); if it is in a
        decode run and ``rid`` could be taken at once (the queue was empty: a non-empty one is blocked at its
        head), cut the run at the next step boundary."""
        nonlocal seq
        was_empty = not queue
        queue.append(rid)
        if not inst.busy:
            idle_with_work.append(inst)
        elif was_empty:
            end = inst.cut(now)
            if end is not None:
                seq += 1
                heapq.heappush(events, (end, seq, _STEP, inst.idx, inst.version))

    def start_idle(now: float) -> None:
        for inst in idle_with_work:
            if not inst.busy:
                start(inst, now)
        idle_with_work.clear()

    def done(rid: int, now: float) -> None:
        nonlocal in_system
        finish[rid] = now
        in_system -= 1

    def send(rid: int, now: float) -> bool:
        """Reserve room on the decode instance with the most free pages and start the KV transfer, if it fits."""
        nonlocal seq, kv_sent
        d = decode[decode_room.best()]
        need = d.reserve_pages(rid)
        if need > d.free:
            return False
        d.take(need)
        decode_room.add(d.idx - len(prefill), need)
        p = instances[prefill_of[rid]]
        nbytes = prompt[rid] * kv_per_token
        kv_sent += nbytes
        begin = max(now, p.link_free, d.link_free)
        end = begin + link.transfer_time(nbytes, link_gpus)
        p.link_free = d.link_free = end - link.latency
        seq += 1
        heapq.heappush(events, (end, seq, _TRANSFER, rid, d.idx))
        return True

    next_arrival = 0
    while True:
        if next_arrival < n and (not events or arrival[next_arrival] <= events[0][0]):
            rid = next_arrival
            next_arrival += 1
            now = arrival[rid]
            if disagg:
                fits = prefill[0].pages(prompt[rid]) <= prefill_cap and decode[0].reserve_pages(rid) <= decode_cap
            else:
                fits = instances[0].reserve_pages(rid) <= instances[0].capacity
            if fits:
                in_system += 1
                i = router.best()
                router.add(i, prompt[rid] if disagg else 1)
                prefill_of[rid] = i
                add_work(instances[i], instances[i].waiting, rid, now)
            else:
                rejected[rid] = True
            in_system_at[rid] = in_system
            if next_arrival == n or arrival[next_arrival] != now:
                start_idle(now)
            continue
        if not events:
            break
        now, _, kind, a, b = heapq.heappop(events)
        if kind == _TRANSFER:
            rid, d = a, instances[b]
            p = instances[prefill_of[rid]]
            p.release(rid)
            if not p.busy:
                start(p, now)
            add_work(d, d.joining, rid, now)
            start_idle(now)
            continue
        inst = instances[a]
        if b != inst.version:
            continue  # a decode run that was cut short: its end moved
        finished, prefilled = inst.complete()
        for rid in finished:
            done(rid, now)
            if not disagg:
                router.add(inst.idx, -1)
        if finished and disagg:
            decode_room.add(inst.idx - len(prefill), -sum(inst.reserve_pages(r) for r in finished))
            while pending and send(pending[0], now):
                pending.popleft()
        for rid in prefilled:
            first[rid] = now
            if inst.role == PREFILL:
                router.add(inst.idx, -prompt[rid])
                if output[rid] == 1:
                    inst.release(rid)
                    done(rid, now)
                elif pending or not send(rid, now):
                    pending.append(rid)
            elif output[rid] == 1:
                inst.release(rid)
                router.add(inst.idx, -1)
                done(rid, now)
            else:
                inst.join(rid)
        start(inst, now)

    assert in_system == 0 and not pending, "simulation ended with requests in flight"
    return SimResult(
        deployment=deployment.describe(),
        arrival=requests.arrival.copy(),
        prompt=requests.prompt.copy(),
        output=requests.output.copy(),
        first_token=np.array(first),
        finish=np.array(finish),
        rejected=np.array(rejected),
        in_system=np.array(in_system_at),
        kv_bytes_sent=kv_sent,
        gpus=deployment.gpus,
        hourly_cost=deployment.hourly_cost,
        devices=tuple(d.describe() for d in deployment.devices),
        instances=tuple(
            InstanceStats(
                role=i.role,
                busy_time=i.busy_time,
                steps=i.steps,
                prefill_tokens=i.prefill_tokens,
                decode_tokens=i.decode_tokens,
                capacity_pages=i.capacity,
                min_free_pages=i.min_free,
                free_pages_at_end=i.free,
            )
            for i in instances
        ),
    )
