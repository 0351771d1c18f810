"""disagg.config and disagg.rotary: reading Hugging Face config.json in both spellings, per-layer windows, and the
rotary frequencies (checked against transformers' own when it is installed)."""

import pytest
import torch

from disagg.config import config_from_hf
from disagg.errors import ModelLoadError
from disagg.rotary import inverse_frequencies

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512}


def test_old_and_new_rope_spellings_agree():
    old = config_from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    older = config_from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}})
    new = config_from_hf({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}})
    assert old.rope == older.rope == new.rope
    assert new.rope_params["rope_type"] == "llama3" and new.head_dim == 64 and new.num_kv_heads == 2
    plain = config_from_hf({**BASE, "rope_theta": 1e6})
    assert plain.rope_params == {"rope_type": "default", "rope_theta": 1e6}


def test_architecture_specific_settings():
    mistral = config_from_hf({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 128})
    assert mistral.windows == (128,) * 4 and not mistral.qkv_bias
    qwen = config_from_hf(
        {
            **BASE,
            "architectures": ["Qwen2ForCausalLM"],
            "sliding_window": 64,
            "use_sliding_window": True,
            "max_window_layers": 2,
        }
    )
    assert qwen.windows == (None, None, 64, 64) and qwen.qkv_bias and not qwen.o_bias
    qwen_off = config_from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64})
    assert qwen_off.windows == (None,) * 4
    by_type = config_from_hf(
        {**BASE, "model_type": "qwen2", "architectures": None, "sliding_window": 32, "use_sliding_window": True,
         "layer_types": ["sliding_attention", "full_attention"] * 2}
    )  # fmt: skip
    assert by_type.architecture == "Qwen2ForCausalLM" and by_type.windows == (32, None, 32, None)
    llama = config_from_hf({**BASE, "attention_bias": True, "eos_token_id": [7, 9], "tie_word_embeddings": True})
    assert llama.qkv_bias and llama.o_bias and llama.eos_token_ids == (7, 9) and llama.tie_word_embeddings


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["GemmaForCausalLM"]}, "unsupported architecture"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling is missing"),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act"),
    ],
)
def test_refuses_what_it_would_compute_differently(changes, message):
    with pytest.raises(ModelLoadError, match=message):
        config_from_hf({**BASE, **changes})


def test_missing_field_is_named():
    with pytest.raises(ModelLoadError, match="lacks the required field 'vocab_size'"):
        config_from_hf({k: v for k, v in BASE.items() if k != "vocab_size"})


@pytest.mark.parametrize(
    "rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "llama3", **LLAMA3}]
)
def test_inverse_frequencies_match_transformers(rope):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 500000.0, **rope}
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"}, rope_parameters=params
    )
    ours = inverse_frequencies(config_from_hf({**BASE, "rope_parameters": params}))
    if rope["rope_type"] == "default":
        theirs = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    assert torch.equal(ours, theirs)
