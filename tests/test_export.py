"""disagg.export: the KV export format, its page-size independence, and every refusal happening before any page
of the importing pool is allocated."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from disagg import tiny
from disagg.decode import DecodeStage
from disagg.engine import make_pool
from disagg.errors import ExportError
from disagg.export import METADATA_KEY, _header, read_export
from disagg.loader import build_model, load_model
from disagg.prefill import PrefillStage
from disagg.request import Request, SamplingParams
from disagg.rotary import apply_rotary

PROMPTS = [[256, *range(60, 83)], [256, 7, 8, 9, 10, 11]]  # 24 and 6 tokens: across and within one page
SAMPLING = SamplingParams(max_new_tokens=4, temperature=0.8, top_k=20, seed=5)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random")[0]


def prefill(model, page_size, occupy=0):
    """Exports of PROMPTS from a pool with ``page_size``; ``occupy`` pages are held by another sequence first, so
    the prompts land on other pages."""
    pool = make_pool(model, page_size=page_size, num_pages=12)
    if occupy:
        pool.allocate("other", occupy * page_size)
    stage = PrefillStage(model, pool)
    for i, p in enumerate(PROMPTS):
        stage.add(Request(str(i), p, SAMPLING))
    results = stage.step()
    pool.free("other")
    assert pool.is_fully_free() and not stage.has_work
    return [r.export for r in results]


@pytest.fixture(scope="module")
def exports(model):
    return prefill(model, 16)


def test_export_holds_exactly_the_prompt_kv_in_position_order(model, exports):
    pool = make_pool(model, page_size=16, num_pages=4)
    e = read_export(exports[0], model, pool)
    assert e.token_ids == PROMPTS[0] and e.request_id == "0" and e.num_tokens == 24
    assert e.sampling == dataclasses.replace(SAMPLING, eos_token_ids=(tiny.EOS,))
    assert 0 <= e.first_token < tiny.CONFIG.vocab_size and e.ttft_s > 0
    # layer 0's K and V, computed directly from the weights
    layer = model.model.layers[0]
    ids = torch.tensor(PROMPTS[0])
    with torch.inference_mode():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        cos, sin = model.rotary.cos_sin(torch.arange(24), x.dtype)
        k = apply_rotary(layer.self_attn.k_proj(x).view(24, 2, 64), cos, sin)
        v = layer.self_attn.v_proj(x).view(24, 2, 64)
    torch.testing.assert_close(e.k[0], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.v[0], v, rtol=1e-5, atol=1e-5)
    assert len(e.k) == len(e.v) == tiny.CONFIG.num_layers


@pytest.mark.parametrize("page_size, occupy", [(8, 3), (32, 1)])
def test_export_does_not_depend_on_page_size_or_placement(model, exports, page_size, occupy):
    pool = make_pool(model, page_size=16, num_pages=4)
    for ref, other in zip(exports, prefill(model, page_size, occupy), strict=True):
        a, b = read_export(ref, model, pool), read_export(other, model, pool)
        assert a.first_token == b.first_token
        for la, lb in zip(a.k + a.v, b.k + b.v, strict=True):
            assert torch.equal(la, lb)


def rewrite(data: bytes, **changes) -> bytes:
    """The export with metadata fields changed (the checksum left as it was, unless changed too)."""
    meta = json.loads(_header(data)[METADATA_KEY])
    return st_save(st_load(data), metadata={METADATA_KEY: json.dumps({**meta, **changes})})


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x40])


BAD = {
    "payload bit flip": (flip_last_byte, "checksum mismatch"),
    "first token changed": (lambda d: rewrite(d, first_token=1), "checksum mismatch"),
    "sampling changed": (lambda d: rewrite(d, sampling={**SAMPLING.to_dict(), "seed": 6}), "checksum mismatch"),
    "truncated half": (lambda d: d[: len(d) // 2], "truncated"),
    "truncated by one byte": (lambda d: d[:-1], "truncated"),
    "truncated header": (lambda d: d[:5], "truncated"),
    "empty": (lambda d: b"", "truncated"),
    "unknown version": (lambda d: rewrite(d, format_version=2), "unknown format version 2"),
    "other architecture": (
        lambda d: rewrite(d, fingerprint={**json.loads(_header(d)[METADATA_KEY])["fingerprint"], "num_kv_heads": 4}),
        "another model: num_kv_heads",
    ),
    "not an export": (lambda d: st_save({"x": torch.ones(3)}), "not a phaseattn KV export"),
    "not safetensors": (lambda d: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "not a safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_exports_are_refused_before_any_allocation(model, exports, case):
    damage, message = BAD[case]
    pool = make_pool(model, page_size=8, num_pages=8)
    stage = DecodeStage(model, pool)
    with pytest.raises(ExportError, match=message):
        stage.add(damage(exports[0]))
    assert pool.is_fully_free() and not stage.has_work
    stage.add(exports[1])  # the stage goes on with good exports
    while stage.has_work:
        stage.step()
    assert pool.is_fully_free()


def test_any_flipped_byte_is_refused(model, exports):
    """Wherever a byte changes (length field, header, metadata, payload), the import is refused cleanly."""
    data = exports[1]
    pool = make_pool(model, page_size=8, num_pages=4)
    for pos in [*range(8), *range(8, len(data), max(1, len(data) // 97))]:
        with pytest.raises(ExportError):
            read_export(data[:pos] + bytes([data[pos] ^ 0x24]) + data[pos + 1 :], model, pool)
    assert pool.is_fully_free()


def test_exports_for_other_weights_dtype_or_kv_dtype_are_refused(model, exports):
    tensors = tiny.state_dict()
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5  # a "fine-tune": same shapes
    finetune = build_model(tiny.CONFIG, tensors, torch.float32, model.device)
    bf16 = load_model("tiny-random", dtype="bfloat16")[0]
    cases = [
        (finetune, make_pool(finetune, num_pages=4), "another model: weights"),
        (bf16, make_pool(bf16, num_pages=4), "another model: dtype"),
        (model, make_pool(model, num_pages=4, kv_dtype=torch.float8_e4m3fn), "KV dtype"),
    ]
    for m, pool, message in cases:
        with pytest.raises(ExportError, match=message):
            DecodeStage(m, pool).add(exports[0])
        assert pool.is_fully_free()
