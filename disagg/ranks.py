"""The ranks of a distributed run and the protocol between them (:mod:`disagg.transport` carries the messages).

Ranks 0 .. P-1 prefill, the others decode. Every rank parses the same command line, so every rank knows every
request; request i is prefilled by the rank :func:`assign_requests` gives it. Its KV then crosses in four steps:

1. META, prefill → decode: request index, prompt tokens, max_new_tokens, payload bytes, KV dtype, model digest,
   sent to the live decode rank with the most free pages by the prefill rank's latest knowledge (every header from
   a decode rank carries its free pages) less the pages of its own requests offered there and not yet answered;
2. the decode rank checks the header and, in arrival order, reserves the pages the request will need over its whole
   life (:meth:`DecodeStage.reserve`: prompt + max_new_tokens - 1 tokens, capped at the context), posts a receive of
   exactly the payload's size, and only then answers ACK. A full pool delays the ACK, so the sender waits: nothing
   is dropped. A request that can never fit is refused (ACK 0) and the decode rank reports why;
3. the payload, the request's export bytes (:mod:`disagg.export`), moves as one contiguous buffer;
4. :meth:`DecodeStage.add` verifies it with ``read_export`` (the checksum by logical position) and places it into
   the reserved pages; the request joins the decode batch.

When all its requests are handed over, a prefill rank sends DONE to each decode rank, which answers DONE_ACK. Each
rank then sends its REPORT (outputs, transfer measurements, metrics, pool state) to rank 0, which, once every rank
has reported or been lost, sends FINAL with the run's exit status to the others, and waits for their BYE (sent
once they have logged their last line: a launcher that stops every rank when one exits non-zero, like torchrun,
cuts nobody short) before it prints the outputs and exits.

A lost peer (silent for the timeout, or its connection closed): a decode rank fails the requests of a lost prefill
rank whose KV has not arrived, freeing their reservations, and finishes the others; a prefill rank offers again the
requests a lost decode rank had not acknowledged and fails those whose payload was in flight; a rank that loses
rank 0 aborts, since nobody could report its outputs. Any loss makes the exit status non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from disagg.decode import DecodeStage
from disagg.errors import DistributedError, EngineError, RequestError
from disagg.export import export_bytes_bound
from disagg.prefill import PrefillResult, PrefillStage
from disagg.request import Request, RequestOutput
from disagg.transport import PAYLOAD_TAG0, REPORT_TAG, Event, Header, Kind, Pending, Transport

KV_DTYPE_CODES = ("float32", "float16", "bfloat16", "float8_e4m3fn")


@dataclass(frozen=True)
class Layout:
    """Which rank does what: ranks below ``num_prefill`` prefill, the others decode."""

    world_size: int
    num_prefill: int

    @property
    def prefill_ranks(self) -> range:
        return range(self.num_prefill)

    @property
    def decode_ranks(self) -> range:
        return range(self.num_prefill, self.world_size)

    def role(self, rank: int) -> str:
        return "prefill" if rank < self.num_prefill else "decode"

    def name(self, rank: int) -> str:
        return f"{self.role(rank)} rank {rank}"

    def peers(self, rank: int) -> set[int]:
        """The ranks ``rank`` talks to: prefill ↔ decode, and everyone ↔ rank 0 (which collects the reports)."""
        other = self.decode_ranks if rank < self.num_prefill else self.prefill_ranks
        return ({*other, 0} if rank != 0 else set(range(1, self.world_size))) - {rank}


def assign_requests(prompt_lengths: list[int], num_prefill: int) -> list[int]:
    """The prefill rank of each request: in order, the rank with the fewest prompt tokens so far (ties: the lowest),
    so every rank computes the same spread."""
    load, ranks = [0] * num_prefill, []
    for n in prompt_lengths:
        rank = min(range(num_prefill), key=lambda r: (load[r], r))
        ranks.append(rank)
        load[rank] += max(n, 1)
    return ranks


class Rank:
    """What both roles share: the main loop, the end of the run (REPORT / FINAL) and losing peers. Subclasses
    implement :meth:`work`, :meth:`handle`, :meth:`transfer_done`, :meth:`peer_lost`, :meth:`abort`,
    :attr:`serving` and :meth:`report`."""

    role = ""

    def __init__(self, rank: int, layout: Layout, transport: Transport, requests: list[Request], log: Callable):
        self.rank, self.layout, self.transport, self.requests, self.log = rank, layout, transport, requests, log
        self.outputs: dict[int, RequestOutput] = {}  # by request index: the outputs this rank reports
        self.faults: list[str] = []
        self.reports: dict[int, dict[str, Any]] = {}  # rank 0: the other ranks' reports
        self.status: int | None = None  # the run's exit status, from FINAL (ranks other than 0)
        self._report_transfers: dict[int, Pending] = {}
        self._reported = False

    def run(self) -> None:
        """Serve until the run is over for this rank (rank 0: every other rank reported or was lost)."""
        while not self._finished():
            busy = self.work()
            for event in self.transport.poll(0.0 if busy else self.transport.heartbeat_s / 2):
                self._on_event(event)
            if self.rank != 0 and not self.serving and not self._reported and 0 not in self.transport.lost:
                data = json.dumps(self.report()).encode()
                self.transport.send(0, Kind.REPORT, fields=(len(data),))
                self.transport.send_bytes(0, REPORT_TAG, data, payload=False)
                self._reported = True
            self.transport.heartbeat()

    def finish(self, status: int) -> bool:
        """Rank 0: tell every rank still listening the run's exit status, and wait for each one's BYE. False if a
        rank was lost meanwhile."""
        for peer in sorted(self.transport.sending):
            self.transport.send(peer, Kind.FINAL, fields=(status,), last=True)
        all_said_bye = True
        while self.transport.receiving:
            for event in self.transport.poll(self.transport.heartbeat_s / 2):
                if event.lost is not None:
                    self.log(f"error: {self.layout.name(event.peer)} was lost before its BYE: {event.lost}")
                    all_said_bye = False
        self.transport.flush()
        return all_said_bye

    def goodbye(self) -> None:
        """Ranks other than 0, at the very end: the last message to rank 0."""
        if 0 not in self.transport.lost and 0 in self.transport.sending:
            self.transport.send(0, Kind.BYE, last=True)
            self.transport.flush()

    def _finished(self) -> bool:
        if self.rank != 0:
            return self.status is not None or 0 in self.transport.lost
        others = range(1, self.layout.world_size)
        return not self.serving and all(r in self.reports or r in self.transport.lost for r in others)

    def _on_event(self, e: Event) -> None:
        if e.lost is not None:
            self.faults.append(f"{self.layout.name(e.peer)} was lost: {e.lost}")
            self.log(f"error: {self.faults[-1]}")
            if e.peer == 0:
                self.abort()
            else:
                self.peer_lost(e.peer, e.lost)
        elif e.done is not None:
            if self._report_transfers.get(e.peer) is e.done:
                if e.done.error is None:  # else the peer is reported lost next
                    self.reports[e.peer] = json.loads(e.done.data())
            else:
                self.transfer_done(e.peer, e.done)
        elif e.header.kind == Kind.REPORT:
            nbytes = e.header.fields[0]
            self._report_transfers[e.peer] = self.transport.recv_bytes(e.peer, REPORT_TAG, nbytes, payload=False)
        elif e.header.kind == Kind.FINAL:
            self.status = e.header.fields[0]
        else:
            self.handle(e.peer, e.header)

    def failed(self, index: int, error: str) -> None:
        r = self.requests[index]
        self.outputs[index] = RequestOutput(r.request_id, r.prompt_ids, error=error)

    def base_report(self, stage: PrefillStage | DecodeStage) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "role": self.role,
            "outputs": [o.to_dict() for _, o in sorted(self.outputs.items())],
            "metrics": dataclasses.asdict(stage.metrics),
            "pool_pages": stage.pool.num_pages,
            "pool_free_pages": stage.pool.num_free_pages,
            "faults": self.faults,
        }

    # --- the role's part ---------------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        raise NotImplementedError

    def work(self) -> bool:
        """Do one unit of work; True if there was any (then the loop does not wait for messages)."""
        raise NotImplementedError

    def handle(self, peer: int, header: Header) -> None:
        raise NotImplementedError

    def transfer_done(self, peer: int, pending: Pending) -> None:
        raise NotImplementedError

    def peer_lost(self, peer: int, reason: str) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Drop every request and free every page (rank 0 is lost: nobody would receive the outputs)."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class _Offered:
    decode_rank: int
    result: PrefillResult
    when: float
    pages: int


class PrefillRank(Rank):
    """Prefills its share of the requests and hands each one's KV to a decode rank.

    ``pages_needed(num_tokens, max_new_tokens)``: decode pages a request reserves; ``decode_pages``: the pages of
    each decode rank's pool; ``meta``: the (KV dtype code, model digest 0, model digest 1) every META carries."""

    role = "prefill"

    def __init__(
        self,
        *args: Any,
        stage: PrefillStage,
        assignment: list[int],
        decode_pages: dict[int, int],
        pages_needed: Callable[[int, int], int],
        meta: tuple[int, int, int],
    ):
        super().__init__(*args)
        self.stage, self.pages_needed, self.meta = stage, pages_needed, meta
        self.transfers: dict[int, dict[str, Any]] = {}  # by request index
        self._mine = [i for i, r in enumerate(assignment) if r == self.rank]
        self._ready: deque[PrefillResult] = deque()
        self._offered: dict[int, _Offered] = {}  # waiting for their ACK
        self._sending: dict[int, tuple[int, Pending, float, int]] = {}  # decode rank, transfer, ACK wait, bytes
        self._free = dict(decode_pages)  # each decode rank's free pages, as it last said
        self._offered_pages = dict.fromkeys(self.layout.decode_ranks, 0)
        self._done_sent = False
        self._awaiting_done_ack = set(self.layout.decode_ranks)
        for i in self._mine:
            try:
                self.stage.add(self.requests[i])
            except EngineError as e:
                self.failed(i, str(e))

    @property
    def serving(self) -> bool:
        return not self._done_sent or bool(self._awaiting_done_ack)

    def work(self) -> bool:
        busy = self.stage.has_work
        if busy:
            self._ready.extend(self.stage.step())
        self._offer_ready()
        if not (self._done_sent or busy or self._ready or self._offered or self._sending):
            for d in self._live_decode():
                self.transport.send(d, Kind.DONE, last=self.rank != 0)  # rank 0 still sends FINAL later
            self._done_sent = True
        return busy

    def _live_decode(self) -> list[int]:
        return [d for d in self.layout.decode_ranks if d not in self.transport.lost]

    def _offer_ready(self) -> None:
        while self._ready:
            res = self._ready.popleft()
            i, live = int(res.request.request_id), self._live_decode()
            if not live:
                self.failed(i, f"request {i}: no decode rank is left to serve it ({'; '.join(self.faults)})")
                continue
            n, max_new = len(res.request.prompt_ids), res.request.sampling.max_new_tokens
            # the most free pages; ties go round-robin from a different decode rank for each prefill rank
            decode = self.layout.decode_ranks
            d = min(
                live, key=lambda d: (self._offered_pages[d] - self._free[d], (d - decode[0] - self.rank) % len(decode))
            )
            age_us = int((time.perf_counter() - res.first_token_time) * 1e6)
            kv_code, *digest = self.meta
            self.transport.send(d, Kind.META, i, (n, max_new, len(res.export), kv_code, age_us, *digest))
            offered = _Offered(d, res, time.perf_counter(), self.pages_needed(n, max_new))
            self._offered[i] = offered
            self._offered_pages[d] += offered.pages

    def handle(self, peer: int, header: Header) -> None:
        if peer in self._free and header.free_pages >= 0:
            self._free[peer] = header.free_pages
        if header.kind == Kind.ACK:
            i = header.request
            offered = self._offered.pop(i, None)
            if offered is None or offered.decode_rank != peer:
                raise DistributedError(f"{self.layout.name(peer)} acknowledged request {i}, never offered to it")
            self._offered_pages[peer] -= offered.pages
            self.transfers[i] = {"decode_rank": peer, "cached_tokens": offered.result.cached_tokens}
            if header.fields[0] == 1:
                data = offered.result.export
                sending = self.transport.send_bytes(peer, PAYLOAD_TAG0 + i, data)
                if sending is not None:
                    self._sending[i] = (peer, sending, time.perf_counter() - offered.when, len(data))
        elif header.kind == Kind.DONE_ACK:
            self._awaiting_done_ack.discard(peer)

    def transfer_done(self, peer: int, pending: Pending) -> None:
        for i, (d, sending, ack_wait, nbytes) in list(self._sending.items()):
            if sending is pending:
                del self._sending[i]
                if pending.error is not None:
                    self.failed(i, f"request {i}: sending its KV to {self.layout.name(d)} failed: {pending.error}")
                else:
                    self.transfers[i] |= {
                        "kv_transfer_bytes": nbytes,
                        "kv_transfer_s": pending.seconds,
                        "kv_transfer_bytes_per_s": nbytes / pending.seconds,
                        "kv_ack_wait_s": ack_wait,
                    }

    def peer_lost(self, peer: int, reason: str) -> None:
        self._awaiting_done_ack.discard(peer)
        for i, offered in list(self._offered.items()):
            if offered.decode_rank == peer:  # never acknowledged: the request can go elsewhere
                del self._offered[i]
                self._ready.append(offered.result)
        for i, (d, *_) in list(self._sending.items()):
            if d == peer:
                del self._sending[i]
                self.failed(i, f"request {i}: {self.layout.name(d)} was lost ({reason}) while its KV was in flight")
        self._offer_ready()

    def abort(self) -> None:
        self.stage.abort_all()
        self._ready.clear()
        self._offered.clear()
        self._sending.clear()
        self._done_sent, self._awaiting_done_ack = True, set()

    def report(self) -> dict[str, Any]:
        return {**self.base_report(self.stage), "requests": self._mine, "transfers": self.transfers}


@dataclass
class _Offer:
    prefill_rank: int
    index: int
    num_tokens: int
    max_new_tokens: int
    nbytes: int
    first_token_time: float  # perf_counter on this rank
    delayed: bool = False


class DecodeRank(Rank):
    """Reserves pages for offered requests, receives their KV and decodes them.

    ``meta``: the (KV dtype code, model digest 0, model digest 1) a META must carry."""

    role = "decode"

    def __init__(self, *args: Any, stage: DecodeStage, meta: tuple[int, int, int]):
        super().__init__(*args)
        self.stage, self.meta = stage, meta
        self.acks_delayed = 0  # offers that found the pool full
        self._offers: deque[_Offer] = deque()  # waiting for pages, in arrival order
        self._receiving: dict[int, tuple[_Offer, Pending]] = {}
        self._open = set(self.layout.prefill_ranks)  # prefill ranks that may still offer requests

    @property
    def serving(self) -> bool:
        return bool(self._open or self._offers or self._receiving or self.stage.has_work)

    def handle(self, peer: int, header: Header) -> None:
        if header.kind == Kind.META:
            i = header.request
            known = i in self.outputs or i in self._receiving or any(o.index == i for o in self._offers)
            if not 0 <= i < len(self.requests) or known:
                raise DistributedError(f"{self.layout.name(peer)} offered request {i}, unknown or offered before")
            problem = self._check_meta(header)
            if problem is None:
                n, max_new, nbytes, _, age_us, *_ = header.fields
                first_token_time = time.perf_counter() - age_us / 1e6
                self._offers.append(_Offer(peer, i, n, max_new, nbytes, first_token_time))
            else:
                self.failed(i, f"request {i}: refused by {self.layout.name(self.rank)}: {problem}")
                self.transport.send(peer, Kind.ACK, i, (0,))
        elif header.kind == Kind.DONE:
            self._open.discard(peer)
            self.transport.send(peer, Kind.DONE_ACK, last=peer != 0)  # rank 0 still receives the REPORT

    def _check_meta(self, header: Header) -> str | None:
        n, max_new, nbytes, kv_code, _, *digest = header.fields
        if tuple(digest) != self.meta[1:] or kv_code != self.meta[0]:
            code = KV_DTYPE_CODES[kv_code] if 0 <= kv_code < len(KV_DTYPE_CODES) else kv_code
            return f"made for another model or KV dtype (KV dtype {code}, here {KV_DTYPE_CODES[self.meta[0]]})"
        request = self.requests[header.request]
        if (n, max_new) != (len(request.prompt_ids), request.sampling.max_new_tokens):
            return f"{n} tokens and max_new_tokens {max_new} do not match the request"
        fewest, most = export_bytes_bound(self.stage.pool, n)
        if not fewest <= nbytes <= most:
            return f"a payload of {nbytes} bytes cannot hold the KV of {n} tokens"
        return None

    def work(self) -> bool:
        while self._offers:
            offer = self._offers[0]
            rid = self.requests[offer.index].request_id
            try:
                reserved = self.stage.reserve(rid, offer.num_tokens, offer.max_new_tokens)
            except RequestError as e:
                self._offers.popleft()
                self.failed(offer.index, str(e))
                self.transport.send(offer.prefill_rank, Kind.ACK, offer.index, (0,))
                continue
            if not reserved:
                self.acks_delayed += not offer.delayed
                offer.delayed = True
                break  # in arrival order: later offers wait behind this one
            self._offers.popleft()
            receiving = self.transport.recv_bytes(offer.prefill_rank, PAYLOAD_TAG0 + offer.index, offer.nbytes)
            if receiving is None:  # the prefill rank is lost (the loss is reported next)
                self.stage.release(rid)
                self.failed(offer.index, f"request {offer.index}: {self.layout.name(offer.prefill_rank)} was lost")
                continue
            self._receiving[offer.index] = (offer, receiving)
            self.transport.send(offer.prefill_rank, Kind.ACK, offer.index, (1,))
        if not self.stage.has_work:
            return False
        for out in self.stage.step():
            self.outputs[int(out.request_id)] = out
        return True

    def transfer_done(self, peer: int, pending: Pending) -> None:
        for i, (offer, receiving) in list(self._receiving.items()):
            if receiving is pending:
                del self._receiving[i]
                rid = self.requests[i].request_id
                try:
                    if pending.error is not None:
                        raise DistributedError(f"its KV did not arrive from {self.layout.name(peer)}: {pending.error}")
                    self.stage.add(pending.data(), first_token_time=offer.first_token_time)
                except EngineError as e:
                    self.stage.release(rid)
                    self.failed(i, f"request {i}: {e}")

    def peer_lost(self, peer: int, reason: str) -> None:
        self._open.discard(peer)
        lost = [o for o in self._offers if o.prefill_rank == peer]
        lost += [o for o, _ in self._receiving.values() if o.prefill_rank == peer]
        self._offers = deque(o for o in self._offers if o.prefill_rank != peer)
        for offer in lost:
            self._receiving.pop(offer.index, None)
            self.stage.release(self.requests[offer.index].request_id)
            self.failed(
                offer.index,
                f"request {offer.index}: {self.layout.name(peer)} was lost ({reason}) before its KV arrived",
            )

    def abort(self) -> None:
        self.stage.abort_all()
        self._offers.clear()
        self._receiving.clear()
        self._open.clear()

    def report(self) -> dict[str, Any]:
        return {**self.base_report(self.stage), "acks_delayed": self.acks_delayed}
