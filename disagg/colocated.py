"""The colocated deployment: one pool, one scheduler, prefill and decode in the same steps.

This is chunked prefill as Sarathi-Serve and vLLM run it: each :meth:`ColocatedStage.step` is ONE model forward
carrying a decode row for every running sequence that is generating plus prompt chunks up to ``max_batch_tokens``
prompt tokens (:class:`~disagg.scheduler.Scheduler` decides, as it does for the disaggregated stages). No KV is
exported: a prompt's pages are the pages its sequence decodes from. Decode rows attend with
``kernels.paged_decode_attention`` and chunks with ``kernels.paged_prefill_attention`` (two launches per layer on
disjoint rows of the same step, :mod:`disagg.attention`), so every token is computed by the same kernel as in the
disaggregated deployment and the two give the same tokens for the same requests and seeds. What a mixed step costs
a decode row (the interference disaggregation removes) is measured: ``mixed_step_mean_s`` against
``decode_step_mean_s`` in the metrics, side by side in ``python -m disagg compare``.

Admission reserves a request's pages for its whole life (prompt + max_new_tokens - 1 tokens), as the decode stage
does, so nothing is preempted.
"""

from __future__ import annotations

import time
from itertools import count

from disagg.errors import RequestError
from disagg.kv_pool import KVPool
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.prefill import check_budget, check_request
from disagg.request import Request, RequestOutput
from disagg.runner import GeneratingStage
from disagg.scheduler import Sequence, reserved_tokens, to_output


class ColocatedStage(GeneratingStage):
    """Serve requests with ``model`` from one ``pool``: at most ``max_batch_size`` sequences at once and
    ``max_batch_tokens`` prompt tokens per step (None: no limit); ``num_splits``, ``cuda_graph`` and ``compile`` (its
    decode-only steps) as in :class:`DecodeStage`."""

    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        *,
        max_batch_tokens: int | None = 8192,
        max_batch_size: int = 64,
        num_splits: int | None = None,
        metrics: Metrics | None = None,
        cuda_graph: bool = True,
        compile: bool | str = False,
    ):
        super().__init__(
            model,
            pool,
            max_batch_tokens=check_budget(max_batch_tokens),
            max_batch_size=max_batch_size,
            num_splits=num_splits,
            metrics=metrics,
            cuda_graph=cuda_graph,
            compile=compile,
        )
        self._keys = count()

    def add(self, request: Request) -> None:
        """Queue a request (its arrival time is now). Raises RequestError (TypeError for a non-Request), queueing
        nothing, for a bad one or one whose whole life needs more KV than the pool holds."""
        request = check_request(self.model, self.pool.capacity, request)
        if self.scheduler.find(request.request_id) is not None:
            raise RequestError(f"request {request.request_id} is already in the colocated stage")
        n = len(request.prompt_ids)
        reserve = reserved_tokens(n, request.sampling.max_new_tokens, self.model.config.max_position_embeddings)
        self.scheduler.check_fits(request.request_id, reserve, "KV pool")
        key, now = next(self._keys), time.perf_counter()
        self.scheduler.add(Sequence(key, request.request_id, list(request.prompt_ids), request.sampling, reserve, now))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is, releasing its pages; its output (finish_reason "aborted") or None."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        return to_output(seq, "aborted", time.perf_counter())
