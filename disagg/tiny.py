"""The embedded models, found by name instead of a path:

- ``"tiny"``, the default: a byte-level 2-layer Llama (hidden 192, 6 query / 2 KV heads of dim 32, SwiGLU 512,
  tied embeddings, context 256; ~0.84 M parameters) trained by :mod:`disagg.train_tiny` on the text of Python's
  documentation topics. It ships as a Hugging Face checkpoint in :data:`TRAINED_DIR` (``transformers`` loads it
  too) with its training log. It writes English-like text made of real words from Python's documentation; it has
  no knowledge to speak of.
- ``"tiny-random"``: :data:`CONFIG` with weights drawn from a fixed-seed generator in memory (:func:`state_dict`),
  identical on every machine: the fastest model that exercises every part of the engine (GQA, paging, export,
  continuous batching); its text is noise (printable ASCII: the LM head rows of all other tokens are zero).

Both read UTF-8 bytes (ids 0-255) plus BOS and EOS. Point ``--model`` at a checkpoint directory for language.
"""

from __future__ import annotations

from pathlib import Path

import torch

from disagg.config import ModelConfig

NAMES = ("tiny", "tiny-random")
TRAINED_DIR = Path(__file__).parent / "tiny_model"
BOS, EOS = 256, 257
SEED = 20240607

CONFIG = ModelConfig(  # tiny-random's; tiny's is TRAINED_DIR/config.json
    architecture="LlamaForCausalLM",
    vocab_size=258,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope=(("rope_theta", 10000.0), ("rope_type", "default")),
    max_position_embeddings=1024,
    windows=(None, None),
    bos_token_id=BOS,
    eos_token_ids=(EOS,),
    torch_dtype="float32",
)


def state_dict(
    config: ModelConfig = CONFIG, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``tiny-random``'s weights: float32 CPU tensors under Hugging Face names. Linear weights ~ N(0, 1/fan_in)
    keep activations O(1) through the layers, so logits are well spread and greedy decoding is stable across
    devices. Another Llama ``config`` (more layers, other shapes; untied embeddings) gets random weights drawn the
    same way (tests, benchmarks). ``device``/``dtype``: draw them there, in that dtype (a full-size model's
    weights straight on the GPU, e.g. for ``python -m bench step``); the values then come from that device's
    generator, so only the CPU float32 default is the same on every machine."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(SEED)
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return randn(out_features, in_features) / in_features**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * randn(c.hidden_size)

    tensors = {"model.embed_tokens.weight": randn(c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm()
        tensors[p + "self_attn.q_proj.weight"] = linear(q, c.hidden_size)
        tensors[p + "self_attn.k_proj.weight"] = linear(kv, c.hidden_size)
        tensors[p + "self_attn.v_proj.weight"] = linear(kv, c.hidden_size)
        tensors[p + "self_attn.o_proj.weight"] = linear(c.hidden_size, q)
        tensors[p + "post_attention_layernorm.weight"] = norm()
        tensors[p + "mlp.gate_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        tensors[p + "mlp.up_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        tensors[p + "mlp.down_proj.weight"] = linear(c.hidden_size, c.intermediate_size)
    tensors["model.norm.weight"] = norm()
    head = linear(c.vocab_size, c.hidden_size) * 4.0
    printable = torch.zeros(c.vocab_size, dtype=torch.bool, device=device)
    printable[32:127] = True
    tensors["lm_head.weight"] = head * printable[:, None]  # other tokens get logit 0: greedy text stays printable
    return tensors
