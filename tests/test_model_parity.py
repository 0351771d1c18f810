"""The model against ``transformers`` itself: small random checkpoints of every supported architecture, built and
saved with transformers, loaded by disagg.loader, must give the same logits (prefill path and paged decode path)
and the same greedy tokens (float32, CPU). Also: sharded checkpoints, tokenizer.json, and the loader's errors."""

import json
import shutil

import pytest
import torch

from disagg.attention import StepBatch
from disagg.engine import Engine, make_pool
from disagg.errors import ModelLoadError
from disagg.loader import load_model
from disagg.request import SamplingParams
from disagg.tokenizer import HFTokenizer
from tests.util import randomize, rel_err

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=128,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the scaling changes the angles of these short prompts
}
ARCHS = {
    "llama3-biases": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True),
    ),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=6)),  # shorter than the prompts
    "qwen2-bias-tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
}
PROMPTS = [list(range(3, 23)), [200, 17, 5, 99, 1, 42, 42, 7, 250, 64, 128, 3, 9]]  # 20 and 13 tokens
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, greedy continuations of PROMPTS, float32 logits of prompt + continuation)."""
    out = {}
    for seed, (name, (model_cls, config_cls, extra)) in enumerate(ARCHS.items()):
        config = getattr(transformers, config_cls)(**COMMON, **extra)
        hf = getattr(transformers, model_cls)(config).eval()
        randomize(hf, seed)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        continuations, logits = [], []
        with torch.no_grad():
            for p in PROMPTS:
                ids = torch.tensor([p])
                full = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
                continuations.append(full[0, len(p) :].tolist())
                logits.append(hf(full).logits[0].float())
        out[name] = (path, continuations, logits)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers_in_prefill_and_decode(checkpoints, arch):
    path, continuations, ref = checkpoints[arch]
    model, _ = load_model(path)
    assert model.config.architecture == ARCHS[arch][0]
    pool = make_pool(model, page_size=8, num_pages=16)
    seqs = [p + c for p, c in zip(PROMPTS, continuations, strict=True)]
    # prefill path: both full sequences in one packed batch
    for i, s in enumerate(seqs):
        pool.allocate(("full", i), len(s))
    lengths = [len(s) for s in seqs]
    batch = StepBatch.build(pool, chunks=[(("full", i), 0, n) for i, n in enumerate(lengths)])
    hidden = model(torch.tensor(seqs[0] + seqs[1]), batch.positions, batch)
    logits = model.logits(hidden)
    assert rel_err(logits[: lengths[0]], ref[0]) < 1e-5
    assert rel_err(logits[lengths[0] :], ref[1]) < 1e-5

    # decode path: prefill the prompts, then feed the continuations one step at a time, both sequences batched
    for i, p in enumerate(PROMPTS):
        pool.allocate(i, len(p) + NEW_TOKENS)
        n = len(p)
        batch = StepBatch.build(pool, chunks=[(i, 0, n)])
        model(torch.tensor(p), batch.positions, batch)
    for step in range(NEW_TOKENS - 1):
        pos = torch.tensor([len(p) + step for p in PROMPTS])
        tokens = torch.tensor([c[step] for c in continuations])
        batch = StepBatch.build(pool, decode=[(i, int(pos[i])) for i in range(2)])
        logits = model.logits(model(tokens, batch.positions, batch))
        for i in range(2):
            assert rel_err(logits[i], ref[i][int(pos[i])]) < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_match_transformers(checkpoints, arch):
    path, continuations, _ = checkpoints[arch]
    model, tokenizer = load_model(path)
    assert tokenizer is None
    outputs = Engine(model, page_size=8).generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [o.output_ids for o in outputs] == continuations
    # colocated, prompts in chunks of 8 (Mistral's window of 6 spans chunk edges), then again from the prefix cache
    engine = Engine(model, mode="colocated", page_size=8, max_batch_tokens=8)
    for cached in ([0, 0], [16, 8]):
        outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
        assert [o.output_ids for o in outputs] == continuations
        assert [o.cached_tokens for o in outputs] == cached


def test_sharded_checkpoint_with_tokenizer(checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path, continuations, _ = checkpoints["llama3-biases"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))

    model, tokenizer = load_model(tmp_path)
    unsharded, _ = load_model(path)
    assert model.weights_digest == unsharded.weights_digest
    assert isinstance(tokenizer, HFTokenizer)
    prompt = tokenizer.encode(" ".join(f"w{i}" for i in PROMPTS[0]))
    assert prompt == PROMPTS[0]
    out = Engine(model).generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS))[0]
    assert out.output_ids == continuations[0]
    assert tokenizer.decode(out.output_ids) == " ".join(f"w{i}" for i in continuations[0])


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def set_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))

    return edit


def test_loader_errors(checkpoints, tmp_path):
    path = checkpoints["llama3-biases"][0]
    cases = [
        (set_config(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
        (set_config(hidden_act="gelu"), "hidden_act 'gelu'"),
        (set_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope type 'yarn'"),
        (set_config(intermediate_size=128), "tensor model.layers.0.mlp.down_proj.weight has shape"),
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "no \\*.safetensors weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "cannot read"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ModelLoadError, match=message):
            load_model(broken_copy(path, tmp_path / str(i), edit))
    with pytest.raises(ModelLoadError, match="neither 'tiny', 'tiny-random' nor a directory"):
        load_model(tmp_path / "nowhere")


def test_missing_shard_and_missing_tensor(checkpoints, tmp_path):
    path = checkpoints["mistral-window"][0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"names {shard.name}, which is missing"):
        load_model(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="the checkpoint lacks"):
        load_model(tmp_path / "sharded")
