"""The decode stage: imported KV in, generated tokens out, with continuous batching.

:meth:`DecodeStage.add` verifies an export completely (:func:`disagg.export.read_export`) and queues the request;
nothing is allocated for a refused one. Each :meth:`DecodeStage.step`:

1. admits waiting requests in arrival order while the batch has room and the pool has the pages for a request's
   whole life (prompt + max_new_tokens - 1 tokens, capped at the model's context), re-paging its exported K/V into
   this pool, whose page size may differ from the prefill pool's (the :class:`~disagg.scheduler.Scheduler` decides,
   as for every stage). A request that does not fit waits for pages to come back; one that could never fit is
   refused at ``add``. Reserving up front means a running request never runs out of pages, so nothing is ever
   preempted. When the pool's prefix cache already holds pages for the leading tokens of the export (a multi-turn
   conversation whose previous turn was decoded here), those pages are shared and only the rest is copied
   (``kv_import_skipped_tokens`` in the metrics); imported full pages, and full pages of generated tokens when the
   request finishes, are cached for the next turn;
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
from itertools import count

import torch

from disagg.errors import RequestError
from disagg.export import read_export
from disagg.kv_pool import KVPool, check_count
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.request import RequestOutput
from disagg.runner import GeneratingStage
from disagg.scheduler import Sequence, finish_reason, reserved_tokens, to_output

__all__ = ["DecodeStage", "reserved_tokens"]


class DecodeStage(GeneratingStage):
    """Decode with ``model`` from ``pool``, at most ``max_batch_size`` sequences per step.

    ``num_splits`` is passed to ``paged_decode_attention`` (None: the kernel picks the split-KV factor);
    ``cuda_graph``: steps replay CUDA graphs when the pool is on CUDA (:mod:`disagg.cuda_graph`); ``compile``:
    steps run under ``torch.compile(fullgraph=True)`` (:mod:`disagg.compiled`).
    """

    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        *,
        max_batch_size: int = 64,
        metrics: Metrics | None = None,
        num_splits: int | None = None,
        cuda_graph: bool = True,
        compile: bool | str = False,
    ):
        super().__init__(
            model,
            pool,
            max_batch_tokens=None,
            max_batch_size=max_batch_size,
            num_splits=num_splits,
            metrics=metrics,
            cuda_graph=cuda_graph,
            compile=compile,
        )
        self._reserved: dict[str, tuple[int, int]] = {}  # request id -> (pool key, tokens reserved)
        self._keys = count()

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
        seq = Sequence(
            key,
            export.request_id,
            list(export.token_ids),
            export.sampling,
            reserve,
            start,
            export=export,
            holds_pages=reserved is not None,
            output_ids=[export.first_token],
            first_token_time=start if first_token_time is None else first_token_time,
            ttft_s=export.ttft_s,
        )
        reason = finish_reason(seq, self.model.config.max_position_embeddings)
        if reason is None and reserved is None:
            self.scheduler.check_fits(export.request_id, reserve, "decode pool")
        self._reserved.pop(export.request_id, None)
        self.metrics.import_time_s += time.perf_counter() - start
        self.metrics.imports += 1
        if reason is None:
            self.scheduler.add(seq)
        else:
            self.pool.free(key)
            self._done.append(to_output(seq, reason, time.perf_counter()))
        return export.request_id

    def reserve(self, request_id: str, num_tokens: int, max_new_tokens: int) -> bool:
        """Allocate now the pages a request of ``num_tokens`` prompt tokens will need over its whole life (the
        admission rule above), before its export arrives. False, allocating nothing, when they are not free yet;
        RequestError when they never will be (more than the whole pool) or the request is already here."""
        check_count("num_tokens", num_tokens, 1)
        check_count("max_new_tokens", max_new_tokens, 1)
        if self._holds(request_id) or request_id in self._reserved:
            raise RequestError(f"request {request_id} is already in the decode stage")
        tokens = self._life_tokens(num_tokens, max_new_tokens)
        self.scheduler.check_fits(request_id, tokens, "decode pool")
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
        return self.scheduler.find(request_id) is not None or any(o.request_id == request_id for o in self._done)

    def _life_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return reserved_tokens(num_tokens, max_new_tokens, self.model.config.max_position_embeddings)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (reserved, waiting or running), freeing its pages; returns its output
        (finish_reason "aborted"), or None when it is not here."""
        seq = self.scheduler.find(request_id)
        if seq is not None:
            self.scheduler.remove(seq)
            return to_output(seq, "aborted", time.perf_counter())
        if self.release(request_id):
            return RequestOutput(request_id, [], finish_reason="aborted")
        return None

    def abort_all(self) -> None:
        """Drop every request (reserved, waiting, running or finished but not yet returned), freeing all their
        pages."""
        super().abort_all()
        for request_id in list(self._reserved):
            self.release(request_id)

    def _import(self, seq: Sequence, shared: int) -> None:
        """Place ``seq``'s exported K/V into its pages, skipping leading pages the prefix cache supplies."""
        start, pool, export = time.perf_counter(), self.pool, seq.export
        n, page = export.num_tokens, pool.page_size
        while shared < min(n // page, len(seq.hashes)) and pool.adopt(seq.key, shared, seq.hashes[shared]):
            shared += 1
        skip = shared * page
        slots = pool.slots(seq.key, skip, n)
        kv = torch.stack([torch.stack((k[skip:], v[skip:])) for k, v in zip(export.k, export.v, strict=True)])
        pool.load_all_tokens(slots, kv)  # one host-to-device copy of every layer
        seq.export.k, seq.export.v = [], []  # the pool holds them now
        seq.num_computed = n
        self.scheduler.publish(seq, skip, n)
        self.metrics.kv_import_skipped_tokens += skip
        self.metrics.import_time_s += time.perf_counter() - start
