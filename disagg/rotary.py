"""Rotary position embeddings (RoPE) as Llama, Mistral and Qwen2 use them, including Llama 3's frequency scaling.

The head dimension is split into two halves that rotate together (``rotate_half``, not interleaved pairs), the
convention of the Hugging Face checkpoints. Angles are computed in float32 from integer positions, so a token's
rotation does not depend on which batch or stage computes it: prefill and decode agree bit for bit.
"""

from __future__ import annotations

import math

import torch

from disagg.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """float32 (head_dim // 2,) angular frequencies on the CPU, scaled as the config's rope type says."""
    p = config.rope_params
    dim = config.head_dim
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if p["rope_type"] == "linear":
        return inv_freq / p["factor"]
    if p["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_context = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / lo, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / hi) & (wavelen <= old_context / lo)
        return torch.where(medium, blended, scaled)
    return inv_freq


class Rotary:
    """cos/sin tables for arbitrary positions and their application to q and k."""

    def __init__(self, config: ModelConfig, device: torch.device | str):
        self.inv_freq = inverse_frequencies(config).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int (tokens,). Returns cos, sin of shape (tokens, 1, head_dim) in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (tokens, heads, head_dim) by the angles of its tokens."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
