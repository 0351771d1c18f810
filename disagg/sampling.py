"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with reproducible seeded draws.

A sampled token is drawn with the exponential race (``argmax(p / E)`` with E ~ Exp(1) per token, an exact draw
from p) where E comes from a generator seeded by (request seed, token index). The draw for a request's i-th token
is therefore the same whichever batch, stage or process computes it: the prefill stage draws token 0, the decode
stage tokens 1.., and ``run`` equals ``prefill`` + ``decode`` through files for sampled requests as well as greedy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from disagg.request import SamplingParams


def draw_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for token ``index`` of a request seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def filter_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 (vocab,) logits -> probabilities after temperature, top-k and top-p (zeros where filtered out)."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=0) - sorted_p  # mass of the tokens ranked above each one
        drop = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p (never empty)
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int]) -> list[int]:
    """Next token of each row.

    logits: float32 (batch, vocab); params[b], indices[b]: row b's settings and the index of the token being
    chosen (0 for the first generated token). Returns ``batch`` token ids.
    """
    tokens = torch.argmax(logits, dim=-1)
    for b, (p, i) in enumerate(zip(params, indices, strict=True)):
        if p.greedy:
            continue
        probs = filter_probs(logits[b], p)
        gen = torch.Generator(device=logits.device).manual_seed(draw_seed(p.seed, i))
        race = torch.empty_like(probs).exponential_(generator=gen)
        tokens[b] = torch.argmax(probs / race)
    return tokens.tolist()
