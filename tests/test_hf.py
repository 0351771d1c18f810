"""phaseattn inside Hugging Face transformers: ``attn_implementation="phaseattn"`` against transformers' own
attention ("sdpa"; "eager" where sdpa cannot run the model) on tiny random models of each architecture, float32 on
CPU: logits within 1e-4 relative, identical greedy tokens; padded batches, packed (padding-free) inputs, sinks, and
what the integration refuses."""

import subprocess
import sys

import pytest
import torch

import kernels
from kernels import hf
from tests.util import DEVICE, ON_CUDA, randn, randomize, rel_err

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# name -> (model class, config class, config extras, the reference implementation)
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, "sdpa"),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=5), "sdpa"),  # < prompt length
    "qwen2-bias-mqa": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=1), "sdpa"),
    # Gemma-2: softcap small enough to bend these logits, alternating window/full layers, its own query scale.
    # transformers' sdpa refuses softcap, so eager is the reference.
    "gemma2-softcap": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=None, query_pre_attn_scalar=24),
        "eager",
    ),
    # gpt-oss: attention sinks (the module's `sinks`), window/full layers; transformers' sdpa ignores sinks.
    "gptoss-sinks": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(sliding_window=5, num_local_experts=2, num_experts_per_tok=1),
        "eager",
    ),
}
PROMPT = [5, 99, 1, 42, 42, 7, 120, 64, 3, 9, 17, 88]
NEW_TOKENS = 3
TOL = 1e-4
COMPILE_BACKEND = "inductor" if ON_CUDA else "aot_eager"  # see tests/test_compile.py


@pytest.fixture(scope="module", autouse=True)
def registered():
    return kernels.register_transformers()


def tensor(rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype, device=DEVICE)


def tiny(name: str, seed: int = 0):
    model_cls, config_cls, extra, reference = ARCHS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    return model.to(DEVICE), reference


def run(model, impl: str, fn):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return fn(model)


def greedy(ids, mask=None, new=NEW_TOKENS):
    mask = torch.ones_like(ids) if mask is None else mask
    return lambda m: m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)


def test_register_returns_the_names_and_import_kernels_does_not_import_transformers(registered):
    assert registered == ["phaseattn"]
    assert "phaseattn" in transformers.AttentionInterface._global_mapping
    code = "import sys, kernels; assert 'transformers' not in sys.modules, 'import kernels imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_greedy_tokens_match_transformers(arch):
    model, reference = tiny(arch)
    ids = tensor([PROMPT])
    tokens = run(model, "phaseattn", greedy(ids))
    assert tokens.shape[1] == len(PROMPT) + NEW_TOKENS
    assert tokens.tolist() == run(model, reference, greedy(ids)).tolist()
    # the logits of the prompt and the generated tokens in one prefill, which the decode steps above fed back
    logits = run(model, "phaseattn", lambda m: m(tokens).logits)
    assert rel_err(logits, run(model, reference, lambda m: m(tokens).logits)) < TOL


def test_left_padded_batch():
    """generate() on a left-padded batch, sliding window included: padded keys are dropped before the kernel, in
    the prefill and in every decode step."""
    model, reference = tiny("mistral-window", seed=1)
    short = PROMPT[3:10]
    ids = tensor([PROMPT, [0] * (len(PROMPT) - len(short)) + short])
    mask = torch.ones_like(ids)
    mask[1, : len(PROMPT) - len(short)] = 0
    tokens = run(model, "phaseattn", greedy(ids, mask))
    assert tokens.tolist() == run(model, reference, greedy(ids, mask)).tolist()
    full_mask = torch.cat([mask, mask.new_ones(2, NEW_TOKENS)], 1)
    out = run(model, "phaseattn", lambda m: m(tokens, attention_mask=full_mask).logits)
    ref = run(model, reference, lambda m: m(tokens, attention_mask=full_mask).logits)
    assert rel_err(out[full_mask.bool()], ref[full_mask.bool()]) < TOL


def test_right_padded_prefill():
    model, reference = tiny("qwen2-bias-mqa", seed=2)
    ids = tensor([PROMPT, PROMPT[:5] + [0] * (len(PROMPT) - 5)])
    mask = tensor([[1] * len(PROMPT), [1] * 5 + [0] * (len(PROMPT) - 5)])
    out = run(model, "phaseattn", lambda m: m(ids, attention_mask=mask).logits)
    ref = run(model, reference, lambda m: m(ids, attention_mask=mask).logits)
    assert rel_err(out[mask.bool()], ref[mask.bool()]) < TOL


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_match_separate_forwards(how):
    """Padding-free input: two prompts in one row, told apart by restarting position ids or by cu_seq_lens."""
    model, reference = tiny("mistral-window", seed=3)
    a, b = PROMPT, PROMPT[2:9]
    ids = tensor([a + b])
    positions = tensor([list(range(len(a))) + list(range(len(b)))])
    if how == "position_ids":
        kwargs = dict(position_ids=positions)
    else:
        cu = tensor([0, len(a), len(a) + len(b)], dtype=torch.int32)
        kwargs = dict(
            position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=len(a), max_length_k=len(a)
        )
    packed = run(model, "phaseattn", lambda m: m(ids, use_cache=False, **kwargs).logits)[0]
    separate = torch.cat([run(model, reference, lambda m, p=p: m(tensor([p])).logits)[0] for p in (a, b)])
    assert rel_err(packed, separate) < TOL


def eager_sinks_reference(module, q, k, v, scaling, sinks):
    """Softmax over [scaled logits, the head's sink], the sink's column dropped (what gpt-oss trains with)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    logits = (q.double() @ k.double().transpose(2, 3)) * scaling
    lq, lk = q.shape[2], k.shape[2]
    visible = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + lk - lq
    logits = logits.masked_fill(~visible, float("-inf"))
    sink = sinks.double().reshape(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    return (probs @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("q_len", [1, 7])
def test_sinks_from_the_module(gen, q_len):
    heads, kv_heads, d, kv_len = 4, 2, 32, 9
    q = randn(2, heads, q_len, d, dtype=torch.float32, generator=gen)
    k = randn(2, kv_heads, kv_len, d, dtype=torch.float32, generator=gen)
    v = randn(2, kv_heads, kv_len, d, dtype=torch.float32, generator=gen)
    module = torch.nn.Module()
    module.is_causal = True
    module.sinks = torch.nn.Parameter(randn(heads, dtype=torch.float32, generator=gen) * 2, requires_grad=False)
    out, weights = hf.attention_forward(module, q, k, v, None, scaling=0.2)
    assert weights is None
    assert rel_err(out, eager_sinks_reference(module, q, k, v, 0.2, module.sinks)) < 1e-5


def test_refusals_name_the_fallback(gen):
    module = torch.nn.Module()
    module.is_causal = True
    q = randn(1, 4, 3, 32, dtype=torch.float32, generator=gen)
    k = randn(1, 2, 5, 32, dtype=torch.float32, generator=gen)
    cases = {
        "4D attention mask": dict(attention_mask=q.new_zeros(1, 1, 3, 5)),
        "dropout": dict(dropout=0.1),
        "paged-cache": dict(block_table=tensor([[0]], dtype=torch.int32)),
        "not one contiguous run": dict(attention_mask=tensor([[True, False, True, True, True]]), sliding_window=2),
        "without causal": dict(sliding_window=2, is_causal=False),
        "packed sequences": dict(position_ids=tensor([[0, 1, 0]])),
    }
    for what, kwargs in cases.items():
        mask = kwargs.pop("attention_mask", None)
        with pytest.raises(ValueError, match=rf"(?s){what}.*attn_implementation='sdpa'"):
            hf.attention_forward(module, q, k, k, mask, **kwargs)
    with pytest.raises(ValueError, match="head dim 64"):
        hf.attention_forward(module, q, k, q.new_ones(1, 2, 5, 64), None)
    with pytest.raises(ValueError, match="gradients"):
        hf.attention_forward(module, q.requires_grad_(), k, k, None)


def test_model_refusals():
    model, _ = tiny("llama")
    model.set_attn_implementation("phaseattn")
    ids = tensor([PROMPT[:4]])
    with pytest.raises(ValueError, match="sdpa"):
        model(ids)  # weights need gradients
    with torch.no_grad(), pytest.raises(ValueError, match="4D attention mask"):
        model(ids, attention_mask=ids.new_ones(1, 1, 4, 4, dtype=torch.bool))


def test_generate_batch_with_a_paged_implementation():
    if "paged|phaseattn" not in kernels.register_transformers():
        pytest.skip(
            f"transformers {transformers.__version__}: continuous batching (generate_batch) accepts only "
            "'paged|eager', 'sdpa' and flash implementation names, so no paged phaseattn is registered"
        )


def test_continuous_batching_still_refuses_other_names():
    """Why the test above skips. When transformers starts accepting registered names here, this fails: then
    register a paged implementation backed by kernels.paged_decode_attention."""
    model, _ = tiny("llama")
    model.set_attn_implementation("phaseattn")
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        model.generate_batch([PROMPT[:4]], generation_config=transformers.GenerationConfig(max_new_tokens=1))


def test_attention_forward_compiles_fullgraph(gen):
    """The unpadded path (prefill and DynamicCache decode) has no host sync: Dynamo traces it whole."""
    module = torch.nn.Module()
    module.is_causal = True
    fn = lambda q, k, v: hf.attention_forward(module, q, k, v, None, scaling=0.2, sliding_window=6)[0]
    graph = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    for q_len in (1, 5):
        q = randn(2, 4, q_len, 32, dtype=torch.float32, generator=gen)
        k, v = (randn(2, 2, 9, 32, dtype=torch.float32, generator=gen) for _ in range(2))
        assert torch.equal(graph(q, k, v), fn(q, k, v))


def test_model_decode_step_compiles_fullgraph():
    """A whole model's decode step against transformers' DynamicCache, compiled with fullgraph=True."""
    model, _ = tiny("llama")
    model.set_attn_implementation("phaseattn")
    ids = tensor([PROMPT])
    with torch.no_grad():
        caches = [transformers.DynamicCache(config=model.config) for _ in range(2)]
        token = model(ids, cache=caches[0]).logits[:, -1:].argmax(-1)
        model(ids, cache=caches[1])
        step = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
        eager = model(token, cache=caches[0]).logits
        graph = step(token, cache=caches[1]).logits
    assert torch.equal(graph, eager)
