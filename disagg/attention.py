"""The attention backends: one per phase, each holding the per-step metadata its kernel needs.

The model's attention layers call ``batch.attend(layer, q, k, v, window)`` and know nothing else; the stage that
builds the batch decides which kernel runs. Both backends first store the step's new K/V into the stage's
:class:`~disagg.kv_pool.KVPool` with ``kernels.write_kv_cache``, then attend:

- :class:`PrefillBatch`: a packed varlen batch of whole prompts. The prompts' own K/V are all there is to attend
  to, so ``kernels.prefill_attention`` reads them straight from the projections (no gather from the pool).
- :class:`DecodeBatch`: one new token per sequence; ``kernels.paged_decode_attention`` reads every sequence's
  context from the pool through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from disagg.kv_pool import KVPool


@dataclass
class PrefillBatch:
    """A packed batch of prompts.

    cu_seqlens: int32 (batch + 1,) prompt offsets into the token dimension, on the pool's device.
    max_seqlen: the longest prompt (given to the kernel so it needs no host sync).
    slots: int64 (tokens,) pool slot of every token.
    """

    pool: KVPool
    cu_seqlens: torch.Tensor
    max_seqlen: int
    slots: torch.Tensor

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        """q (tokens, Hq, D), k/v (tokens, Hkv, D) -> (tokens, Hq, D)."""
        self.pool.write(layer, k, v, self.slots)
        cu, n = self.cu_seqlens, self.max_seqlen
        return kernels.prefill_attention(q, k, v, cu, cu, causal=True, window=window, max_seqlen_q=n, max_seqlen_k=n)


@dataclass
class DecodeBatch:
    """One new token for each of ``batch`` sequences.

    block_table: int32 (batch, max_pages); seq_lens: int32 (batch,) context lengths including the new token;
    slots: int64 (batch,) where the new token's K/V go; num_splits: split-KV factor (None: the kernel decides).
    """

    pool: KVPool
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    slots: torch.Tensor
    num_splits: int | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        """q (batch, Hq, D), k/v (batch, Hkv, D) -> (batch, Hq, D)."""
        self.pool.write(layer, k, v, self.slots)
        k_scale, v_scale = self.pool.scales
        return kernels.paged_decode_attention(
            q,
            self.pool.k[layer],
            self.pool.v[layer],
            self.block_table,
            self.seq_lens,
            window=window,
            k_scale=k_scale,
            v_scale=v_scale,
            num_splits=self.num_splits,
        )


@dataclass
class ChunkBatch:
    """The next chunk of new tokens of each of ``batch`` sequences whose earlier tokens are already in the pool
    (chunked prefill): every chunk's K/V are stored first, then its queries attend over all cached tokens with
    ``kernels.paged_prefill_attention``, so earlier chunks are read back in the pool's KV dtype.

    cu_seqlens_q: int32 (batch + 1,) offsets of each sequence's new tokens; seq_lens: int32 (batch,) cached
    tokens per sequence including the new ones; block_table: int32 (batch, max_pages); slots: int64 (tokens,);
    max_seqlen_q: the longest chunk.
    """

    pool: KVPool
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    slots: torch.Tensor
    max_seqlen_q: int

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        """q (tokens, Hq, D), k/v (tokens, Hkv, D) -> (tokens, Hq, D)."""
        self.pool.write(layer, k, v, self.slots)
        k_scale, v_scale = self.pool.scales
        return kernels.paged_prefill_attention(
            q,
            self.pool.k[layer],
            self.pool.v[layer],
            self.block_table,
            self.cu_seqlens_q,
            self.seq_lens,
            causal=True,
            window=window,
            k_scale=k_scale,
            v_scale=v_scale,
            max_seqlen_q=self.max_seqlen_q,
        )
