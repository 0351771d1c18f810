"""The attention backend of a step: the per-step metadata every layer's attention reads, prepared in one place.

A step carries new tokens of two kinds, packed into one token dimension for ONE model forward:

- decode rows first: one token per sequence that is generating (its context is all in the pool);
- then prompt chunks: tokens [start, end) of a prompt whose tokens [0, start) are already in the pool (computed by
  earlier chunks, or pages reused from the prefix cache).

:meth:`StepBatch.build` turns (sequence key, positions) into tensors once per step: each token's position and pool
slot, and for each kind its block table and lengths. Every layer then calls :meth:`StepBatch.attend`, which stores
the layer's new K/V into the pool with ``kernels.write_kv_cache`` and attends with the phase's own kernel:
``kernels.paged_decode_attention`` for the decode rows (the decode-specialized kernel, split-KV and all) and
``kernels.paged_prefill_attention`` for the chunks (each chunk's queries against its sequence's pages, causal,
bottom-right aligned). A step holding both kinds (the colocated deployment's mixed step) launches both kernels per
layer on disjoint row ranges, so a decode row is computed exactly as in a decode-only step and the two deployments
agree token for token. Host-known lengths (``max_seqlen_q``, ``num_splits``) are passed so no layer syncs.

Because the metadata is built once per step and every layer only reads it, this is also where per-step kernel
planning (host work done once, then launch-only calls per layer) and persistent device block tables belong.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

import kernels
from disagg.kv_pool import KVPool


@dataclass
class StepBatch:
    """The attention metadata of one step (see the module docstring); tensors on the pool's device.

    positions: int64 (tokens,) position of every new token; slots: int64 (tokens,) its pool slot.
    num_decode: the first ``num_decode`` tokens are decode rows; decode_block_table int32 (num_decode, pages),
    decode_seq_lens int32 (num_decode,) context lengths including the new token; num_splits: the decode kernel's
    split-KV factor (None: it decides).
    chunk_block_table int32 (chunks, pages), cu_seqlens_q int32 (chunks + 1,) offsets of the chunks among the
    tokens after the decode rows, chunk_seq_lens int32 (chunks,) tokens in the pool once the chunk is written,
    max_seqlen_q: the longest chunk.
    """

    pool: KVPool
    positions: torch.Tensor
    slots: torch.Tensor
    num_decode: int
    decode_block_table: torch.Tensor | None
    decode_seq_lens: torch.Tensor | None
    num_splits: int | None
    chunk_block_table: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None
    chunk_seq_lens: torch.Tensor | None
    max_seqlen_q: int

    @classmethod
    def build(
        cls,
        pool: KVPool,
        decode: Sequence[tuple[Hashable, int]] = (),
        chunks: Sequence[tuple[Hashable, int, int]] = (),
        *,
        num_splits: int | None = None,
    ) -> StepBatch:
        """decode: (sequence, position of its new token); chunks: (sequence, start, end) prompt token ranges. The
        sequences' pages must already cover every position. Host work is O(tokens + pages of these sequences)."""
        device = pool.device
        spans = [(s, p, p + 1) for s, p in decode] + list(chunks)
        positions = [torch.arange(a, b, dtype=torch.int64) for _, a, b in spans]
        slots = [pool.slots(s, a, b) for s, a, b in spans]
        empty = torch.empty(0, dtype=torch.int64)

        def lengths(rows):
            return torch.tensor([b for _, _, b in rows], dtype=torch.int32).to(device)

        dec, chk = spans[: len(decode)], spans[len(decode) :]
        cu = torch.tensor([0, *(b - a for _, a, b in chk)], dtype=torch.int64).cumsum(0)
        return cls(
            pool=pool,
            positions=torch.cat(positions or [empty]).to(device),
            slots=torch.cat(slots or [empty]).to(device),
            num_decode=len(dec),
            decode_block_table=pool.block_table([s for s, _, _ in dec]) if dec else None,
            decode_seq_lens=lengths(dec) if dec else None,
            num_splits=num_splits,
            chunk_block_table=pool.block_table([s for s, _, _ in chk]) if chk else None,
            cu_seqlens_q=cu.to(device=device, dtype=torch.int32) if chk else None,
            chunk_seq_lens=lengths(chk) if chk else None,
            max_seqlen_q=max((b - a for _, a, b in chk), default=0),
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        """q (tokens, Hq, D), k/v (tokens, Hkv, D) of this step's new tokens -> (tokens, Hq, D)."""
        pool, n = self.pool, self.num_decode
        pool.write(layer, k, v, self.slots)
        k_scale, v_scale = pool.scales
        caches = (pool.k[layer], pool.v[layer])
        parts = []
        if self.decode_block_table is not None:
            parts.append(
                kernels.paged_decode_attention(
                    q[:n],
                    *caches,
                    self.decode_block_table,
                    self.decode_seq_lens,
                    window=window,
                    k_scale=k_scale,
                    v_scale=v_scale,
                    num_splits=self.num_splits,
                )
            )
        if self.chunk_block_table is not None:
            parts.append(
                kernels.paged_prefill_attention(
                    q[n:],
                    *caches,
                    self.chunk_block_table,
                    self.cu_seqlens_q,
                    self.chunk_seq_lens,
                    causal=True,
                    window=window,
                    k_scale=k_scale,
                    v_scale=v_scale,
                    max_seqlen_q=self.max_seqlen_q,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
