"""Messages between the ranks of a distributed run, over torch.distributed point-to-point, and how a rank notices
that a peer is gone.

Wire format (never pickle). A control message is a :class:`Header`: HEADER_LEN int64 values on tag HEADER_TAG.
Bulk data (a request's KV export, a rank's final report) is one contiguous uint8 tensor on a tag of its own, sent
only after a header announced its size, so the receiver posts a buffer of exactly that size.

Liveness, from what gloo does (torch 2.13): ``Work.is_completed()`` of a send or receive stays False until
somebody waits on it; a peer that exits shows up as "Connection closed by peer" inside ``wait``; a stalled peer
shows up as nothing at all; and a ``wait`` that times out closes *every* pair of the rank (the whole gloo
context), not just the one it waited on. So every posted operation is waited on exactly once, by a daemon thread,
without a timeout, and the result goes to the rank's event queue; the timing is the main loop's, in :meth:`poll`:

- while a peer may still send to this rank, a receiving thread keeps one header receive posted for it; a peer
  whose last header arrived more than the timeout ago, or whose connection closed, is lost;
- a receiver always has a receive posted for what it expects (a KV payload's receive is posted before the payload
  is acknowledged), so a send it has not taken within the timeout means it is lost as well.

Each rank sends a heartbeat header from its main loop to every peer it has not sent anything to for a fifth of
the timeout (at most a second: a decode rank's headers also tell its free pages), so a rank that stops making
progress falls silent too: the timeout must exceed a
rank's longest step (on a GPU the first step includes Triton's compilation) and longest transfer. A wait on a
stalled peer never returns; :meth:`Transport.close` says so, and the process then leaves with ``os._exit``.

A conversation ends per direction: a header sent with ``last=True`` is the final one from its sender to that peer.
The sender stops sending and the receiver stops receiving, so ranks that finish normally leave no operation
pending between them, and one can exit without the other seeing a closed connection.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from disagg.errors import DistributedError

HEADER_LEN = 12
HEADER_TAG, REPORT_TAG, PAYLOAD_TAG0 = 0, 1, 2  # request i's KV export travels on tag PAYLOAD_TAG0 + i
MAGIC = 0x70686173_6174746E  # "phasattn": a header from anything else is refused
HEARTBEAT_FRACTION, MAX_HEARTBEAT_S = 0.2, 1.0
_NEVER = timedelta(days=7)  # how long waits inside gloo may take: never in practice, since a timeout there kills
#                             every pair of the rank; silence is judged by Transport.poll instead


class Kind(enum.IntEnum):
    """What a header says, and what its ``fields`` hold."""

    HEARTBEAT = 1  # still here
    META = 2  # a request's KV is ready: num_tokens, max_new_tokens, payload bytes, KV dtype code,
    #           age of its first token in microseconds, model digest (2 values)
    ACK = 3  # 1: pages reserved, send the payload; 0: refused (the decode rank reports the error)
    DONE = 4  # a prefill rank has no more requests for this decode rank
    DONE_ACK = 5  # the decode rank's answer to DONE
    REPORT = 6  # this rank's report follows on REPORT_TAG: its size in bytes
    FINAL = 7  # from rank 0: the run's exit status
    BYE = 8  # to rank 0, after a rank has logged its last line: rank 0 exits last


@dataclass(frozen=True)
class Header:
    """A control message. ``request``: a request's index (-1: none); ``free_pages``: the sender's free KV pages
    (decode ranks; -1 from prefill ranks); ``last``: no more headers follow from the sender to this receiver."""

    kind: Kind
    request: int = -1
    free_pages: int = -1
    fields: tuple[int, ...] = ()
    last: bool = False

    def encode(self) -> torch.Tensor:
        values = [MAGIC, int(self.kind), int(self.last), self.free_pages, self.request, *self.fields]
        if len(values) > HEADER_LEN:
            raise ValueError(f"a header holds {HEADER_LEN - 5} fields, got {len(self.fields)}")
        return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> Header:
        values = t.tolist()
        try:
            if len(values) != HEADER_LEN or values[0] != MAGIC:
                raise ValueError
            kind = Kind(values[1])
        except ValueError:
            raise DistributedError(
                f"received a malformed header {values} (do all ranks run the same version?)"
            ) from None
        return cls(kind, values[4], values[3], tuple(values[5:]), bool(values[2]))


def lost_reason(e: BaseException) -> str:
    """Why a peer counts as lost, in words, from what a wait on it raised."""
    text = str(e)
    if "closed by peer" in text or "reset by peer" in text:
        return "connection closed: the process exited"
    return text.splitlines()[0][:200] if text else type(e).__name__


class Pending:
    """One posted isend/irecv to or from ``peer``, waited on by a daemon thread. ``done`` is set when it completes
    or fails; then ``error`` says why it failed (None: it completed), ``finished`` says when (perf_counter), and
    ``on_done(self)`` runs on that thread. ``tensor`` stays alive until then."""

    def __init__(self, peer: int, work: dist.Work, tensor: torch.Tensor, started: float, on_done: Callable):
        self.peer, self.tensor, self.started = peer, tensor, started
        self.finished: float | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._wait, args=(work, on_done), daemon=True)
        self.thread.start()

    @property
    def seconds(self) -> float:
        """From posting to completion."""
        return (self.finished or time.perf_counter()) - self.started

    def data(self) -> bytes:
        """A completed receive's bytes, on the host."""
        return self.tensor.cpu().numpy().tobytes()

    def _wait(self, work: dist.Work, on_done: Callable) -> None:
        try:
            if self.tensor.is_cuda:  # NCCL's wait() only orders the current stream: poll the host-side status
                while not work.is_completed():
                    time.sleep(0.0005)
            else:
                work.wait(_NEVER)
        except Exception as e:  # gloo raises RuntimeError or DistBackendError carrying the transport's message
            self.error = lost_reason(e)
        self.finished = time.perf_counter()
        self.done.set()
        on_done(self)


@dataclass
class Event:
    """What the main loop hears about a peer: a header arrived (at perf_counter ``at``), a bulk transfer finished
    (``done``; check its ``error``), or the peer is lost (``lost``: why)."""

    peer: int
    header: Header | None = None
    done: Pending | None = None
    lost: str | None = None
    at: float = 0.0


class Transport:
    """Point-to-point messaging between ``rank`` and ``peers``, both directions open at the start.

    Args:
        timeout_s: silence after which a peer counts as lost.
        free_pages: stamps every header this rank sends (a decode rank's free KV pages).
        payload_device: where bulk tensors live: the CPU for gloo, this rank's GPU when they go over NCCL.
    """

    def __init__(
        self,
        rank: int,
        peers: Iterable[int],
        timeout_s: float,
        free_pages: Callable[[], int] = lambda: -1,
        payload_device: torch.device | str = "cpu",
    ):
        self.rank, self.timeout_s = rank, timeout_s
        self.heartbeat_s = min(timeout_s * HEARTBEAT_FRACTION, MAX_HEARTBEAT_S)
        self.free_pages, self.payload_device = free_pages, torch.device(payload_device)
        self.sending: set[int] = set(peers)  # peers this rank may still send headers to
        self.receiving: set[int] = set(self.sending)  # peers that may still send headers to this rank
        self.lost: dict[int, str] = {}
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._post_lock = threading.Lock()  # the main and the receiving threads post one at a time
        self._sends: list[Pending] = []
        self._threads: list[tuple[int, threading.Thread]] = []  # (peer, a thread waiting inside torch.distributed)
        self._last_sent = dict.fromkeys(self.sending, time.perf_counter())
        self._last_heard = dict.fromkeys(self.sending, time.perf_counter())
        for peer in sorted(self.receiving):
            self._threads.append((peer, threading.Thread(target=self._receive_headers, args=(peer,), daemon=True)))
            self._threads[-1][1].start()

    # --- sending -----------------------------------------------------------------------------------------------
    def send(self, peer: int, kind: Kind, request: int = -1, fields: tuple[int, ...] = (), last: bool = False) -> None:
        """Send a header (nothing happens if ``peer`` is lost). ``last``: the final header to ``peer``."""
        if peer in self.lost:
            return
        if peer not in self.sending:
            raise RuntimeError(f"rank {self.rank} already sent its last header to rank {peer}")
        header = Header(kind, request, self.free_pages(), fields, last)
        self._post(peer, header.encode(), HEADER_TAG, send=True, on_done=self._header_sent)
        self._last_sent[peer] = time.perf_counter()
        if last:
            self.sending.discard(peer)

    def send_bytes(self, peer: int, tag: int, data: bytes, *, payload: bool = True) -> Pending | None:
        """Send ``data`` as one uint8 tensor, from the payload device (``payload=False``: from the host, over gloo,
        as control data). The transfer comes back as an Event when it is done; None: the peer is already lost
        (that comes back as an Event too)."""
        device = self.payload_device if payload else "cpu"
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        return self._post(peer, tensor, tag, send=True, on_done=self._bulk_done)

    def recv_bytes(self, peer: int, tag: int, nbytes: int, *, payload: bool = True) -> Pending | None:
        """Post a receive of exactly ``nbytes`` bytes; like :meth:`send_bytes` it comes back as an Event."""
        device = self.payload_device if payload else "cpu"
        tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self._post(peer, tensor, tag, send=False, on_done=self._bulk_done)

    def heartbeat(self) -> None:
        """Send a heartbeat to every peer still listening that has heard nothing from this rank for a while."""
        now = time.perf_counter()
        for peer in sorted(self.sending - set(self.lost)):
            if now - self._last_sent[peer] >= self.heartbeat_s:
                self.send(peer, Kind.HEARTBEAT)

    def flush(self) -> None:
        """Wait (at most the timeout) until every send to a peer not lost has completed or failed, so that a rank
        exiting next has delivered its last messages."""
        deadline = time.perf_counter() + self.timeout_s
        for p in self._sends:
            if p.peer not in self.lost:
                p.done.wait(max(0.0, deadline - time.perf_counter()))

    def close(self, wait: bool) -> bool:
        """True when no thread of this transport waits inside torch.distributed any more. ``wait``: after a normal
        end, give the threads on peers not lost up to the timeout to see their last message (the others, and all
        of them after a failure, get a moment). False if one still waits: on a stalled peer it never returns."""
        now = time.perf_counter()
        for peer, t in self._threads:
            t.join(self.timeout_s if wait and peer not in self.lost else 0.1)
            if time.perf_counter() - now > self.timeout_s:
                break
        return not any(t.is_alive() for _, t in self._threads)

    def _post(self, peer: int, tensor: torch.Tensor, tag: int, *, send: bool, on_done: Callable) -> Pending | None:
        started = time.perf_counter()
        try:
            with self._post_lock:
                work = (dist.isend if send else dist.irecv)(tensor, peer, tag=tag)
        except Exception as e:  # the pair is closed already
            self._events.put(Event(peer, lost=lost_reason(e)))
            return None
        pending = Pending(peer, work, tensor, started, lambda p: on_done(peer, p))
        self._threads = [(q, t) for q, t in self._threads if t.is_alive()] + [(peer, pending.thread)]
        if send:
            self._sends = [p for p in self._sends if not p.done.is_set()] + [pending]
        return pending

    def _header_sent(self, peer: int, p: Pending) -> None:
        if p.error is not None:
            self._events.put(Event(peer, lost=p.error))

    def _bulk_done(self, peer: int, p: Pending) -> None:
        self._events.put(Event(peer, done=p))
        if p.error is not None:
            self._events.put(Event(peer, lost=p.error))

    # --- receiving ---------------------------------------------------------------------------------------------
    def _receive_headers(self, peer: int) -> None:
        while True:
            buf = torch.empty(HEADER_LEN, dtype=torch.int64)
            try:
                with self._post_lock:
                    work = dist.irecv(buf, peer, tag=HEADER_TAG)
                work.wait(_NEVER)
                header = Header.decode(buf)
            except Exception as e:
                self._events.put(Event(peer, lost=lost_reason(e)))
                return
            self._events.put(Event(peer, header=header, at=time.perf_counter()))
            if header.last:
                return

    def poll(self, wait_s: float) -> list[Event]:
        """The events since the last poll, waiting up to ``wait_s`` for the first, then a loss for every peer silent
        for the timeout or not taking a send for as long. A lost peer is reported once, and headers from it are
        dropped afterwards (finished transfers are always reported)."""
        events = []
        try:
            events.append(self._events.get(timeout=wait_s) if wait_s > 0 else self._events.get_nowait())
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        for e in events:
            if e.header is not None:
                self._last_heard[e.peer] = max(self._last_heard[e.peer], e.at)
        now = time.perf_counter()
        silent = {p for p in self.receiving if now - self._last_heard[p] > self.timeout_s}
        stuck = {p.peer for p in self._sends if not p.done.is_set() and now - p.started > self.timeout_s}
        stuck -= set(self.lost)
        for peer in sorted(silent | stuck):
            what = "no message from it" if peer in silent else "a message to it not taken"
            events.append(Event(peer, lost=f"{what} for {self.timeout_s:g} s"))
        kept = []
        for e in events:
            if e.peer in self.lost and e.done is None:
                continue
            if e.lost is not None:
                self.lost[e.peer] = e.lost
                self.sending.discard(e.peer)
                self.receiving.discard(e.peer)
            elif e.header is not None and e.header.last:
                self.receiving.discard(e.peer)
            kept.append(e)
        return kept
