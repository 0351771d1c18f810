"""The prefill stage: whole prompts in, first tokens and KV exports out.

Each :meth:`PrefillStage.step` packs waiting prompts into one varlen batch (up to ``max_batch_tokens`` tokens and
as many as the pool holds), allocates their pages, runs the model once over the batch (``kernels.prefill_attention``
attends, ``kernels.write_kv_cache`` stores K/V into the pool), samples each prompt's first token from its last
position, serializes each prompt's KV into an export (:mod:`disagg.export`) and frees the pages. The pool is empty
between steps, whatever happens inside one.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from itertools import count

import torch

from disagg.attention import PrefillBatch
from disagg.errors import RequestError
from disagg.export import export_kv
from disagg.kv_pool import KVPool
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.request import Request
from disagg.sampling import sample


@dataclass
class PrefillResult:
    """A prefilled request: its first token, its export bytes, TTFT and when (perf_counter) the token appeared."""

    request: Request
    first_token: int
    export: bytes
    ttft_s: float
    first_token_time: float


def check_request(model: CausalLM, pool_capacity: int, request: Request) -> Request:
    """Validate a request for a model whose pool holds ``pool_capacity`` tokens; return it with its stop tokens
    resolved (None -> the model's). Raises RequestError naming the problem."""
    n, config = len(request.prompt_ids), model.config
    if n == 0:
        raise RequestError(f"request {request.request_id}: the prompt is empty")
    if n > config.max_position_embeddings:
        raise RequestError(
            f"request {request.request_id}: the prompt has {n} tokens, longer than the model's context of "
            f"{config.max_position_embeddings}"
        )
    needed = n + request.sampling.max_new_tokens - 1  # positions fed through the model: the last token never is
    if needed > config.max_position_embeddings:
        raise RequestError(
            f"request {request.request_id}: {n} prompt tokens + max_new_tokens {request.sampling.max_new_tokens} "
            f"need {needed} positions, more than the model's context of {config.max_position_embeddings}: ask "
            f"for at most {config.max_position_embeddings - n + 1} new tokens"
        )
    if n > pool_capacity:
        raise RequestError(
            f"request {request.request_id}: the prompt has {n} tokens, more than the KV pool holds ({pool_capacity})"
        )
    bad = [t for t in request.prompt_ids if not (isinstance(t, int) and 0 <= t < config.vocab_size)]
    if bad:
        raise RequestError(
            f"request {request.request_id}: token id {bad[0]!r} is outside the vocabulary ({config.vocab_size})"
        )
    if request.sampling.eos_token_ids is None:
        sampling = dataclasses.replace(request.sampling, eos_token_ids=config.eos_token_ids)
        request = dataclasses.replace(request, sampling=sampling)
    return request


class PrefillStage:
    """Prefill with ``model`` into ``pool``; record into ``metrics``."""

    def __init__(self, model: CausalLM, pool: KVPool, *, max_batch_tokens: int = 8192, metrics: Metrics | None = None):
        self.model, self.pool, self.max_batch_tokens = model, pool, max_batch_tokens
        self.metrics = metrics if metrics is not None else Metrics()
        self._waiting: deque[tuple[int, Request, float]] = deque()
        self._keys = count()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting)

    def add(self, request: Request) -> None:
        """Queue a request (its arrival time is now). Raises RequestError, queueing nothing, for a bad one."""
        self._waiting.append(
            (next(self._keys), check_request(self.model, self.pool.capacity, request), time.perf_counter())
        )

    def abort(self, request_id: str) -> bool:
        """Drop a waiting request; True if it was waiting. (Running requests hold pages only inside a step.)"""
        before = len(self._waiting)
        self._waiting = deque(w for w in self._waiting if w[1].request_id != request_id)
        return len(self._waiting) < before

    def abort_all(self) -> None:
        self._waiting.clear()

    def step(self) -> list[PrefillResult]:
        """Prefill one packed batch of waiting requests and export each one's KV."""
        batch: list[tuple[int, Request, float]] = []
        tokens = 0
        while self._waiting:
            key, request, _ = self._waiting[0]
            n = len(request.prompt_ids)
            if batch and (tokens + n > self.max_batch_tokens or not self.pool.can_allocate(n)):
                break
            self.pool.allocate(key, n)  # fits: the pool is empty between steps and n <= its capacity
            batch.append(self._waiting.popleft())
            tokens += n
        try:
            return self._run(batch, tokens)
        finally:
            for key, _, _ in batch:
                self.pool.free(key)

    def _run(self, batch: list[tuple[int, Request, float]], tokens: int) -> list[PrefillResult]:
        start = time.perf_counter()
        device = self.model.device
        lengths = [len(r.prompt_ids) for _, r, _ in batch]
        ids = torch.tensor([t for _, r, _ in batch for t in r.prompt_ids], dtype=torch.int64, device=device)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]).to(device)
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
        slots = torch.cat([self.pool.slots(key, 0, n) for (key, _, _), n in zip(batch, lengths, strict=True)])
        meta = PrefillBatch(self.pool, cu.to(device=device, dtype=torch.int32), max(lengths), slots.to(device))
        hidden = self.model(ids, positions, meta)
        logits = self.model.logits(hidden[(cu[1:] - 1).to(device)])
        first = sample(logits, [r.sampling for _, r, _ in batch], [0] * len(batch))
        now = time.perf_counter()
        self.metrics.prefill_tokens += tokens
        self.metrics.prefill_time_s += now - start
        self.metrics.prefill_batches += 1

        results = []
        for (key, request, arrival), token in zip(batch, first, strict=True):
            t0 = time.perf_counter()
            data = export_kv(
                self.model,
                self.pool,
                key,
                request.request_id,
                request.prompt_ids,
                token,
                request.sampling,
                now - arrival,
            )
            self.metrics.export_time_s += time.perf_counter() - t0
            self.metrics.kv_bytes_exported += len(data)
            self.metrics.exports += 1
            results.append(PrefillResult(request, token, data, now - arrival, now))
        return results
