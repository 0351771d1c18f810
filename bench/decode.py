"""The decode sweep: ``kernels.paged_decode_attention`` on a paged KV cache against SDPA and FlexAttention over
the same keys and values gathered into dense tensors.

The cache is filled with ``kernels.write_kv_cache`` (outside the timed region) through block tables whose pages
are a random permutation of the pool, as a real allocator leaves them after some churn. Every sequence of a
shape has the same context length. With fp8 KV (e4m3fn, per-tensor scales) the peers attend over the
dequantized bf16 copy, since SDPA and FlexAttention do not take fp8.

Our kernel gets its split-KV factor planned outside the timed region (the rule ``num_splits=None`` applies), so
the timed launch makes no host sync, as in an engine that plans once per step or replays a CUDA graph.

Peers are timed twice: attention alone over KV gathered beforehand (what a dense-cache engine would pay), and
gather (+ dequantization) + attention (what a paged engine using them would pay) for the fastest SDPA backend.
Every contender is credited the same bytes: K and V read once at the cache dtype, q read, out written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from bench import peers, timing
from bench.runner import Contender, RunContext, case_meta, run_all, skip_all
from disagg import roofline

Q_DTYPE = torch.bfloat16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_SCALE = 2.0**-6
"""Per-tensor fp8 scale: randn values (|x| < ~6.5 over billions of draws) land below fp8's 448 after division, and
a power of two keeps the dequantized bf16 copy the peers read exact."""
HEAD_DIM = 128
DEFAULT_BATCHES = (1, 4, 16, 64, 256)
DEFAULT_CONTEXTS = (512, 2048, 8192, 32768, 131072)
DEFAULT_PAGE_SIZES = (16, 64)
DEFAULT_HEADS = ((32, 8), (32, 32))
HEADLINE = ((64, 4096), (1, 131072))  # batch, context; page 16, 32/8 heads, bf16 and fp8
FILL_CHUNK_ELEMENTS = 1 << 27  # new K (and V) elements written per write_kv_cache call while filling

SMOKE_BATCHES = (2,)  # the headline's (batch, context): FlexAttention compiles once for the whole smoke decode
SMOKE_CONTEXTS = (100,)
SMOKE_PAGE_SIZES = (8,)
SMOKE_HEADS = ((4, 2),)
SMOKE_HEADLINE = ((2, 100),)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    context: int
    page_size: int
    kv_dtype: str
    q_heads: int
    kv_heads: int
    head_dim: int = HEAD_DIM
    tier: str = "sweep"
    phase: str = "decode"

    @property
    def key(self) -> tuple:
        return (self.phase, self.batch, self.context, self.page_size, self.kv_dtype, self.q_heads, self.kv_heads)

    @property
    def shape(self) -> dict:
        return {
            "batch": self.batch,
            "context": self.context,
            "head_dim": self.head_dim,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "page_size": self.page_size,
            "kv_dtype": self.kv_dtype,
            "q_dtype": "bfloat16",
        }

    @property
    def kv_bytes(self) -> int:
        return KV_DTYPES[self.kv_dtype].itemsize

    @property
    def flops(self) -> float:
        return roofline.decode_flops(self.batch, self.q_heads, self.context, self.head_dim)

    @property
    def nbytes(self) -> float:
        return roofline.decode_bytes(
            self.batch, self.q_heads, self.kv_heads, self.context, self.head_dim, self.kv_bytes, Q_DTYPE.itemsize
        )

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.context / self.page_size)

    def memory(self, sets: int) -> tuple[int, int]:
        """Device bytes (ours, peers) for ``sets`` rotated input sets: the paged K and V (+ the fill's
        temporaries) for ours; the dense bf16 copies plus one transient gather (+ its fp8 stage) for the peers."""
        row = self.kv_heads * self.head_dim
        paged = 2 * self.batch * self.pages_per_seq * self.page_size * row * self.kv_bytes
        fill = 2 * min(FILL_CHUNK_ELEMENTS, self.batch * self.context * row) * Q_DTYPE.itemsize
        dense = 2 * self.batch * self.context * row * Q_DTYPE.itemsize
        gather = dense + (2 * self.batch * self.pages_per_seq * self.page_size * row if self.kv_dtype == "fp8" else 0)
        return sets * paged + fill, sets * dense + gather

    def run(self, ctx: RunContext) -> list[dict]:
        import kernels

        contenders = ["phaseattn", *(p for p in peers.SDPA_BACKENDS if p in ctx.peers)]
        contenders += ["flex"] if "flex" in ctx.peers else []
        if not hasattr(kernels, "paged_decode_attention"):
            return skip_all(ctx, self, contenders, "kernels.paged_decode_attention is not in this checkout")
        sets = timing.rotation_sets(int(self.nbytes), ctx.l2_bytes)
        mem_ours, mem_peers = self.memory(sets)
        if mem_ours > ctx.memory_budget:
            why = f"needs {gib(mem_ours)} of device memory, budget {gib(ctx.memory_budget)}"
            return skip_all(ctx, self, contenders, why)

        cache = self._fill(ctx, sets)
        run_peers = mem_ours + mem_peers <= ctx.memory_budget
        splits = self._plan_splits(ctx)
        ours = Contender(
            "phaseattn",
            "ours",
            [
                functools.partial(
                    kernels.paged_decode_attention,
                    q,
                    *cache["kv"],
                    bt,
                    cache["seq_lens"],
                    num_splits=splits,
                    **cache["sc"],
                )
                for q, bt in zip(cache["q"], cache["block_tables"], strict=True)
            ],
            extra={"num_splits": splits if splits is not None else "automatic (host sync inside the timed region)"},
        )
        if not run_peers:
            entries, _ = run_all(ctx, [ours], **case_meta(self))
            why = f"dense copies need {gib(mem_peers)} more device memory, budget {gib(ctx.memory_budget)}"
            return entries + skip_all(ctx, self, contenders[1:], why)

        q4 = [q.unsqueeze(2) for q in cache["q"]]  # (batch, q_heads, 1, head_dim)
        dense = [
            peers.given((q, *self._gather(cache, bt))) for q, bt in zip(q4, cache["block_tables_long"], strict=True)
        ]
        squeeze = lambda out: out.squeeze(2)
        peer_list = [peers.sdpa(n, dense, causal=False, layout=squeeze) for n in peers.SDPA_BACKENDS if n in ctx.peers]
        if "flex" in ctx.peers:
            peer_list.append(
                peers.flex(dense, causal=False, seqlen_q=1, seqlen_k=self.context, device=ctx.device, layout=squeeze)
            )
        entries, reference = run_all(ctx, [ours, *peer_list], **case_meta(self))

        timed = [e for e in entries if e["kind"] == "peer" and e["status"] == "ok" and e["contender"] != "flex"]
        if timed:
            best = min(timed, key=lambda e: e["time_ms"])["contender"]
            gathering = [
                functools.partial(lambda q, bt: (q, *self._gather(cache, bt)), q, bt)
                for q, bt in zip(q4, cache["block_tables_long"], strict=True)
            ]
            extra = {"includes_gather": True, "gather_of": best}
            with_gather = peers.sdpa(best, gathering, causal=False, layout=squeeze, extra=extra)
            with_gather.name = f"{best}+gather"
            more, _ = run_all(ctx, [with_gather], reference=reference, **case_meta(self))
            entries += more
        return entries

    def _plan_splits(self, ctx: RunContext) -> int | None:
        """The split-KV factor, chosen outside the timed region by the rule ``num_splits=None`` applies, as an
        engine plans once per step: the launch then makes no device-to-host sync. None if the rule is absent."""
        from kernels import _runtime
        from kernels import decode as kernel_decode

        rule = getattr(kernel_decode, "choose_num_splits", None)
        if rule is None:
            return None
        return rule(self.batch, self.kv_heads, self.context, _runtime.sm_count(ctx.device))

    def _fill(self, ctx: RunContext, sets: int) -> dict:
        """A pool with ``sets`` × batch sequences of ``context`` tokens, its pages shuffled, written with
        ``kernels.write_kv_cache``; one query batch and block table per set."""
        import kernels

        b, ps, hkv, d = self.batch, self.page_size, self.kv_heads, self.head_dim
        gen = ctx.generator()
        dev = ctx.device
        num_pages = sets * b * self.pages_per_seq
        kv_dtype = KV_DTYPES[self.kv_dtype]
        k_cache = torch.empty(num_pages, ps, hkv, d, device=dev, dtype=kv_dtype)
        v_cache = torch.empty_like(k_cache)
        scales = {"k_scale": FP8_SCALE, "v_scale": FP8_SCALE} if self.kv_dtype == "fp8" else {}
        perm = torch.randperm(num_pages, generator=gen, device=dev)
        tables = perm.view(sets, b, self.pages_per_seq)
        chunk = max(1, FILL_CHUNK_ELEMENTS // (hkv * d))
        for table in tables:
            for t0 in range(0, b * self.context, chunk):
                t = torch.arange(t0, min(t0 + chunk, b * self.context), device=dev)
                seq, pos = t // self.context, t % self.context
                slots = table[seq, pos // ps] * ps + pos % ps
                k = torch.randn(t.numel(), hkv, d, generator=gen, device=dev, dtype=Q_DTYPE)
                v = torch.randn(t.numel(), hkv, d, generator=gen, device=dev, dtype=Q_DTYPE)
                kernels.write_kv_cache(k, v, k_cache, v_cache, slots, **scales)
                del k, v
        return {
            "kv": (k_cache, v_cache),
            "sc": scales,
            "q": [torch.randn(b, self.q_heads, d, generator=gen, device=dev, dtype=Q_DTYPE) for _ in range(sets)],
            "block_tables": [table.to(torch.int32) for table in tables],
            "block_tables_long": list(tables),
            "seq_lens": torch.full((b,), self.context, device=dev, dtype=torch.int32),
        }

    def _gather(self, cache: dict, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one set as dense (batch, kv_heads, context, head_dim) bf16 (views of (batch, context, ...))."""
        out = []
        for c in cache["kv"]:
            dense = c[table].flatten(1, 2)[:, : self.context]
            if dense.dtype != Q_DTYPE:
                dense = dense.to(Q_DTYPE).mul_(FP8_SCALE)
            out.append(dense.transpose(1, 2))
        return out[0], out[1]


def cases(*, batches, contexts, page_sizes, kv_dtypes, heads, tier: str = "sweep") -> list[DecodeCase]:
    """The sweep, ordered so that a time budget cuts the least important shapes: heads, then page size, then
    batch and context, bf16 and fp8 of one shape side by side (their ratio is one of the bars)."""
    return [
        DecodeCase(bsz, ctx, ps, kvd, hq, hkv, tier=tier)
        for hq, hkv in heads
        for ps in page_sizes
        for bsz in batches
        for ctx in contexts
        for kvd in kv_dtypes
    ]


def headline(smoke: bool) -> list[DecodeCase]:
    hq, hkv = SMOKE_HEADS[0] if smoke else (32, 8)
    return [
        DecodeCase(b, ctx, 16, kvd, hq, hkv, tier="headline")
        for b, ctx in (SMOKE_HEADLINE if smoke else HEADLINE)
        for kvd in ("bf16", "fp8")
    ]
