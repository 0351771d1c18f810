"""``tiny``, the trained default model: it ships as a Hugging Face checkpoint that ``transformers`` reads to the same
logits as our loader and kernels; greedy text from it is printable, made of words separated by spaces, most of
which occur in its training text; and its training script runs (a few steps here, not the whole training)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from disagg import tiny
from disagg.attention import StepBatch
from disagg.engine import Engine, make_pool
from disagg.loader import load_model
from disagg.request import SamplingParams
from disagg.train_tiny import CONFIG, TrainSettings, split_topics, train
from tests.util import rel_err

PROMPTS = ("The return statement", "A class definition creates")
NEW_TOKENS = 48
# Checked fractions (what the trained weights give on PROMPTS: see the README's Engine section)
MIN_PRINTABLE = 0.98  # of the generated characters: printable ASCII, space or newline
MIN_KNOWN_WORDS = 0.8  # of the generated words (letters only, 2+ long): words of the training text


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def test_tiny_is_the_shipped_checkpoint_with_its_training_log(model):
    m, tokenizer = model
    assert m.config == CONFIG and m.dtype == torch.float32
    assert (tiny.TRAINED_DIR / "model.safetensors").stat().st_size <= 8_000_000
    assert tokenizer.encode("Hi") == [tiny.BOS, 72, 105]
    log = (tiny.TRAINED_DIR / "training_log.csv").read_text().splitlines()
    last = log[-1].split(",")
    assert last[0] == str(TrainSettings().steps) and float(last[-1]) < 2.0  # held-out bits per byte


def test_transformers_reads_tiny_to_the_same_logits(model):
    transformers = pytest.importorskip("transformers")
    m, tokenizer = model
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny.TRAINED_DIR).eval()
    ids = tokenizer.encode("The while statement is used for repeated execution")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    pool = make_pool(m, page_size=16, num_pages=8)
    pool.allocate("r", len(ids))
    batch = StepBatch.build(pool, chunks=[("r", 0, len(ids))])
    logits = m.logits(m(torch.tensor(ids), batch.positions, batch))
    assert rel_err(logits, ref) < 1e-5
    assert logits.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_greedy_text_is_printable_words_from_the_training_text(model):
    m, tokenizer = model
    outputs = Engine(m).generate([tokenizer.encode(p) for p in PROMPTS], SamplingParams(max_new_tokens=NEW_TOKENS))
    text = "".join(tokenizer.decode(o.output_ids) for o in outputs)
    assert all(o.error is None and len(o.output_ids) == NEW_TOKENS for o in outputs)
    printable = sum(c.isascii() and (c.isprintable() or c == "\n") for c in text)
    assert printable / len(text) >= MIN_PRINTABLE, text
    assert text.count(" ") >= len(text) / 12, text  # English has a space every ~5-6 characters
    vocabulary = set(re.findall(r"[A-Za-z]+", split_topics()[0]))
    words = [w for w in re.findall(r"[A-Za-z]+", text) if len(w) >= 2]
    assert len(words) >= 8, text
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= MIN_KNOWN_WORDS, (known, text)


def test_training_script_runs_a_few_steps_and_writes_a_loadable_checkpoint(tmp_path):
    settings = TrainSettings(steps=3, batch_size=2, seq_len=32, warmup=1, log_every=1, eval_every=3, threads=1)
    rows = train(settings, tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in rows) and rows[-1]["held_out_bpb"] > 0
    assert rows[0]["train_loss"] < math.log(CONFIG.vocab_size) + 0.5  # the init spreads logits little
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # seeded: the same 3 batches every run
    m, _ = load_model(tmp_path)
    assert m.config == CONFIG
    log = (tmp_path / "training_log.csv").read_text()
    assert log.startswith("# python ") and "step,seconds,lr,train_loss,held_out_loss,held_out_bpb" in log


def test_held_out_text_is_not_trained_on():
    train_text, held_out = split_topics()
    assert 0.01 < len(held_out) / (len(train_text) + len(held_out)) < 0.2  # 2.3 %: every tenth topic, short ones
    assert held_out[:200] not in train_text
