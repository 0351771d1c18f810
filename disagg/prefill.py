"""The prefill stage: prompts in, first tokens and KV exports out.

Each :meth:`PrefillStage.step` runs one step that the :class:`~disagg.scheduler.Scheduler` fills with prompt
chunks up to ``max_batch_tokens`` tokens (a longer prompt is prefilled over several steps; as many prompts as the
pool holds at once): the chunk's K/V go into the pool with ``kernels.write_kv_cache`` and its queries attend to the
sequence's pages with ``kernels.paged_prefill_attention``. A prompt whose last chunk ran gets its first token
sampled from its last position, its KV serialized into an export (:mod:`disagg.export`) and its pages released.
With the pool's prefix cache (on by default in :func:`disagg.engine.make_pool`) a prompt starting with pages
another prompt computed reuses them and computes only the rest; the released full pages stay cached.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from itertools import count

from disagg.errors import RequestError
from disagg.export import export_kv
from disagg.kv_pool import KVPool, check_count
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.request import Request
from disagg.runner import run_step
from disagg.scheduler import Scheduler, Sequence


@dataclass
class PrefillResult:
    """A prefilled request: its first token, its export bytes, TTFT and when (perf_counter) the token appeared."""

    request: Request
    first_token: int
    export: bytes
    ttft_s: float
    first_token_time: float
    cached_tokens: int = 0


def check_request(model: CausalLM, pool_capacity: int, request: Request) -> Request:
    """Validate a request for a model whose pool holds ``pool_capacity`` tokens; return it with its stop tokens
    resolved (None -> the model's). Raises RequestError naming the problem, TypeError for a non-Request."""
    if not isinstance(request, Request):
        raise TypeError(f"request must be a disagg.Request, got {type(request).__name__}")
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


def check_budget(max_batch_tokens: int | None) -> int | None:
    """``max_batch_tokens``: None (no limit) or an int >= 1."""
    return None if max_batch_tokens is None else check_count("max_batch_tokens", max_batch_tokens, 1)


class PrefillStage:
    """Prefill with ``model`` into ``pool``, at most ``max_batch_tokens`` prompt tokens per step (None: no limit);
    record into ``metrics``."""

    def __init__(
        self, model: CausalLM, pool: KVPool, *, max_batch_tokens: int | None = 8192, metrics: Metrics | None = None
    ):
        self.model, self.pool, self.max_batch_tokens = model, pool, check_budget(max_batch_tokens)
        self.metrics = metrics if metrics is not None else Metrics()
        self.scheduler = Scheduler(pool, max_batch_tokens=self.max_batch_tokens, max_batch_size=None, decode=False)
        self._keys = count()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request: Request) -> None:
        """Queue a request (its arrival time is now). Raises RequestError (TypeError for a non-Request), queueing
        nothing, for a bad one."""
        request = check_request(self.model, self.pool.capacity, request)
        if self.scheduler.find(request.request_id) is not None:
            raise RequestError(f"request {request.request_id} is already in the prefill stage")
        n, now = len(request.prompt_ids), time.perf_counter()
        seq = Sequence(next(self._keys), request.request_id, list(request.prompt_ids), request.sampling, n, now)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or partly prefilled request, releasing its pages (only pages it completed stay cached);
        True if it was here."""
        seq = self.scheduler.find(request_id)
        if seq is not None:
            self.scheduler.remove(seq)
        return seq is not None

    def abort_all(self) -> None:
        self.scheduler.clear()

    def step(self) -> list[PrefillResult]:
        """Prefill one step's chunks; export every request whose prompt is now done."""
        step = self.scheduler.schedule()
        if not step:
            return []
        results = []
        for seq in run_step(self.model, self.scheduler, step, self.metrics):
            self.metrics.prompt_tokens += len(seq.prompt_ids)
            self.metrics.cached_tokens += seq.cached_tokens
            request = Request(seq.request_id, seq.prompt_ids, seq.sampling)
            t0 = time.perf_counter()
            token = seq.output_ids[0]
            data = export_kv(
                self.model, self.pool, seq.key, seq.request_id, seq.prompt_ids, token, seq.sampling, seq.ttft_s
            )
            self.metrics.export_time_s += time.perf_counter() - t0
            self.metrics.kv_bytes_exported += len(data)
            self.metrics.exports += 1
            self.scheduler.remove(seq)
            results.append(PrefillResult(request, token, data, seq.ttft_s, seq.first_token_time, seq.cached_tokens))
        return results
