"""``disagg eval``: teacher-forced NLL through the engine's kernels, in chunks over the paged cache. On ``tiny`` and
held-out text it equals plain PyTorch's loss on the same windows, lies far below the 8 bits per byte of an
untrained byte model and near the training log's held-out figure; fp8 KV moves it by less than FP8_BOUND bits per
byte; a broken (non-causal) mask moves it by more than three times that (0.24 bits per byte measured)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import kernels
from disagg import tiny
from disagg.cli import main
from disagg.evaluate import evaluate, windows
from disagg.loader import load_model
from disagg.train_tiny import sequence_loss, split_topics

TEXT_BYTES = 192  # one window of tiny's 256-token context, prefilled in 3 chunks of 64
CHUNK = 64
FP8_BOUND = 0.05  # bits per byte: fp8 e4m3 KV (scale 1) against float32 KV on the same text


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_model("tiny")
    held_out = split_topics()[1]
    text = held_out[1000 : 1000 + TEXT_BYTES]
    full = evaluate(model, tokenizer, text, max_batch_tokens=CHUNK)
    return model, tokenizer, text, full


def test_windows_predict_every_token_once():
    assert windows(list(range(10)), 4, 99) == [
        ([99, 0, 1, 2], [0, 1, 2, 3]),
        ([99, 4, 5, 6], [4, 5, 6, 7]),
        ([99, 8], [8, 9]),
    ]
    assert windows(list(range(7)), 4, None) == [([0, 1, 2], [1, 2, 3]), ([3, 4, 5], [4, 5, 6])]


@pytest.mark.slow
def test_chunked_eval_equals_pytorch_and_is_near_the_training_log(setup):
    model, tokenizer, text, full = setup
    assert full.tokens == full.bytes == TEXT_BYTES and full.windows == 1
    ids = torch.tensor([tokenizer.encode(text)])  # BOS + bytes: inputs ids[:, :-1] predict ids[:, 1:]
    with torch.no_grad():
        ref = sequence_loss(model, ids).item()
    assert full.nll_per_token == pytest.approx(ref, rel=1e-4)
    assert full.perplexity == pytest.approx(math.exp(ref), rel=1e-4)
    assert full.bits_per_byte == pytest.approx(ref / math.log(2), rel=1e-4)
    logged = float((tiny.TRAINED_DIR / "training_log.csv").read_text().splitlines()[-1].split(",")[-1])
    assert full.bits_per_byte < 3.0 and abs(full.bits_per_byte - logged) < 0.75


@pytest.mark.slow
def test_fp8_kv_moves_bits_per_byte_a_little_and_a_broken_mask_a_lot(setup, monkeypatch, tmp_path, capsys):
    model, tokenizer, text, full = setup
    path = tmp_path / "text.txt"
    path.write_text(text)
    assert (
        main(["eval", "--text-file", str(path), "--kv-dtype", "fp8", "--max-batch-tokens", str(CHUNK), "--json"]) == 0
    )
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["kv_dtype"] == "float8_e4m3fn" and fp8["tokens"] == TEXT_BYTES
    assert 0 < abs(fp8["bits_per_byte"] - full.bits_per_byte) < FP8_BOUND, fp8["bits_per_byte"] - full.bits_per_byte

    real = kernels.PagedPrefillPlan  # what the engine's steps attend with (made once per step)
    monkeypatch.setattr(kernels, "PagedPrefillPlan", lambda *a, **kw: real(*a, **{**kw, "causal": False}))
    peeking = evaluate(model, tokenizer, text, max_batch_tokens=CHUNK)  # each chunk sees its own future
    assert abs(peeking.bits_per_byte - full.bits_per_byte) > 3 * FP8_BOUND  # measured: +0.24 bits per byte


def test_eval_refuses_what_it_cannot_score(tmp_path, capsys):
    assert main(["eval", "--text-file", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read --text-file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", "--model", "tiny-random", "--text-file", str(tmp_path / "empty.txt")]) == 1
    assert "too short to score" in capsys.readouterr().err
