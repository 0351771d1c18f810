"""One engine, both deployments: what ``python -m disagg run`` and ``python -m disagg compare`` drive.

- ``mode="disaggregated"`` (the default): two pools (the prefill pool and the decode pool, whose page sizes may
  differ) and the two stages interleaved in one process: one prefill step, its finished prompts' exports handed to
  the decode stage as bytes (the same verified format the ``prefill``/``decode`` commands pass through files), one
  decode step, and again, so newly prefilled requests join the decode batch between steps.
- ``mode="colocated"``: one pool and one :class:`~disagg.colocated.ColocatedStage`; every step carries the
  running decodes and prompt chunks together, nothing is exported.

Both run the same :class:`~disagg.scheduler.Scheduler` (chunked prefill up to ``max_batch_tokens`` prompt tokens
a step) and the same kernels, so they give the same tokens. Each pool keeps a prefix cache (``prefix_cache=False``
turns it off) that lives as long as the engine, across :meth:`Engine.generate` calls. Any exception aborts every
request, so every pool is fully free afterwards (cached pages aside: :meth:`Engine.clear_prefix_cache`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence

import torch
from tqdm import tqdm

from disagg.colocated import ColocatedStage
from disagg.decode import DecodeStage
from disagg.errors import EngineError
from disagg.export import fingerprint
from disagg.kv_pool import FP8, PAGE_SIZES, KVPool, check_count
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.prefill import PrefillStage
from disagg.request import Request, RequestOutput, SamplingParams

MODES = ("disaggregated", "colocated")
DEFAULT_POOL_TOKENS = 16384


def make_pool(
    model: CausalLM,
    *,
    page_size: int = 16,
    num_pages: int | None = None,
    kv_dtype: torch.dtype | None = None,
    prefix_cache: bool = True,
) -> KVPool:
    """A pool shaped for ``model``: ``num_pages`` pages (default: DEFAULT_POOL_TOKENS tokens' worth) of
    ``page_size`` tokens in ``kv_dtype`` (default: the model's dtype; ``torch.float8_e4m3fn`` for fp8 KV), with a
    prefix cache whose page names include the model's fingerprint."""
    c = model.config
    if page_size not in PAGE_SIZES or isinstance(page_size, bool):
        raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size!r}")
    return KVPool(
        num_layers=c.num_layers,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        num_pages=num_pages if num_pages is not None else -(-DEFAULT_POOL_TOKENS // page_size),
        page_size=page_size,
        dtype=kv_dtype or model.dtype,
        device=model.device,
        max_seq_tokens=c.max_position_embeddings,
        prefix_cache=prefix_cache,
        cache_salt=json.dumps(fingerprint(model), sort_keys=True).encode(),
    )


class Engine:
    """Serve requests with ``model``, disaggregated or colocated (see the module docstring).

    Args:
        model: a loaded :class:`CausalLM` (see :func:`disagg.loader.load_model`).
        mode: "disaggregated" (prefill stage → KV export → decode stage) or "colocated" (one pool, mixed steps).
        page_size, num_pages: the prefill pool (colocated: the pool); decode_page_size, decode_num_pages: the
            decode pool (default: the same as prefill's; unused when colocated).
        kv_dtype: KV cache dtype of every pool: None (the model's dtype), the model's dtype, or float8_e4m3fn.
        max_batch_size: most generating sequences per step; max_batch_tokens: most prompt tokens per step (a longer
            prompt is prefilled in chunks; None: no limit).
        num_splits: split-KV factor for the decode kernel (None: the kernel decides).
        prefix_cache: reuse cached pages of earlier prompts (and, on the decode side, of earlier turns).
        cuda_graph: on CUDA, replay decode-only steps from CUDA graphs captured per batch-size bucket
            (:mod:`disagg.cuda_graph`); no effect on CPU.
        compile: run decode steps under ``torch.compile(fullgraph=True)`` (:mod:`disagg.compiled`): True for
            inductor, or the name of another backend (e.g. "aot_eager"); same tokens as eager.
    Every argument is checked here: a bad one raises TypeError / ValueError naming it.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        mode: str = "disaggregated",
        page_size: int = 16,
        num_pages: int | None = None,
        decode_page_size: int | None = None,
        decode_num_pages: int | None = None,
        kv_dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int | None = 8192,
        num_splits: int | None = None,
        prefix_cache: bool = True,
        cuda_graph: bool = True,
        compile: bool | str = False,
    ):
        if not isinstance(model, CausalLM):
            raise TypeError(f"model must be a disagg CausalLM (see disagg.load_model), got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kv_dtype not in (None, model.dtype, FP8):
            raise ValueError(f"kv_dtype must be None, the model's dtype ({model.dtype}) or {FP8}, got {kv_dtype!r}")
        if decode_page_size is not None and (decode_page_size not in PAGE_SIZES or isinstance(decode_page_size, bool)):
            raise ValueError(f"decode_page_size must be None or one of {PAGE_SIZES}, got {decode_page_size!r}")
        for name, value in (("num_pages", num_pages), ("decode_num_pages", decode_num_pages)):
            if value is not None:
                check_count(name, value, 1)
        check_count("max_batch_size", max_batch_size, 1)
        if max_batch_tokens is not None:
            check_count("max_batch_tokens", max_batch_tokens, 1)
        if num_splits is not None:
            check_count("num_splits", num_splits, 1)
        for name, flag in (("prefix_cache", prefix_cache), ("cuda_graph", cuda_graph)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
        self.model, self.mode = model, mode
        self.metrics = Metrics()
        pool = make_pool(model, page_size=page_size, num_pages=num_pages, kv_dtype=kv_dtype, prefix_cache=prefix_cache)
        if mode == "colocated":
            self.colocated = ColocatedStage(
                model,
                pool,
                max_batch_tokens=max_batch_tokens,
                max_batch_size=max_batch_size,
                num_splits=num_splits,
                cuda_graph=cuda_graph,
                compile=compile,
            )
            self.pools = [pool]
            return
        decode_pool = make_pool(
            model,
            page_size=decode_page_size or page_size,
            num_pages=decode_num_pages if decode_num_pages is not None else num_pages,
            kv_dtype=kv_dtype,
            prefix_cache=prefix_cache,
        )
        self.prefill = PrefillStage(model, pool, max_batch_tokens=max_batch_tokens)
        self.decode = DecodeStage(
            model,
            decode_pool,
            max_batch_size=max_batch_size,
            num_splits=num_splits,
            cuda_graph=cuda_graph,
            compile=compile,
        )
        self.pools = [pool, decode_pool]

    def clear_prefix_cache(self) -> None:
        """Release every cached page of every pool (pages held by running requests stay theirs)."""
        for pool in self.pools:
            pool.clear_prefix_cache()

    def generate(
        self,
        prompts: Sequence[Request | list[int]],
        sampling: SamplingParams | None = None,
        *,
        progress: bool = False,
        arrivals: Sequence[float] | None = None,
    ) -> list[RequestOutput]:
        """Serve ``prompts`` (Requests, or token-id lists that become requests "0", "1", ... with ``sampling``) and
        return one output per prompt, in order. A request that cannot be served gets finish_reason "error" and the
        others go on. ``arrivals``: seconds after the call at which each request arrives (default: all now); the
        engine idles until the next arrival when it has nothing to do. ``progress`` shows a progress bar (tqdm, on
        stderr, when it is a terminal) once a run takes more than a second."""
        requests = [
            p if isinstance(p, Request) else Request(str(i), list(p), sampling or SamplingParams())
            for i, p in enumerate(prompts)
        ]
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        if arrivals is not None and len(arrivals) != len(requests):
            raise ValueError(f"arrivals must have one time per prompt ({len(requests)}), got {len(arrivals)}")
        order = sorted(range(len(requests)), key=lambda i: arrivals[i] if arrivals is not None else 0.0)
        pending = deque((arrivals[i] if arrivals is not None else 0.0, requests[i]) for i in order)
        self.metrics = Metrics()
        for stage in self._stages():
            stage.metrics = self.metrics
        outputs: dict[str, RequestOutput] = {}
        cached: dict[str, int] = {}  # disaggregated: prompt tokens the prefill stage took from its cache
        start = time.perf_counter()
        total = sum(r.sampling.max_new_tokens for r in requests)
        try:
            with tqdm(total=total, unit="tok", disable=None if progress else True, delay=1.0, leave=False) as bar:
                while pending or any(stage.has_work for stage in self._stages()):
                    while pending and pending[0][0] <= time.perf_counter() - start:
                        r = pending.popleft()[1]
                        try:
                            self._stages()[0].add(r)
                        except EngineError as e:
                            outputs[r.request_id] = RequestOutput(r.request_id, r.prompt_ids, error=str(e))
                    if not any(stage.has_work for stage in self._stages()):
                        time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
                        continue
                    for out in self._step(cached, outputs):
                        out.cached_tokens = cached.get(out.request_id, out.cached_tokens)
                        outputs[out.request_id] = out
                        bar.update(len(out.output_ids))
        except BaseException:
            for stage in self._stages():
                stage.abort_all()
            raise
        return [outputs[i] for i in ids]

    def _stages(self) -> list[PrefillStage | DecodeStage] | list[ColocatedStage]:
        """The stages, the one that takes new requests first."""
        return [self.colocated] if self.mode == "colocated" else [self.prefill, self.decode]

    def _step(self, cached: dict[str, int], outputs: dict[str, RequestOutput]) -> list[RequestOutput]:
        """One round: a colocated step, or a prefill step (its exports handed over) then a decode step."""
        if self.mode == "colocated":
            return self.colocated.step()
        if self.prefill.has_work:
            for res in self.prefill.step():
                rid = res.request.request_id
                cached[rid] = res.cached_tokens
                try:
                    self.decode.add(res.export, first_token_time=res.first_token_time)
                except EngineError as e:
                    outputs[rid] = RequestOutput(rid, res.request.prompt_ids, error=str(e))
        return self.decode.step()
