"""The prefill sweep: ``kernels.prefill_attention`` against SDPA (each backend) and FlexAttention.

As in the FlashAttention benchmarks the total token count is held fixed (16k) while the sequence length varies,
so every point does comparable work: batch = total_tokens / seqlen. bf16, equal-length sequences packed in the
varlen layout our kernel takes; peers see the same memory viewed as (batch, heads, seq, head_dim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bench import peers, timing
from bench.runner import Contender, RunContext, run_all
from disagg import roofline

DTYPE = torch.bfloat16
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_HEAD_DIMS = (128, 64, 256)  # d128 first: when a time budget cuts the sweep, the headline dim is covered
DEFAULT_HEADS = ((32, 8), (32, 32))
DEFAULT_TOTAL_TOKENS = 16384
HEADLINE = ((8192, 128, True, 32, 8), (16384, 128, True, 32, 8))  # seqlen, head_dim, causal, q_heads, kv_heads

SMOKE_SEQLENS = (64, 128)
SMOKE_CAUSAL = (True,)  # on CPU each new mask is a FlexAttention compile of ~20 s; a new length costs less
SMOKE_HEAD_DIMS = (64,)
SMOKE_HEADS = ((4, 2),)
SMOKE_TOTAL_TOKENS = 256
SMOKE_HEADLINE = ((128, 64, True, 4, 2),)


@dataclass(frozen=True)
class PrefillCase:
    seqlen: int
    head_dim: int
    causal: bool
    q_heads: int
    kv_heads: int
    total_tokens: int
    tier: str = "sweep"
    phase: str = "prefill"

    @property
    def batch(self) -> int:
        return self.total_tokens // self.seqlen

    @property
    def key(self) -> tuple:
        return (self.phase, self.seqlen, self.head_dim, self.causal, self.q_heads, self.kv_heads, self.total_tokens)

    @property
    def shape(self) -> dict:
        return {
            "seqlen": self.seqlen,
            "batch": self.batch,
            "head_dim": self.head_dim,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "causal": self.causal,
            "dtype": "bfloat16",
        }

    @property
    def flops(self) -> float:
        return roofline.attention_flops(self.batch, self.q_heads, self.seqlen, self.seqlen, self.head_dim, self.causal)

    @property
    def nbytes(self) -> float:
        return roofline.attention_bytes(
            self.batch, self.q_heads, self.kv_heads, self.seqlen, self.seqlen, self.head_dim, DTYPE.itemsize
        )

    def run(self, ctx: RunContext) -> list[dict]:
        import kernels

        b, s, hq, hkv, d = self.batch, self.seqlen, self.q_heads, self.kv_heads, self.head_dim
        gen = ctx.generator()
        sets = []
        for _ in range(timing.rotation_sets(int(self.nbytes), ctx.l2_bytes)):
            q = torch.randn(b * s, hq, d, generator=gen, device=ctx.device, dtype=DTYPE)
            k = torch.randn(b * s, hkv, d, generator=gen, device=ctx.device, dtype=DTYPE)
            v = torch.randn(b * s, hkv, d, generator=gen, device=ctx.device, dtype=DTYPE)
            sets.append((q, k, v))
        cu = torch.arange(0, b + 1, device=ctx.device, dtype=torch.int32) * s

        def bhsd(t: torch.Tensor) -> torch.Tensor:  # (b*s, h, d) -> (b, h, s, d), a view
            return t.view(b, s, t.shape[1], d).transpose(1, 2)

        views = [(bhsd(q), bhsd(k), bhsd(v)) for q, k, v in sets]
        getters = [peers.given(t) for t in views]
        from_bhsd = lambda out: out.transpose(1, 2)  # (b, h, s, d) -> (b, s, h, d)
        contenders = [
            Contender(
                "phaseattn",
                "ours",
                [
                    functools.partial(
                        kernels.prefill_attention, q, k, v, cu, cu, causal=self.causal, max_seqlen_q=s, max_seqlen_k=s
                    )
                    for q, k, v in sets
                ],
                layout=lambda out: out.view(b, s, hq, d),
            )
        ]
        for name in peers.SDPA_BACKENDS:
            if name in ctx.peers:
                contenders.append(peers.sdpa(name, getters, causal=self.causal, layout=from_bhsd))
        if "flex" in ctx.peers:
            contenders.append(
                peers.flex(getters, causal=self.causal, seqlen_q=s, seqlen_k=s, device=ctx.device, layout=from_bhsd)
            )
        entries, _ = run_all(
            ctx, contenders, phase=self.phase, tier=self.tier, shape=self.shape, flops=self.flops, nbytes=self.nbytes
        )
        _record_autotuned_config(ctx, entries[0])
        return entries


def _record_autotuned_config(ctx: RunContext, entry: dict) -> None:
    """Keep the tile configuration our kernel ran with next to its time (for bench/NOTES.md): the autotuner's
    choice, or the heuristic default when autotuning is off (PHASEATTN_AUTOTUNE=0, ``--no-autotune``)."""
    from kernels import _runtime, prefill

    if entry["status"] != "ok":
        return
    if _runtime.AUTOTUNE:
        entry["tile_config"] = f"autotuned: {getattr(prefill._autotuned, 'best_config', None)}"
    else:
        entry["tile_config"] = f"default: {prefill.default_config(entry['shape']['head_dim'], DTYPE)}"
    ctx.results.write()


def cases(
    *,
    seqlens,
    head_dims,
    causal,
    heads,
    total_tokens: int,
    tier: str = "sweep",
) -> list[PrefillCase]:
    """The sweep, ordered head_dim-major so the compiled kernels of one head_dim are reused back to back."""
    out = []
    for d in head_dims:
        for hq, hkv in heads:
            for c in causal:
                for s in seqlens:
                    if s > total_tokens:
                        continue
                    out.append(PrefillCase(s, d, c, hq, hkv, total_tokens, tier))
    return out


def headline(smoke: bool) -> list[PrefillCase]:
    total = SMOKE_TOTAL_TOKENS if smoke else DEFAULT_TOTAL_TOKENS
    return [
        PrefillCase(s, d, c, hq, hkv, total, "headline") for s, d, c, hq, hkv in (SMOKE_HEADLINE if smoke else HEADLINE)
    ]
