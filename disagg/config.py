"""The model configuration: what the engine needs to know about a Llama-family decoder, read from a Hugging Face
``config.json``.

Both spellings of the rotary settings are accepted: the one transformers 5 writes (``rope_parameters`` with
``rope_theta`` inside) and the one most published checkpoints carry (``rope_theta`` plus ``rope_scaling``).
Anything the model code would compute differently from transformers (another activation, another rotary type,
partial rotary) is refused here with a :class:`ModelLoadError`, so a checkpoint either runs right or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from disagg.errors import ModelLoadError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and settings of a Llama-family decoder.

    ``rope`` is the normalized rotary setting: ``(("rope_type", ...), ("rope_theta", ...), ...)`` sorted by key,
    hashable and comparable. ``windows`` holds each layer's sliding window (None: full causal attention).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: tuple[tuple[str, Any], ...]
    max_position_embeddings: int
    windows: tuple[int | None, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope)


def _rope(d: dict[str, Any], max_positions: int) -> tuple[tuple[str, Any], ...]:
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError("per-layer-type rotary settings are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if float(params.pop("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ModelLoadError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta)}
    if rope_type == "linear":
        out["factor"] = float(params["factor"])
    elif rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", max_positions)
        missing = [k for k in _LLAMA3_KEYS if k not in params]
        if missing:
            raise ModelLoadError(f"llama3 rope scaling is missing {', '.join(missing)}")
        for key in _LLAMA3_KEYS:
            out[key] = float(params[key]) if key != "original_max_position_embeddings" else int(params[key])
    return tuple(sorted(out.items()))


def _windows(d: dict[str, Any], architecture: str, num_layers: int) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if architecture == "LlamaForCausalLM":
        return (None,) * num_layers
    if architecture == "MistralForCausalLM":
        return (int(window) if window else None,) * num_layers
    # Qwen2: the window exists only with use_sliding_window, and only on the layers marked "sliding_attention"
    # (by default those from max_window_layers on), as transformers' Qwen2Config decides.
    window = int(window) if window and d.get("use_sliding_window", False) else None
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", num_layers)
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ModelLoadError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _count(d: dict[str, Any], name: str, default: int | None = None) -> int:
    """A size field (hidden_size, num_attention_heads, ...): an integer >= 1."""
    value = d.get(name, default)
    if value is None:
        raise KeyError(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"config.json: {name} must be an integer >= 1, got {value!r:.60}")
    return value


def token_ids(value: Any, where: str) -> tuple[int, ...]:
    """A token-id field (``eos_token_id``): None, an integer >= 0, or a list of them."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items):
        raise ModelLoadError(f"{where} must be a token id (an integer >= 0) or a list of them, got {value!r:.60}")
    return tuple(items)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from the dict of a Hugging Face ``config.json``.

    Raises:
        ModelLoadError: not a JSON object, unsupported architecture, activation or rotary type, missing required
            fields, or a field of the wrong type or range (sizes must be integers >= 1, token ids integers >= 0).
    """
    if not isinstance(d, dict):
        raise ModelLoadError(f"config.json must hold a JSON object, got a {type(d).__name__}")
    try:
        return _config(d)
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks the required field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:  # e.g. a rotary factor that is not a number
        raise ModelLoadError(f"config.json has a value of the wrong type: {e}") from None


def _config(d: dict[str, Any]) -> ModelConfig:
    archs = d.get("architectures") or [_MODEL_TYPES.get(d.get("model_type", ""), "")]
    architecture = archs[0]
    if architecture not in ARCHITECTURES:
        name = architecture or d.get("model_type") or "unknown"
        raise ModelLoadError(f"unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    if d.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    hidden, heads, layers = _count(d, "hidden_size"), _count(d, "num_attention_heads"), _count(d, "num_hidden_layers")
    kv_heads = _count(d, "num_key_value_heads", heads) if d.get("num_key_value_heads") is not None else heads
    if heads % kv_heads:
        raise ModelLoadError(f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                             f"({kv_heads})")  # fmt: skip
    if d.get("head_dim") is None and hidden % heads:
        raise ModelLoadError(f"config.json: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    max_positions = _count(d, "max_position_embeddings", 4096)
    qwen2 = architecture == "Qwen2ForCausalLM"
    bos = d.get("bos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=_count(d, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_count(d, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_count(d, "head_dim") if d.get("head_dim") is not None else hidden // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_rope(d, max_positions),
        max_position_embeddings=max_positions,
        windows=_windows(d, architecture, layers),
        qkv_bias=qwen2 or bool(d.get("attention_bias", False)),
        o_bias=not qwen2 and bool(d.get("attention_bias", False)),
        mlp_bias=not qwen2 and bool(d.get("mlp_bias", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=token_ids(bos, "config.json: bos_token_id")[0] if bos is not None else None,
        eos_token_ids=token_ids(d.get("eos_token_id"), "config.json: eos_token_id"),
        torch_dtype=d.get("dtype") or d.get("torch_dtype"),
    )
