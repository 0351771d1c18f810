"""Teacher-forced negative log-likelihood of a text through the engine's own kernels: ``python -m disagg eval``.

The text's token ids are cut into windows that fit the model's context. When the tokenizer starts the text with
the model's BOS token, every window starts with BOS (as ``disagg.train_tiny`` trains) and every token of the text is
predicted exactly once; otherwise windows overlap by one token and the text's first token is context only.
Each window is prefilled in chunks of at most
``max_batch_tokens`` tokens: a chunk's K/V go into a paged pool in the chosen KV dtype and its queries attend over
every cached token with ``kernels.paged_prefill_attention``, so later chunks read earlier chunks' K/V back from the
cache (fp8 KV is visible in the result). Bits per byte = total NLL / ln 2 / UTF-8 bytes of the text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from disagg.attention import StepBatch
from disagg.engine import make_pool
from disagg.errors import EngineError
from disagg.model import CausalLM
from disagg.tokenizer import Tokenizer


@dataclass(frozen=True)
class Perplexity:
    """What :func:`evaluate` measured. ``nll_per_token`` in nats; ``bits_per_byte`` over the text's UTF-8 bytes."""

    tokens: int
    bytes: int
    windows: int
    chunk_tokens: int
    nll_per_token: float
    perplexity: float
    bits_per_byte: float
    time_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def windows(ids: list[int], context: int, bos: int | None) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs covering ``ids`` (without a leading BOS); every target token appears once."""
    if bos is not None:  # BOS + the window's tokens but its last, which predicts nothing
        return [([bos, *ids[i : i + context][:-1]], ids[i : i + context]) for i in range(0, len(ids), context)]
    step = context - 1
    return [(ids[i : i + context][:-1], ids[i + 1 : i + context]) for i in range(0, len(ids) - 1, step)]


@torch.inference_mode()
def evaluate(
    model: CausalLM,
    tokenizer: Tokenizer,
    text: str,
    *,
    kv_dtype: torch.dtype | None = None,
    max_batch_tokens: int = 128,
    page_size: int = 16,
    num_pages: int | None = None,
) -> Perplexity:
    """Score ``text`` (see the module docstring). Raises EngineError when the text has fewer than two tokens or
    ``max_batch_tokens`` < 1."""
    if max_batch_tokens < 1:
        raise EngineError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    bos = model.config.bos_token_id if ids[:1] == [model.config.bos_token_id] else None
    ids = ids[1:] if bos is not None else ids  # each window gets its own BOS
    if len(ids) < (1 if bos is not None else 2):
        raise EngineError("the text is too short to score (it needs at least one predicted token)")
    context = model.config.max_position_embeddings
    pairs = windows(ids, context, bos)
    pool = make_pool(
        model,
        page_size=page_size,
        num_pages=num_pages or -(-context // page_size),
        kv_dtype=kv_dtype,
        prefix_cache=False,
    )
    total = 0.0
    count = 0
    for inputs, targets in pairs:
        pool.allocate("w", len(inputs))
        for lo in range(0, len(inputs), max_batch_tokens):
            hi = min(lo + max_batch_tokens, len(inputs))
            batch = StepBatch.build(pool, chunks=[("w", lo, hi)])  # the engine's chunked-prefill metadata
            chunk = torch.tensor(inputs[lo:hi], device=model.device)
            logits = model.logits(model(chunk, batch.positions, batch))
            wanted = torch.tensor(targets[lo:hi], dtype=torch.long, device=model.device)
            total += F.cross_entropy(logits, wanted, reduction="sum").item()
            count += len(wanted)
        pool.free("w")
    nbytes = len(text.encode("utf-8"))
    return Perplexity(
        tokens=count,
        bytes=nbytes,
        windows=len(pairs),
        chunk_tokens=max_batch_tokens,
        nll_per_token=total / count,
        perplexity=math.exp(total / count),
        bits_per_byte=total / math.log(2) / nbytes,
        time_s=time.perf_counter() - start,
    )
