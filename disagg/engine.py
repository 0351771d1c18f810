"""Both stages in one process: what ``python -m disagg run`` drives.

The engine owns two pools (the prefill pool and the decode pool, whose page sizes may differ) and interleaves the
stages: one prefill batch, its exports handed to the decode stage as bytes (the same verified format the
``prefill``/``decode`` commands pass through files), one decode step, and again, so newly prefilled requests join
the decode batch between steps. Any exception aborts every request, so both pools are fully free afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from disagg.decode import DecodeStage
from disagg.errors import EngineError
from disagg.kv_pool import KVPool
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.prefill import PrefillStage
from disagg.request import Request, RequestOutput, SamplingParams

DEFAULT_POOL_TOKENS = 16384


def make_pool(
    model: CausalLM, *, page_size: int = 16, num_pages: int | None = None, kv_dtype: torch.dtype | None = None
) -> KVPool:
    """A pool shaped for ``model``: ``num_pages`` pages (default: DEFAULT_POOL_TOKENS tokens' worth) of
    ``page_size`` tokens in ``kv_dtype`` (default: the model's dtype; ``torch.float8_e4m3fn`` for fp8 KV)."""
    c = model.config
    return KVPool(
        num_layers=c.num_layers,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        num_pages=num_pages if num_pages is not None else -(-DEFAULT_POOL_TOKENS // page_size),
        page_size=page_size,
        dtype=kv_dtype or model.dtype,
        device=model.device,
    )


class Engine:
    """Prefill stage → KV export → decode stage, in one process.

    Args:
        model: a loaded :class:`CausalLM` (see :func:`disagg.loader.load_model`).
        page_size, num_pages: the prefill pool; decode_page_size, decode_num_pages: the decode pool (default: the
            same as prefill's).
        kv_dtype: KV cache dtype of both pools (default: the model's).
        max_batch_size: most sequences per decode step; max_batch_tokens: most prompt tokens per prefill batch.
        num_splits: split-KV factor for the decode kernel (None: the kernel decides).
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        decode_page_size: int | None = None,
        decode_num_pages: int | None = None,
        kv_dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int = 8192,
        num_splits: int | None = None,
    ):
        self.model = model
        self.metrics = Metrics()
        prefill_pool = make_pool(model, page_size=page_size, num_pages=num_pages, kv_dtype=kv_dtype)
        decode_pool = make_pool(
            model,
            page_size=decode_page_size or page_size,
            num_pages=decode_num_pages if decode_num_pages is not None else num_pages,
            kv_dtype=kv_dtype,
        )
        self.prefill = PrefillStage(model, prefill_pool, max_batch_tokens=max_batch_tokens)
        self.decode = DecodeStage(model, decode_pool, max_batch_size=max_batch_size, num_splits=num_splits)

    def generate(
        self,
        prompts: Sequence[Request | list[int]],
        sampling: SamplingParams | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Serve ``prompts`` (Requests, or token-id lists that become requests "0", "1", ... with ``sampling``) and
        return one output per prompt, in order. A request that cannot be served gets finish_reason "error" and the
        others go on. ``progress`` shows a progress bar (tqdm, on stderr, when it is a terminal) once a run takes
        more than a second."""
        requests = [
            p if isinstance(p, Request) else Request(str(i), list(p), sampling or SamplingParams())
            for i, p in enumerate(prompts)
        ]
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        self.metrics = self.prefill.metrics = self.decode.metrics = Metrics()
        outputs: dict[str, RequestOutput] = {}
        try:
            for r in requests:
                try:
                    self.prefill.add(r)
                except EngineError as e:
                    outputs[r.request_id] = RequestOutput(r.request_id, r.prompt_ids, error=str(e))
            total = sum(r.sampling.max_new_tokens for r in requests if r.request_id not in outputs)
            with tqdm(total=total, unit="tok", disable=None if progress else True, delay=1.0, leave=False) as bar:
                while self.prefill.has_work or self.decode.has_work:
                    before = self.metrics.decode_tokens
                    if self.prefill.has_work:
                        for res in self.prefill.step():
                            bar.update(1)
                            try:
                                self.decode.add(res.export, first_token_time=res.first_token_time)
                            except EngineError as e:
                                rid = res.request.request_id
                                outputs[rid] = RequestOutput(rid, res.request.prompt_ids, error=str(e))
                    for out in self.decode.step():
                        outputs[out.request_id] = out
                    bar.update(self.metrics.decode_tokens - before)
        except BaseException:
            self.prefill.abort_all()
            self.decode.abort_all()
            raise
        return [outputs[i] for i in ids]
