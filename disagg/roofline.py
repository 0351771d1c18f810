"""FLOP and byte counts of the pieces of LLM inference, and the roofline of a device.

The conventions are those of ``shared/PERF.md`` and the FlashAttention benchmarks, so numbers compare directly:

- attention FLOPs = 4 · B · Hq · Sq · Sk · D (the two matmuls, 2 FLOPs per multiply-add). With causal masking only
  the visible (query, key) pairs count: for Sq == Sk that halves the count; in general the exact number of visible
  pairs is used (``causal_pairs``);
- attention bytes = q, k, v read once and out written once (the least any kernel can move);
- decode bytes = every K and V element of the context read once at the cache dtype + q read + out written;
- a GEMM (m × k) @ (k × n) costs 2·m·n·k FLOPs and moves both operands and the result once;
- a device-to-device copy of n bytes moves 2·n bytes (read plus written): the bandwidth ceiling counts both.

Everything here is plain Python arithmetic on ints/floats: no torch, no GPU, cheap enough for a simulator's
inner loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def causal_pairs(seqlen_q: int, seqlen_k: int, window: int | None = None) -> int:
    """Visible (query, key) pairs of one head under bottom-right causal masking (query i sees key j iff
    j <= i + Sk - Sq), optionally with a sliding window (and j > i + Sk - Sq - window)."""
    offset = seqlen_k - seqlen_q
    first = max(0, -offset)  # rows before this one sit at negative positions and see nothing
    if first >= seqlen_q:
        return 0
    if window is None:
        # row i sees p + 1 = i + offset + 1 keys: an arithmetic series from first + offset + 1 up to Sk.
        return (seqlen_q - first) * (first + offset + 1 + seqlen_k) // 2
    return sum(min(i + offset + 1, window) for i in range(first, seqlen_q))


def attention_flops(
    batch: int, q_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool, window: int | None = None
) -> float:
    """Forward attention FLOPs: 4 · B · Hq · (visible pairs) · D."""
    pairs = causal_pairs(seqlen_q, seqlen_k, window) if causal else seqlen_q * seqlen_k
    return 4.0 * batch * q_heads * pairs * head_dim


def attention_bytes(
    batch: int, q_heads: int, kv_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, dtype_bytes: int = 2
) -> float:
    """Least bytes a prefill attention moves: q and out (Hq heads), k and v (Hkv heads), each once."""
    return float(batch * head_dim * dtype_bytes * (2 * q_heads * seqlen_q + 2 * kv_heads * seqlen_k))


def decode_flops(batch: int, q_heads: int, context: int, head_dim: int) -> float:
    """One decode step: one query row per sequence against ``context`` keys."""
    return 4.0 * batch * q_heads * context * head_dim


def decode_bytes(
    batch: int, q_heads: int, kv_heads: int, context: int, head_dim: int, kv_bytes: float = 2, q_bytes: int = 2
) -> float:
    """One decode step: K and V of the whole context at the cache dtype, plus q read and out written."""
    return float(batch * (2 * kv_heads * context * head_dim * kv_bytes + 2 * q_heads * head_dim * q_bytes))


def gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def gemm_bytes(m: int, n: int, k: int, dtype_bytes: int = 2) -> float:
    return float((m * k + k * n + m * n) * dtype_bytes)


def copy_bytes(nbytes: int) -> float:
    """Bytes a copy of ``nbytes`` moves: every byte read once and written once."""
    return 2.0 * nbytes


def intensity(flops: float, nbytes: float) -> float:
    """Arithmetic intensity in FLOP per byte."""
    return flops / nbytes if nbytes > 0 else float("inf")


def prefill_intensity(
    seqlen: int, head_dim: int, q_heads: int, kv_heads: int, causal: bool = True, dtype_bytes: int = 2
) -> float:
    """Intensity of prefill attention over one sequence of ``seqlen`` tokens (independent of the batch): grows
    linearly with the sequence length, which is why prefill is compute-bound."""
    return intensity(
        attention_flops(1, q_heads, seqlen, seqlen, head_dim, causal),
        attention_bytes(1, q_heads, kv_heads, seqlen, seqlen, head_dim, dtype_bytes),
    )


def decode_intensity(
    batch: int, q_heads: int, kv_heads: int, context: int, head_dim: int, kv_bytes: float = 2, q_bytes: int = 2
) -> float:
    """Intensity of one decode step: about (q_heads / kv_heads) · 2 / kv_bytes whatever the batch and context,
    since every sequence reads its own KV: batching does not help attention, only the GEMMs."""
    return intensity(
        decode_flops(batch, q_heads, context, head_dim),
        decode_bytes(batch, q_heads, kv_heads, context, head_dim, kv_bytes, q_bytes),
    )


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder that its costs depend on. ``tied_embeddings``: the LM head reuses
    the embedding table (one matrix fewer in memory; the LM-head GEMM still runs)."""

    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def params(self) -> int:
        """Parameter count of the layers plus embedding and LM head (one matrix when tied)."""
        attn = self.hidden * self.head_dim * (2 * self.q_heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.ffn
        tables = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden
        return self.layers * (attn + mlp + 2 * self.hidden) + tables

    @property
    def gemm_params(self) -> int:
        """Parameters a forward pass reads through GEMMs: every projection, the MLP and the LM head. The embedding
        lookup reads only the rows of the batch's tokens, and the norms are negligible."""
        attn = self.hidden * self.head_dim * (2 * self.q_heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.ffn) + self.vocab * self.hidden

    def weight_bytes(self, dtype_bytes: float = 2) -> float:
        return self.params * dtype_bytes

    def kv_bytes_per_token(self, kv_bytes: float = 2) -> float:
        """K and V of one token over all layers."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * kv_bytes

    def gemm_flops(self, tokens: int, logits: int | None = None) -> float:
        """FLOPs of every projection and the MLP for ``tokens`` tokens, and of the LM head for ``logits`` of them
        (default: all; a serving step needs logits only for the last token of each sequence). Attention excluded."""
        per_layer = gemm_flops(tokens, self.head_dim * (self.q_heads + 2 * self.kv_heads), self.hidden)
        per_layer += gemm_flops(tokens, self.hidden, self.q_heads * self.head_dim)
        per_layer += 3 * gemm_flops(tokens, self.ffn, self.hidden)
        return self.layers * per_layer + gemm_flops(tokens if logits is None else logits, self.vocab, self.hidden)

    def gemm_bytes(self, tokens: int, dtype_bytes: int = 2, logits: int | None = None) -> float:
        """GEMM weights read once plus activations in and out of each GEMM (the LM head's for ``logits`` rows,
        default all)."""
        layers = self.layers * (2 * self.hidden + self.head_dim * (2 * self.q_heads + 2 * self.kv_heads) + 4 * self.ffn)
        head = (self.hidden + self.vocab) * (tokens if logits is None else logits)
        return self.gemm_params * dtype_bytes + dtype_bytes * (tokens * layers + head)

    def prefill_attention_flops(self, tokens: int, past: int = 0) -> float:
        """Causal attention of ``tokens`` new query tokens over themselves and ``past`` cached tokens (a whole
        prompt when past == 0, a chunk of one otherwise), all layers."""
        return self.layers * attention_flops(1, self.q_heads, tokens, past + tokens, self.head_dim, causal=True)

    def prefill_attention_bytes(self, tokens: int, past: int = 0, dtype_bytes: int = 2) -> float:
        """Least bytes of that attention over all layers: q and out of the new tokens, K and V of the whole context."""
        return self.layers * attention_bytes(
            1, self.q_heads, self.kv_heads, tokens, past + tokens, self.head_dim, dtype_bytes
        )

    def decode_attention_flops(self, context_sum: int) -> float:
        """One decode step of a batch whose contexts add up to ``context_sum`` tokens, all layers (the count is
        linear in the context, so the sum is all it needs)."""
        return self.layers * decode_flops(1, self.q_heads, context_sum, self.head_dim)

    def decode_attention_bytes(self, batch: int, context_sum: int, kv_bytes: float = 2, q_bytes: int = 2) -> float:
        """Bytes of one decode step of ``batch`` sequences with contexts adding up to ``context_sum``, all layers:
        the whole context's K and V once plus q and out of each sequence."""
        if batch == 0:
            return 0.0
        one = decode_bytes(1, self.q_heads, self.kv_heads, context_sum, self.head_dim, kv_bytes, q_bytes)
        rest = decode_bytes(batch - 1, self.q_heads, self.kv_heads, 0, self.head_dim, kv_bytes, q_bytes)
        return self.layers * (one + rest)

    def allreduce_bytes(self, tokens: int, dtype_bytes: int = 2) -> float:
        """Activations all-reduced by a tensor-parallel forward over ``tokens`` tokens: two per layer (after the
        attention output projection and after the MLP), ``tokens × hidden`` elements each."""
        return 2.0 * self.layers * tokens * self.hidden * dtype_bytes

    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | Mapping[str, Any], name: str | None = None) -> ModelShape:
        """The shape of a dense decoder from a Hugging Face ``config.json`` (a path to the file or to its folder,
        or the parsed dict). Multimodal configs are read through their ``text_config``. Mixture-of-experts models
        are refused: their cost is not that of a dense decoder. Sliding windows are not part of the shape."""
        if isinstance(config, Mapping):
            cfg, origin = dict(config), name or "config"
        else:
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                cfg = json.load(f)
            origin = path
        cfg = {**cfg, **cfg.get("text_config", {})}
        if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")):
            raise ValueError(f"config: {origin} describes a mixture-of-experts model, which ModelShape cannot cost")
        missing = [
            k
            for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"config: {origin} lacks {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        return cls(
            name=name or cfg.get("_name_or_path") or cfg.get("model_type") or os.path.basename(str(origin)),
            layers=int(cfg["num_hidden_layers"]),
            hidden=int(cfg["hidden_size"]),
            q_heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            ffn=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def gemm_intensity(self, tokens: int, dtype_bytes: int = 2) -> float:
        """Intensity of the model's GEMMs for a step of ``tokens`` tokens (the batch, in decode): the weights are
        read once per step whatever the batch, so intensity grows about linearly with it."""
        return intensity(self.gemm_flops(tokens), self.gemm_bytes(tokens, dtype_bytes))


LLAMA3_8B = ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256)
LLAMA3_70B = ModelShape("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256)


@dataclass(frozen=True)
class Roofline:
    """A device's two ceilings: ``flops`` (FLOP/s, e.g. a measured bf16 matmul) and ``bandwidth`` (bytes/s,
    e.g. a measured device-to-device copy counting bytes read plus written)."""

    flops: float
    bandwidth: float

    @property
    def ridge(self) -> float:
        """The intensity (FLOP/byte) where the two roofs meet."""
        return self.flops / self.bandwidth

    def attainable(self, ai: float) -> float:
        """Attainable FLOP/s at arithmetic intensity ``ai``."""
        return min(self.flops, ai * self.bandwidth)

    def time(self, flops: float, nbytes: float) -> float:
        """Lower bound on the time of a piece of work: the larger of its compute and memory times."""
        return max(flops / self.flops, nbytes / self.bandwidth)


H100_SXM_DATASHEET = Roofline(flops=989e12, bandwidth=3.35e12)
"""NVIDIA's H100 SXM datasheet figures (dense bf16, HBM3). Assumed, not measured: what a figure may use only when
no measured ceilings exist, and must say so. Measured values are lower (~798 TFLOP/s, ~3.0 TB/s; shared/PERF.md)."""
