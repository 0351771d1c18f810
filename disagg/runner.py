"""Running one scheduled step: one model forward over its decode rows and prompt chunks, then sampling; and the
loop of the stages that generate (:class:`GeneratingStage`, base of the decode stage and the colocated stage).

:func:`run_step` packs the :class:`~disagg.scheduler.Step`'s tokens (decode rows first, then chunks), prepares
the attention metadata once (:meth:`disagg.attention.StepBatch.build`), runs the model, samples the next token of
every decode row and of every chunk that completes its prompt (its first token, index 0), and advances the
sequences: ``num_computed`` moves past the tokens whose K/V were written, and pages those tokens completed are
published to the prefix cache. Nothing is published or advanced when the forward fails.
"""

from __future__ import annotations

import time

import torch

from disagg.attention import StepBatch
from disagg.compiled import CompiledDecode
from disagg.cuda_graph import DecodeGraphs
from disagg.kv_pool import KVPool, check_count
from disagg.metrics import Metrics
from disagg.model import CausalLM
from disagg.request import RequestOutput
from disagg.sampling import sample
from disagg.scheduler import Scheduler, Sequence, Step


def run_step(
    model: CausalLM,
    scheduler: Scheduler,
    step: Step,
    metrics: Metrics,
    *,
    num_splits: int | None = None,
    graphs: DecodeGraphs | None = None,
    compiled: CompiledDecode | None = None,
) -> list[Sequence]:
    """Run ``step``; returns the sequences that got a new token (decode rows, and chunks that finished their
    prompt: their first token), in row order. Records tokens and time into ``metrics``. A decode-only step that
    fits ``graphs``' buckets runs through them (:mod:`disagg.cuda_graph`); other decode-only steps run the
    ``compiled`` forward when there is one (:mod:`disagg.compiled`)."""
    start = time.perf_counter()
    ids = [s.output_ids[-1] for s in step.decode]
    for seq, a, b in step.chunks:
        ids += seq.prompt_ids[a:b]
    decode = [(s.key, s.num_computed) for s in step.decode]
    rows, seqs, indices = list(range(len(step.decode))), list(step.decode), [len(s.output_ids) for s in step.decode]
    offset = len(step.decode)
    for seq, a, b in step.chunks:
        offset += b - a
        if b == len(seq.prompt_ids):
            rows.append(offset - 1)
            seqs.append(seq)
            indices.append(0)
    if graphs is not None and not step.chunks and graphs.fits(len(decode)):
        logits = graphs.logits(decode, ids)
    else:
        # with graphs, eager steps plan their decode rows as the graphs do (same split count for the same batch)
        bound = scheduler.pool.max_seq_tokens if graphs is not None else None
        logits = _eager_logits(model, scheduler.pool, decode, step.chunks, ids, rows, num_splits, compiled, bound)
    tokens = sample(logits, [s.sampling for s in seqs], indices) if rows else []
    now = time.perf_counter()

    for seq in step.decode:
        seq.num_computed += 1
    for seq, a, b in step.chunks:
        seq.num_computed = b
        scheduler.publish(seq, a, b)
    for seq, token in zip(seqs, tokens, strict=True):
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time, seq.ttft_s = now, now - seq.arrival
    metrics.record_step(now - start, decode_rows=len(step.decode), prompt_tokens=sum(b - a for _, a, b in step.chunks))
    return seqs


def _eager_logits(
    model: CausalLM,
    pool: KVPool,
    decode: list[tuple[int, int]],
    chunks: list[tuple[Sequence, int, int]],
    ids: list[int],
    rows: list[int],
    num_splits: int | None,
    compiled: CompiledDecode | None,
    decode_bound: int | None,
) -> torch.Tensor | None:
    """One forward of a step without graphs (compiled when it is decode-only and ``compiled`` is given); float32
    logits of its token ``rows`` (None when there are none)."""
    batch = StepBatch.build(
        pool, decode, [(s.key, a, b) for s, a, b in chunks], num_splits=num_splits, input_ids=ids,
        decode_bound=decode_bound,
    )  # fmt: skip
    if compiled is not None and not chunks:
        return compiled.logits(batch)
    hidden = model(batch.input_ids, batch.positions, batch)
    if not rows:
        return None
    # decode rows are the first rows: a slice, not an index tensor to copy to the device
    picked = hidden[: len(rows)] if rows[-1] == len(rows) - 1 else hidden[torch.tensor(rows, device=model.device)]
    return model.logits(picked)


class GeneratingStage:
    """What the decode stage and the colocated stage share: a scheduler with decode rows, at most
    ``max_batch_size`` sequences at once, and a step that runs, samples and retires finished requests.
    ``num_splits`` is passed to ``paged_decode_attention`` (None: the kernel picks the split-KV factor).
    ``cuda_graph``: decode-only steps replay CUDA graphs per batch bucket when the pool is on CUDA
    (:mod:`disagg.cuda_graph`; a no-op elsewhere). ``compile``: decode-only steps run under
    ``torch.compile(fullgraph=True)`` (True: inductor; a string: that backend; :mod:`disagg.compiled`)."""

    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        *,
        max_batch_tokens: int | None,
        max_batch_size: int,
        num_splits: int | None,
        metrics: Metrics | None,
        cuda_graph: bool = True,
        compile: bool | str = False,
    ):
        check_count("max_batch_size", max_batch_size, 1)
        self.model, self.pool, self.max_batch_size = model, pool, max_batch_size
        self.num_splits = None if num_splits is None else check_count("num_splits", num_splits, 1)
        self.metrics = metrics if metrics is not None else Metrics()
        self.scheduler = Scheduler(
            pool, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, decode=True, on_import=self._import
        )
        self._done: list[RequestOutput] = []
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
        self.compiled = None
        if compile:
            self.compiled = CompiledDecode(model, pool, backend="inductor" if compile is True else compile)
        forward = self.compiled.logits if self.compiled is not None else None
        self.graphs = None
        if cuda_graph and pool.device.type == "cuda":
            self.graphs = DecodeGraphs(
                model, pool, max_batch_size=max_batch_size, num_splits=self.num_splits, forward=forward
            )

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.has_work or self._done)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def _import(self, seq: Sequence, shared: int) -> None:
        raise NotImplementedError  # only stages whose sequences arrive with an export import

    def abort_all(self) -> None:
        """Drop every request (waiting, running or finished but not yet returned), freeing all their pages."""
        self.scheduler.clear()
        self._done = []

    def step(self) -> list[RequestOutput]:
        """Admit, run one step, retire. Returns the requests that finished."""
        step = self.scheduler.schedule()
        done, self._done = self._done, []
        if not step:
            return done
        seqs = run_step(
            self.model, self.scheduler, step, self.metrics, num_splits=self.num_splits, graphs=self.graphs,
            compiled=self.compiled,
        )  # fmt: skip
        for seq in seqs:
            if len(seq.output_ids) == 1:  # its prompt was computed here and is done
                self.metrics.prompt_tokens += len(seq.prompt_ids)
                self.metrics.cached_tokens += seq.cached_tokens
        return done + self.scheduler.retire(seqs, self.model.config.max_position_embeddings)
