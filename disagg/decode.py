"""The decode stage: imported KV in, generated tokens out, with continuous batching.

:meth:`DecodeStage.add` verifies an export completely (:func:`disagg.export.read_export`) and queues the request;
nothing is allocated for a refused one. Each :meth:`DecodeStage.step`:

1. admits waiting requests in arrival order while the batch has room and the pool has the pages for a request's
   whole life (prompt + max_new_tokens - 1 tokens, capped at the model's context), re-paging its exported K/V into
   this pool, whose page size may differ from the prefill pool's. A request that does not fit waits for pages to
   come back; one that could never fit is refused at ``add``. Reserving up front means a running request never
   runs out of pages, so nothing is ever preempted;
2. runs the model once for the batch's newest tokens (``kernels.write_kv_cache`` stores their K/V,
   ``kernels.paged_decode_attention`` attends over each sequence's pages);
3. samples, and retires requests that hit a stop token, max_new_tokens or the context, freeing their pages.

Requests therefore join and leave the batch between steps.

A receiver that learns of a request before its export arrives (a distributed decode rank, :mod:`disagg.ranks`)
calls :meth:`DecodeStage.reserve` first: the same pages are allocated then, and :meth:`DecodeStage.add` later
places the export straight into them (:meth:`DecodeStage.release` frees a reservation whose export never comes).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import torch

from disagg.attention import DecodeBatch
from disagg.errors import RequestError
from disagg.export import KVExport, read_export
from disagg.kv_pool import KVPool
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.request import RequestOutput
from disagg.sampling import sample


def reserved_tokens(num_tokens: int, max_new_tokens: int, context: int) -> int:
    """Tokens of KV a request holds in the decode pool over its whole life: its prompt and every generated token
    but the last (which is never fed back), at most the model's ``context``."""
    return min(num_tokens + max_new_tokens - 1, context)


@dataclass
class _Sequence:
    key: int
    export: KVExport
    reserve: int  # tokens of KV this request can ever hold
    first_token_time: float
    output_ids: list[int] = field(default_factory=list)
    kv_len: int = 0  # tokens whose K/V are in the pool
    holds_pages: bool = False  # its pages were reserved before its export arrived

    @property
    def request_id(self) -> str:
        return self.export.request_id


class DecodeStage:
    """Decode with ``model`` from ``pool``, at most ``max_batch_size`` sequences per step.

    ``num_splits`` is passed to ``paged_decode_attention`` (None: the kernel picks the split-KV factor).
    """

    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        *,
        max_batch_size: int = 64,
        metrics: Metrics | None = None,
        num_splits: int | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.pool, self.max_batch_size, self.num_splits = model, pool, max_batch_size, num_splits
        self.metrics = metrics if metrics is not None else Metrics()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._done: list[RequestOutput] = []
        self._reserved: dict[str, tuple[int, int]] = {}  # request id -> (pool key, tokens reserved)
        self._keys = count()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._done)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def add(self, data: bytes, *, first_token_time: float | None = None) -> str:
        """Verify export bytes and queue their request; returns its id. ``first_token_time`` (perf_counter) is
        when its first token appeared, default now. Raises ExportError or RequestError, allocating nothing."""
        start = time.perf_counter()
        export = read_export(data, self.model, self.pool)
        if self._holds(export.request_id):
            raise RequestError(f"request {export.request_id} is already in the decode stage")
        n = export.num_tokens
        reserve = self._life_tokens(n, export.sampling.max_new_tokens)
        reserved = self._reserved.get(export.request_id)
        if reserved is not None and reserved[1] != reserve:
            raise RequestError(
                f"request {export.request_id}: its export needs {reserve} tokens of KV, {reserved[1]} were reserved"
            )
        key = reserved[0] if reserved is not None else next(self._keys)
        arrived = start if first_token_time is None else first_token_time
        seq = _Sequence(key, export, reserve, arrived, [export.first_token], n, holds_pages=reserved is not None)
        reason = self._finish_reason(seq)
        if reason is None and reserved is None:
            self._check_fits(export.request_id, reserve)
        self._reserved.pop(export.request_id, None)
        self.metrics.import_time_s += time.perf_counter() - start
        self.metrics.imports += 1
        if reason is None:
            self._waiting.append(seq)
        else:
            self.pool.free(key)
            self._done.append(self._output(seq, reason))
        return export.request_id

    def reserve(self, request_id: str, num_tokens: int, max_new_tokens: int) -> bool:
        """Allocate now the pages a request of ``num_tokens`` prompt tokens will need over its whole life (the
        admission rule above), before its export arrives. False, allocating nothing, when they are not free yet;
        RequestError when they never will be (more than the whole pool) or the request is already here."""
        if self._holds(request_id) or request_id in self._reserved:
            raise RequestError(f"request {request_id} is already in the decode stage")
        tokens = self._life_tokens(num_tokens, max_new_tokens)
        self._check_fits(request_id, tokens)
        if not self.pool.can_allocate(tokens):
            return False
        key = next(self._keys)
        self.pool.allocate(key, tokens)
        self._reserved[request_id] = (key, tokens)
        return True

    def release(self, request_id: str) -> bool:
        """Free the reservation of a request whose export will not come; True if it had one."""
        key, _ = self._reserved.pop(request_id, (None, 0))
        if key is not None:
            self.pool.free(key)
        return key is not None

    def _holds(self, request_id: str) -> bool:
        return any(s.request_id == request_id for s in [*self._waiting, *self._running]) or any(
            o.request_id == request_id for o in self._done
        )

    def _life_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return reserved_tokens(num_tokens, max_new_tokens, self.model.config.max_position_embeddings)

    def _check_fits(self, request_id: str, tokens: int) -> None:
        if self.pool.pages_for(tokens) > self.pool.num_pages:
            raise RequestError(
                f"request {request_id}: prompt + max_new_tokens need {tokens} tokens of KV, more than the "
                f"decode pool holds ({self.pool.capacity})"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is, freeing its pages; returns its output (finish_reason "aborted")."""
        for seq in [*self._waiting, *self._running]:
            if seq.request_id == request_id:
                self._waiting = deque(s for s in self._waiting if s is not seq)
                self._running = [s for s in self._running if s is not seq]
                self.pool.free(seq.key)
                return self._output(seq, "aborted")
        return None

    def abort_all(self) -> None:
        """Drop every request (reserved, waiting, running or finished but not yet returned), freeing all their
        pages."""
        for seq in [*self._waiting, *self._running]:
            self.pool.free(seq.key)
        for request_id in list(self._reserved):
            self.release(request_id)
        self._waiting, self._running, self._done = deque(), [], []

    def step(self) -> list[RequestOutput]:
        """Admit, run one decode step, retire. Returns the requests that finished."""
        self._admit()
        done, self._done = self._done, []
        if not self._running:
            return done
        start = time.perf_counter()
        device, pool, batch = self.model.device, self.pool, self._running
        ids = torch.tensor([s.output_ids[-1] for s in batch], dtype=torch.int64, device=device)
        positions = torch.tensor([s.kv_len for s in batch], dtype=torch.int64, device=device)
        slots = torch.cat([pool.slots(s.key, s.kv_len, s.kv_len + 1) for s in batch]).to(device)
        seq_lens = (positions + 1).to(torch.int32)
        meta = DecodeBatch(pool, pool.block_table([s.key for s in batch]), seq_lens, slots, self.num_splits)
        logits = self.model.logits(self.model(ids, positions, meta))
        tokens = sample(logits, [s.export.sampling for s in batch], [len(s.output_ids) for s in batch])
        self.metrics.decode_time_s += time.perf_counter() - start
        self.metrics.decode_tokens += len(batch)
        self.metrics.decode_steps += 1

        still = []
        for seq, token in zip(batch, tokens, strict=True):
            seq.kv_len += 1
            seq.output_ids.append(token)
            reason = self._finish_reason(seq)
            if reason is None:
                still.append(seq)
            else:
                pool.free(seq.key)
                done.append(self._output(seq, reason))
        self._running = still
        return done

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            if not seq.holds_pages and not self.pool.can_allocate(seq.reserve):
                return  # in order: the head of the queue waits for pages, so it is never starved
            start = time.perf_counter()
            if not seq.holds_pages:
                self.pool.allocate(seq.key, seq.reserve)
            slots = self.pool.slots(seq.key, 0, seq.export.num_tokens)
            for layer in range(self.pool.num_layers):
                self.pool.load_tokens(layer, slots, seq.export.k[layer], seq.export.v[layer])
            seq.export.k, seq.export.v = [], []  # the pool holds them now
            self.metrics.import_time_s += time.perf_counter() - start
            self._running.append(self._waiting.popleft())

    def _finish_reason(self, seq: _Sequence) -> str | None:
        params = seq.export.sampling
        if seq.output_ids[-1] in (params.eos_token_ids or ()):
            return "eos"
        total = seq.export.num_tokens + len(seq.output_ids)
        if len(seq.output_ids) >= params.max_new_tokens or total > self.model.config.max_position_embeddings:
            return "length"
        return None

    def _output(self, seq: _Sequence, reason: str) -> RequestOutput:
        n = len(seq.output_ids)
        tpot = (time.perf_counter() - seq.first_token_time) / (n - 1) if n > 1 and reason != "aborted" else None
        return RequestOutput(
            request_id=seq.request_id,
            prompt_ids=seq.export.token_ids,
            output_ids=list(seq.output_ids),
            finish_reason=reason,
            ttft_s=seq.export.ttft_s,
            tpot_s=tpot,
        )
