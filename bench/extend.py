"""The extend sweep: ``kernels.paged_prefill_attention``, new query tokens against a paged cache that already
holds a prefix, against SDPA and FlexAttention over the same keys and values gathered into dense tensors.

Two families of shapes, as an engine meets them: chunked prefill (a chunk of 512 new tokens after prefixes of
0 to 32k, compute-bound like prefill) and multi-token decode / speculative verification (1 to 8 new tokens over
4k to 128k contexts, bandwidth-bound like decode). The cache is filled with ``kernels.write_kv_cache`` outside
the timed region through shuffled block tables; the split-KV factor is planned outside it too (the rule
``num_splits=None`` applies), and ``max_seqlen_q`` is given, so the timed launch makes no host sync.

Peers attend with bottom-right causal masking over the dense copies (SDPA's ``causal_lower_right``, a
FlexAttention mask offset by the prefix). Every contender is credited the same FLOPs (visible pairs only) and
bytes (q and out, K and V once).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from bench import peers, timing
from bench.runner import Contender, RunContext, case_meta, run_all, skip_all
from disagg import roofline

DTYPE = torch.bfloat16
HEAD_DIM = 128
PAGE_SIZE = 16
HEADS = (32, 8)
CHUNK = 512
DEFAULT_PREFIXES = (0, 2048, 8192, 32768)  # chunk 512 after each
DEFAULT_SPEC_TOKENS = (1, 4, 8)
DEFAULT_SPEC_CONTEXTS = (4096, 32768, 131072)
CHUNK_BATCH = 4
SPEC_BATCH = 16
HEADLINE = ((CHUNK_BATCH, 8192, CHUNK), (SPEC_BATCH, 32768, 4))  # batch, prefix, new tokens

SMOKE_HEADS = (4, 2)
SMOKE_HEADLINE = ((2, 64, 32), (2, 96, 4))  # a chunk and a short run; no sweep (FlexAttention compiles per shape)


@dataclass(frozen=True)
class ExtendCase:
    batch: int
    prefix: int
    new: int
    q_heads: int
    kv_heads: int
    head_dim: int = HEAD_DIM
    page_size: int = PAGE_SIZE
    tier: str = "sweep"
    phase: str = "extend"

    @property
    def context(self) -> int:
        return self.prefix + self.new

    @property
    def key(self) -> tuple:
        return (self.phase, self.batch, self.prefix, self.new, self.q_heads, self.kv_heads, self.head_dim)

    @property
    def shape(self) -> dict:
        return {
            "batch": self.batch,
            "prefix": self.prefix,
            "new": self.new,
            "head_dim": self.head_dim,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "page_size": self.page_size,
            "kv_dtype": "bf16",
        }

    @property
    def flops(self) -> float:
        return roofline.attention_flops(self.batch, self.q_heads, self.new, self.context, self.head_dim, True)

    @property
    def nbytes(self) -> float:
        return roofline.attention_bytes(self.batch, self.q_heads, self.kv_heads, self.new, self.context, self.head_dim)

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.context / self.page_size)

    def memory(self, sets: int) -> int:
        """Device bytes for ``sets`` rotated input sets: paged K/V for ours plus dense copies for the peers."""
        kv = 2 * self.batch * self.pages_per_seq * self.page_size * self.kv_heads * self.head_dim * DTYPE.itemsize
        return sets * 2 * kv + kv

    def run(self, ctx: RunContext) -> list[dict]:
        import kernels

        contenders = ["phaseattn", *(p for p in peers.SDPA_BACKENDS if p in ctx.peers)]
        contenders += ["flex"] if "flex" in ctx.peers else []
        if not hasattr(kernels, "paged_prefill_attention"):
            return skip_all(ctx, self, contenders, "kernels.paged_prefill_attention is not in this checkout")
        sets = timing.rotation_sets(int(self.nbytes), ctx.l2_bytes)
        if self.memory(sets) > ctx.memory_budget:
            why = f"needs {self.memory(sets) / 2**30:.1f} GiB of device memory, budget {ctx.memory_budget / 2**30:.1f}"
            return skip_all(ctx, self, contenders, why)
        cache = self._fill(ctx, sets)
        splits = self._plan_splits(ctx)
        ours = Contender(
            "phaseattn",
            "ours",
            [
                functools.partial(
                    kernels.paged_prefill_attention,
                    q,
                    *cache["kv"],
                    bt,
                    cache["cu_seqlens_q"],
                    cache["seq_lens"],
                    max_seqlen_q=self.new,
                    num_splits=splits,
                )
                for q, bt in zip(cache["q"], cache["block_tables"], strict=True)
            ],
            extra={"num_splits": splits},
        )
        b, hq, n, d = self.batch, self.q_heads, self.new, self.head_dim
        to_bhsd = lambda q: q.view(b, n, hq, d).transpose(1, 2)  # a view of our packed q: same memory
        dense = [
            peers.given((to_bhsd(q), *self._gather(cache, bt)))
            for q, bt in zip(cache["q"], cache["block_tables_long"], strict=True)
        ]
        packed = lambda out: out.transpose(1, 2).reshape(b * n, hq, d)
        peer_list = [peers.sdpa(p, dense, causal=True, layout=packed) for p in peers.SDPA_BACKENDS if p in ctx.peers]
        if "flex" in ctx.peers:
            peer_list.append(
                peers.flex(dense, causal=True, seqlen_q=n, seqlen_k=self.context, device=ctx.device, layout=packed)
            )
        entries, _ = run_all(ctx, [ours, *peer_list], **case_meta(self))
        return entries

    def _plan_splits(self, ctx: RunContext) -> int:
        from kernels import paged_prefill

        return paged_prefill.plan_num_splits(
            self.batch, self.new, self.context, self.q_heads, self.kv_heads, self.head_dim, DTYPE, ctx.device
        )

    def _fill(self, ctx: RunContext, sets: int) -> dict:
        """``sets`` × batch sequences of prefix + new tokens in a shuffled pool, written with write_kv_cache."""
        import kernels

        b, ps, hkv, d, n = self.batch, self.page_size, self.kv_heads, self.head_dim, self.context
        gen, dev = ctx.generator(), ctx.device
        num_pages = sets * b * self.pages_per_seq
        k_cache = torch.empty(num_pages, ps, hkv, d, device=dev, dtype=DTYPE)
        v_cache = torch.empty_like(k_cache)
        tables = torch.randperm(num_pages, generator=gen, device=dev).view(sets, b, self.pages_per_seq)
        for table in tables:
            for seq in range(b):
                pos = torch.arange(n, device=dev)
                slots = table[seq, pos // ps] * ps + pos % ps
                k = torch.randn(n, hkv, d, generator=gen, device=dev, dtype=DTYPE)
                v = torch.randn(n, hkv, d, generator=gen, device=dev, dtype=DTYPE)
                kernels.write_kv_cache(k, v, k_cache, v_cache, slots)
        new = torch.arange(b + 1, device=dev, dtype=torch.int32) * self.new
        return {
            "kv": (k_cache, v_cache),
            "q": [
                torch.randn(b * self.new, self.q_heads, d, generator=gen, device=dev, dtype=DTYPE) for _ in range(sets)
            ],
            "block_tables": [table.to(torch.int32) for table in tables],
            "block_tables_long": list(tables),
            "cu_seqlens_q": new,
            "seq_lens": torch.full((b,), n, device=dev, dtype=torch.int32),
        }

    def _gather(self, cache: dict, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one set as dense (batch, kv_heads, context, head_dim) views."""
        return tuple(c[table].flatten(1, 2)[:, : self.context].transpose(1, 2) for c in cache["kv"])


def cases(
    *, prefixes=DEFAULT_PREFIXES, spec_tokens=DEFAULT_SPEC_TOKENS, spec_contexts=DEFAULT_SPEC_CONTEXTS, heads=HEADS
) -> list[ExtendCase]:
    """Chunked prefill (CHUNK new tokens after each prefix), then multi-token decode (each token count over each
    context, the new tokens included in the context)."""
    hq, hkv = heads
    chunked = [ExtendCase(CHUNK_BATCH, p, CHUNK, hq, hkv) for p in prefixes]
    spec = [ExtendCase(SPEC_BATCH, c - t, t, hq, hkv) for c in spec_contexts for t in spec_tokens]
    return chunked + spec


def headline(smoke: bool) -> list[ExtendCase]:
    hq, hkv = SMOKE_HEADS if smoke else HEADS
    return [ExtendCase(b, p, n, hq, hkv, tier="headline") for b, p, n in (SMOKE_HEADLINE if smoke else HEADLINE)]
