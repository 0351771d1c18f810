"""Decode steps replayed from CUDA graphs: the model forward from token ids to logits, captured once per batch size
bucket, so a step costs one graph launch instead of a few hundred kernel launches from Python.

A decode step of ``n`` sequences runs in the smallest bucket of :func:`bucket_sizes` (1, 2, 4, 8, ..., up to the
stage's max batch size) that holds it. The step's metadata is built as usual (:meth:`StepBatch.build`, one
host→device copy) with ``bucket - n`` padding rows that touch nothing (slot -1, context length 0), then copied into
the bucket's static tensors, and the graph replays; the logits of the first ``n`` rows are the step's. Everything
a captured step reads or writes has a size fixed by the bucket: ids, positions, slots, context lengths, the block
table (the pool's full width, :mod:`disagg.block_table`) and the kernels' plans, made for contexts up to the pool's
longest sequence (``decode_bound``), so their split count and workspace hold for any lengths a later step brings.

The first step of a bucket runs eagerly on the static tensors (Triton compiles and autotunes there, never inside a
capture), and its logits are that step's answer; the graph is captured right after and replays from the second
step on. ``Engine(cuda_graph=False)`` / ``--no-cuda-graph`` runs every step eagerly; on CPU there are no graphs.

What changes with graphs: a bucket's split count is chosen for the pool's longest context (the stage's
``num_splits`` when it has one), where an engine without graphs chooses from each step's own lengths (a stage
with graphs plans the decode rows of its eager steps, those with prompt chunks, the same way, so a row is split
alike in both kinds of step), and a padded batch may run other GEMM kernels than an unpadded one, so logits can
differ from a graph-less engine's in the last bits (greedy tokens may then differ where two logits tie within
rounding). A graph replays exactly what the same padded step computes eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from disagg.attention import StepBatch
from disagg.kv_pool import KVPool
from disagg.model import CausalLM


def bucket_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes graphs are captured for: powers of two below ``max_batch_size``, then it."""
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(2 * sizes[-1], max_batch_size))
    return sizes


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest bucket holding ``n`` rows (None: more rows than the largest)."""
    return next((size for size in sizes if size >= n), None)


def forward_logits(model: CausalLM, batch: StepBatch) -> torch.Tensor:
    """float32 (tokens, vocab) logits of every token of ``batch`` (its ``input_ids``): what a graph captures."""
    return model.logits(model(batch.input_ids, batch.positions, batch))


@dataclass
class _Bucket:
    """One bucket's static step (its tensors are the graph's inputs), graph and output."""

    batch: StepBatch
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def load(self, step: StepBatch) -> None:
        """Copy a new step's metadata (same bucket) into the static tensors, on the device."""
        static = self.batch
        for name in ("input_ids", "positions", "slots", "decode_block_table", "decode_seq_lens"):
            getattr(static, name).copy_(getattr(step, name))


class DecodeGraphs:
    """The decode steps of ``model`` over ``pool`` in buckets up to ``max_batch_size`` rows (see the module
    docstring). ``num_splits``: the decode kernel's split count in every bucket (None: chosen per bucket for the
    pool's longest context). ``capture``: record CUDA graphs (default: when the pool is on CUDA); without it the
    same padded static steps run eagerly (what CPU tests check the padding with). ``forward``: what a step runs,
    batch → logits of every row (default :func:`forward_logits`; the engine passes its compiled step when it has
    one, :mod:`disagg.compiled`)."""

    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        *,
        max_batch_size: int,
        num_splits: int | None = None,
        capture: bool | None = None,
        forward: Callable[[StepBatch], torch.Tensor] | None = None,
    ):
        self.model, self.pool, self.num_splits = model, pool, num_splits
        self.forward = forward or (lambda batch: forward_logits(model, batch))
        self.sizes = bucket_sizes(max_batch_size)
        self.capture = pool.device.type == "cuda" if capture is None else capture
        if self.capture and pool.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA pool; this one is on {pool.device}")
        self._buckets: dict[int, _Bucket] = {}

    def fits(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.sizes[-1]

    def logits(self, decode: Sequence[tuple[Hashable, int]], input_ids: Sequence[int]) -> torch.Tensor:
        """float32 (len(decode), vocab) logits of a decode-only step: ``decode`` as in :meth:`StepBatch.build`,
        one input id per row. Its K/V are written into the pool as by an eager step."""
        n = len(decode)
        size = bucket_for(n, self.sizes)
        if size is None or n == 0:
            raise ValueError(f"a decode step of {n} rows does not fit the buckets {self.sizes}")
        step = StepBatch.build(
            self.pool,
            decode,
            num_splits=self.num_splits,
            input_ids=input_ids,
            padding=size - n,
            decode_bound=self.pool.max_seq_tokens,
        )
        bucket = self._buckets.get(size)
        if bucket is None:  # the bucket's first step: eager on what become the static tensors (warm-up), then capture
            bucket = self._buckets[size] = _Bucket(step)
            logits = self.forward(step)
            if self.capture:
                self._capture(bucket)
            return logits[:n]
        bucket.load(step)
        if bucket.graph is None:
            return self.forward(bucket.batch)[:n]
        bucket.graph.replay()
        return bucket.logits[:n]

    def _capture(self, bucket: _Bucket) -> None:
        # The warm-up step above made the plans (and compiled every kernel); capture only records launches. The
        # forward's writes of this step's K/V are recorded, not run again.
        torch.cuda.synchronize(self.pool.device)
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph):
            bucket.logits = self.forward(bucket.batch)
