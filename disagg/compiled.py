"""The decode step's forward under ``torch.compile``: ``Engine(compile=True)`` / ``--compile``.

A decode-only step's model forward (token ids → logits) is compiled with ``fullgraph=True``: no graph break
anywhere, attention included. Inside the compiled region the kernels are reached through their public one-call
functions, which are ``torch.ops.phaseattn`` custom ops (:mod:`kernels._ops`) that Dynamo traces without reading
device values; the plans of the eager path launch Triton directly and are not traceable. The step's metadata is
still built eagerly (:meth:`StepBatch.build`), and so is each window's split count (the eager plans' choice, so the
compiled step computes exactly what the eager one does); they enter the compiled function as tensors and ints.

Steps with prompt chunks run eagerly. Batch sizes vary from step to step: Dynamo recompiles once for a second size
and then treats the batch dimension as dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from disagg.attention import StepBatch
from disagg.kv_pool import KVPool
from disagg.model import CausalLM


@dataclass
class DecodeOps:
    """The attention backend of a compiled decode step: the pool write and the decode attention of every layer
    through the kernels' custom ops. ``splits``: (window, num_splits) pairs, one per window of the model."""

    pool: KVPool
    slots: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    splits: tuple[tuple[int | None, int], ...]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        pool = self.pool
        k_scale, v_scale = pool.scales
        caches = (pool.k[layer], pool.v[layer])
        kernels.write_kv_cache(k, v, *caches, self.slots, k_scale=k_scale, v_scale=v_scale)
        return kernels.paged_decode_attention(
            q, *caches, self.block_table, self.seq_lens, window=window, k_scale=k_scale, v_scale=v_scale,
            num_splits=dict(self.splits)[window],
        )  # fmt: skip


class CompiledDecode:
    """Decode steps of ``model`` over ``pool`` through ``torch.compile(fullgraph=True, backend=backend)``."""

    def __init__(self, model: CausalLM, pool: KVPool, *, backend: str = "inductor"):
        self.model, self.pool = model, pool
        self.windows = tuple(dict.fromkeys(model.config.windows))
        self._forward = torch.compile(self._logits, fullgraph=True, backend=backend)

    def _logits(self, input_ids, positions, backend: DecodeOps) -> torch.Tensor:
        # the forward without its inference_mode decorator: AOT tracing refuses inference tensors, so the compiled
        # region runs under no_grad instead
        hidden = CausalLM.forward.__wrapped__(self.model, input_ids, positions, backend)
        return CausalLM.logits.__wrapped__(self.model, hidden)

    def logits(self, batch: StepBatch) -> torch.Tensor:
        """float32 (rows, vocab) logits of a decode-only ``batch`` (built with its ``input_ids``)."""
        if batch.chunk_block_table is not None or batch.input_ids is None:
            raise ValueError("a compiled step is a decode-only step built with its input_ids")
        c = self.model.config
        splits = tuple((w, batch.plans(c.num_heads, self.model.dtype, w).decode.num_splits) for w in self.windows)
        ops = DecodeOps(self.pool, batch.slots, batch.decode_block_table, batch.decode_seq_lens, splits)
        with torch.no_grad():
            return self._forward(batch.input_ids, batch.positions, ops)
