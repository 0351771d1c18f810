"""Choosing the next token of every row of a batch from its logits, on the logits' device, in a few tensor ops.

Each row has its own settings (:class:`~disagg.request.SamplingParams`): temperature 0 is greedy (argmax);
otherwise the logits are divided by the temperature, then top-k keeps the k largest (ties with the k-th kept),
then top-p keeps the smallest prefix of the sorted probabilities whose mass reaches p, and min-p drops tokens
whose probability is below ``min_p`` times the largest (top-p and min-p both judge the probabilities left by
top-k). The token is then drawn with the Gumbel-max trick, ``argmax(logit + G)`` over the kept tokens with
``G = -log(-log U)``, an exact draw from their softmax.

U is not taken from a stateful generator but from a counter-based one: a hash of (request seed, token index,
vocab id) (:func:`uniform_noise`). A request's i-th draw therefore depends on nothing but its seed, i and its
logits: the same whichever batch, row, stage or process computes it, so ``prefill`` (token 0) + ``decode``
(tokens 1..) reproduce ``run`` for sampled requests as well as greedy ones.

Numerics: the logits are shifted so the row's largest is 0 before dividing by the temperature, so a temperature
small enough that logits / temperature overflows leaves the largest logit at 0 and the others at -inf: the draw
is the argmax (greedy), never token 0 nor NaN.

The settings travel host→device as one small tensor; nothing is read back to the host except by :func:`sample`,
which returns Python ints (the engine needs them to decide who stops). :func:`sample_ids` keeps them on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from disagg.request import SamplingParams

_MASK32 = 0xFFFFFFFF


def row_key(seed: int, index: int) -> tuple[int, int]:
    """Two 32-bit words keying the noise of token ``index`` of a request seeded with ``seed`` (any Python ints)."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" xorshift-multiply finalizer of Chris Wellons' hash-prospector, with
    TheIronBorn's constants), in place on an int64 tensor holding values in [0, 2**32). Both multipliers are below
    2**31, so no product reaches 2**63: the arithmetic is exact on every device, never relying on overflow."""
    h ^= h >> 16
    h.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    h ^= h >> 15
    h.mul_(0x735A2D97).bitwise_and_(_MASK32)
    h ^= h >> 15
    return h


def uniform_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """U in (0, 1), float32 (batch, vocab): element (b, v) is a hash of (keys[b], v) with 23 random bits, at the
    centres of 2**23 equal bins (so U is never 0 or 1, and -log(-log U) is finite).

    keys: int64 (batch, 2), each word in [0, 2**32) (see :func:`row_key`). Pure integer arithmetic, so a row's
    noise is identical on every device and in every batch.
    """
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :]
    h = _mix32(ids ^ keys[:, :1])
    h ^= keys[:, 1:]
    h = _mix32(h) >> 9
    return (h.float() + 0.5) * 2.0**-23


@dataclass(frozen=True)
class _Settings:
    """Sampled rows' settings as device tensors (one host→device copy), plus what the host knows about them."""

    temperature: torch.Tensor  # float32 (rows, 1), > 0 (greedy rows, in filter_probs only, hold 1)
    top_k: torch.Tensor  # int64 (rows, 1) in 1..vocab
    top_p: torch.Tensor  # float32 (rows, 1)
    min_p: torch.Tensor  # float32 (rows, 1)
    keys: torch.Tensor  # int64 (rows, 2)
    filters: bool  # some row uses top-k, top-p or min-p


def _settings(params: Sequence[SamplingParams], indices: Sequence[int], vocab: int, device) -> _Settings:
    rows, filters = [], False
    for p, i in zip(params, indices, strict=True):
        k = p.top_k if 0 < p.top_k < vocab else vocab
        rows.append((p.temperature or 1.0, k, p.top_p, p.min_p, *row_key(p.seed, i)))
        filters |= k < vocab or p.top_p < 1 or p.min_p > 0
    # float64 holds every field exactly (32-bit keys, k <= vocab); one copy carries them all
    table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 6).to(device)
    return _Settings(
        temperature=table[:, 0:1].float(),
        top_k=table[:, 1:2].long(),
        top_p=table[:, 2:3].float(),
        min_p=table[:, 3:4].float(),
        keys=table[:, 4:6].long(),
        filters=filters,
    )


def _filtered_logits(logits: torch.Tensor, s: _Settings) -> torch.Tensor:
    """float32 (batch, vocab): max-shifted logits / temperature, -inf where top-k, top-p or min-p drop a token."""
    x = logits.float()
    # Largest logit -> exactly 0 before the division: an overflow can only send the others to -inf (see top).
    x = (x - x.amax(dim=-1, keepdim=True)) / s.temperature.clamp_min(torch.finfo(torch.float32).tiny)
    if not s.filters:
        return x
    xs, order = torch.sort(x, dim=-1, descending=True)
    kth = xs.gather(1, s.top_k - 1)
    xs = xs.masked_fill(xs < kth, float("-inf"))
    ps = torch.softmax(xs, dim=-1)
    before = torch.cumsum(ps, dim=-1) - ps  # mass of the tokens ranked above each one
    drop = (before >= s.top_p) | (ps < s.min_p * ps[:, :1])
    drop[:, 0] = False  # the most likely token always stays (top_p > 0, min_p <= 1: only rounding could drop it)
    xs = xs.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, xs)


def filter_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """float32 (batch, vocab) probabilities each row samples from: softmax of the kept tokens after temperature,
    top-k, top-p and min-p (zeros where filtered out); a greedy row is one-hot at its argmax."""
    s = _settings(params, [0] * len(params), logits.shape[-1], logits.device)
    probs = torch.softmax(_filtered_logits(logits, s), dim=-1)
    onehot = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(greedy[:, None], onehot, probs)


def sample_ids(logits: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int]) -> torch.Tensor:
    """Next token of each row, as an int64 (batch,) tensor on the logits' device (no host read).

    logits: float (batch, vocab); params[b], indices[b]: row b's settings and the index of the token being
    chosen (0 for the first generated token). Greedy rows cost an argmax only: the host knows which rows draw,
    and only those are filtered and given noise.
    """
    if len(params) != len(indices) or len(params) != logits.shape[0]:
        raise ValueError(
            f"need one setting and one index per row: {logits.shape[0]} rows, {len(params)}, {len(indices)}"
        )
    greedy = logits.argmax(dim=-1)
    drawing = [b for b, p in enumerate(params) if not p.greedy]
    if not drawing:
        return greedy
    every = len(drawing) == len(params)
    rows = None if every else torch.tensor(drawing, device=logits.device)
    sub = logits if every else logits.index_select(0, rows)
    s = _settings([params[b] for b in drawing], [indices[b] for b in drawing], logits.shape[-1], logits.device)
    gumbel = uniform_noise(s.keys, logits.shape[-1]).log_().neg_().log_().neg_()  # -log(-log U)
    drawn = (_filtered_logits(sub, s) + gumbel).argmax(dim=-1)
    return drawn if every else greedy.index_copy(0, rows, drawn)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int]) -> list[int]:
    """:func:`sample_ids` read back to the host: ``batch`` token ids."""
    return sample_ids(logits, params, indices).tolist()
