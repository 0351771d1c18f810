"""The export reader against hostile files: valid exports mutated (bit flips, truncations, header-length lies,
deep JSON nesting, non-finite and huge numbers and wrong types in every metadata field, with the checksum
recomputed as anyone can) are each refused with one ExportError, the pool untouched; ``python -m disagg decode``
reports each refused file on one line, decodes every other file of the folder, and exits non-zero."""

from __future__ import annotations

import json
import random
import struct

import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from disagg.cli import main
from disagg.decode import DecodeStage
from disagg.engine import make_pool
from disagg.errors import ExportError
from disagg.export import METADATA_KEY, _checksum, _header, export_bytes_bound, read_export_file, write_export
from disagg.export_schema import MAX_HEADER_BYTES, METADATA, SAMPLING
from disagg.loader import load_model
from disagg.prefill import PrefillStage
from disagg.request import Request, SamplingParams

PROMPTS = [[256, 1, 2, 3], [256, 4, 5], [256, 6, 7, 8, 9]]
MARKER = 123456789.25  # a float serialized as is, then replaced by a number that overflows a float


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def exports(model):
    stage = PrefillStage(model, make_pool(model, page_size=8, num_pages=8))
    for i, p in enumerate(PROMPTS):
        stage.add(Request(str(i), p, SamplingParams(max_new_tokens=2, temperature=0.7, top_p=0.9, seed=i)))
    return [r.export for r in stage.step()]


def _meta(data: bytes) -> dict:
    return json.loads(_header(data)[METADATA_KEY])


def with_metadata(data: bytes, meta: dict, *, text=None) -> bytes:
    """``data`` with its metadata replaced by ``meta`` and a checksum recomputed over it (as any writer can);
    ``text(json)`` may edit the serialized metadata (for JSON no Python value serializes to, like ``1e400``)."""
    tensors = st_load(data)
    if meta["checksum"] == _meta(data)["checksum"]:  # else the checksum itself is the mutated field
        meta = {**meta, "checksum": _checksum(meta, tensors, (len(tensors) - 2) // 2)}
    raw = json.dumps(meta, sort_keys=True)
    return st_save(tensors, metadata={METADATA_KEY: text(raw) if text else raw})


def with_header(data: bytes, header: bytes, length: int | None = None) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(header) if length is None else length) + header + data[8 + size :]


def _fields(meta: dict):
    """(path, value) of every metadata field, sampling's fields and the first eos id included."""
    for name in METADATA:
        yield (name,), meta[name]
    for name in SAMPLING:
        yield ("sampling", name), meta["sampling"][name]
    yield ("sampling", "eos_token_ids", 0), meta["sampling"]["eos_token_ids"][0]


def _set(meta: dict, path: tuple, value) -> dict:
    meta = json.loads(json.dumps(meta))
    node = meta
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return meta


def mutations(data: bytes) -> dict[str, bytes]:
    """name -> a damaged copy of export ``data``."""
    rng = random.Random(0)
    meta = _meta(data)
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size]
    out = {}
    for pos in rng.sample(range(len(data)), 24):
        out[f"bit flip at {pos}"] = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
    for n in [0, 7, 8, 9, size // 2, size + 7, size + 8, len(data) // 2, len(data) - 1]:
        out[f"truncated to {n}"] = data[:n]
    for lie in [0, 1, size - 1, size + 1, len(data), 2**63, 2**64 - 1]:
        out[f"header length {lie}"] = struct.pack("<Q", lie) + data[8:]
    out["header over the size bound"] = with_header(data, header + b" " * MAX_HEADER_BYTES)
    out["header nested 1000 deep"] = with_header(data, b"[" * 1000 + b"]" * 1000)
    out["header entry nested 1000 deep"] = with_header(data, b'{"x":' + b"[" * 1000 + b"]" * 1000 + b"}")
    out["header not UTF-8"] = with_header(data, b'{"\xff\xfe": 1}')
    out["metadata nested 1000 deep"] = st_save(st_load(data), metadata={METADATA_KEY: "[" * 1000 + "]" * 1000})
    nested = '"ttft_s": ' + "[" * 1000 + "]" * 1000 + ', "ttft_was": '
    out["metadata field nested 1000 deep"] = with_metadata(data, meta, text=lambda t: t.replace('"ttft_s": ', nested))
    out["metadata not JSON"] = st_save(st_load(data), metadata={METADATA_KEY: "{not json"})
    out["metadata a list"] = st_save(st_load(data), metadata={METADATA_KEY: "[1, 2]"})
    numbers = {
        "inf": float("inf"),
        "-inf": float("-inf"),
        "nan": float("nan"),
        "10**400": 10**400,
        "-10**400": -(10**400),
    }
    swaps = {"true": True, "string": "1", "list": [1], "object": {"a": 1}, "null": None, "float": 1.5, "-1": -1}
    for path, original in _fields(meta):
        where = ".".join(map(str, path))
        for name, value in numbers.items():
            out[f"{where} = {name}"] = with_metadata(data, _set(meta, path, value))
        out[f"{where} = 1e400"] = with_metadata(
            data, _set(meta, path, MARKER), text=lambda t: t.replace(str(MARKER), "1e400")
        )
        for name, value in swaps.items():
            same_type = type(value) is type(original) or (value is None and path[-1] == "eos_token_ids")
            if not same_type:
                out[f"{where} = {name}"] = with_metadata(data, _set(meta, path, value))
    out["unknown field"] = with_metadata(data, {**meta, "extra": 1})
    out["missing field"] = with_metadata(data, {k: v for k, v in meta.items() if k != "ttft_s"})
    out["checksum of another export"] = with_metadata(data, {**meta, "checksum": "0" * 64})
    out["eos list of 2000"] = with_metadata(data, _set(meta, ("sampling", "eos_token_ids"), [1] * 2000))
    return out


def test_every_mutation_is_one_export_error_and_the_pool_is_unchanged(model, exports):
    pool = make_pool(model, page_size=8, num_pages=8)
    stage = DecodeStage(model, pool)
    cases = mutations(exports[0])
    assert len(cases) > 200
    for name, data in cases.items():
        with pytest.raises(ExportError) as refused:
            stage.add(data)
            pytest.fail(f"accepted: {name}")
        message = str(refused.value)
        assert "\n" not in message and len(message) < 400, (name, message)
        if "=" in name or "field" in name or "eos" in name:  # checksum recomputed: refused for what it holds
            assert "checksum mismatch" not in message, (name, message)
        assert pool.is_fully_free() and not stage.has_work, name
    stage.add(exports[1])  # the stage goes on with a good export
    while stage.has_work:
        stage.step()
    assert pool.is_fully_free()


def test_decode_command_reports_each_bad_file_and_decodes_the_others(exports, tmp_path, capsys):
    bad = mutations(exports[0])
    chosen = ["metadata nested 1000 deep", "ttft_s = 10**400", "first_token = inf", "header length 1", "truncated to 9"]
    chosen += ["sampling.eos_token_ids.0 = inf", "header nested 1000 deep"]
    for i, name in enumerate(chosen):
        write_export(tmp_path / f"bad-{i}.safetensors", bad[name])
    write_export(tmp_path / "good-1.safetensors", exports[1])
    # A valid export whose request id is another (refused) file's name: both results must be reported.
    collide = with_metadata(exports[2], {**_meta(exports[2]), "request_id": "bad-0.safetensors"})
    write_export(tmp_path / "good-2.safetensors", collide)
    assert main(["decode", "--import-dir", str(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["requests"]
    assert len(rows) == len(chosen) + 2
    errors = [r["error"] for r in rows if r["error"] is not None]
    assert sorted(e.split(":")[0] for e in errors) == sorted(f"bad-{i}.safetensors" for i in range(len(chosen)))
    assert all("\n" not in e for e in errors)
    decoded = {r["request_id"]: r for r in rows if r["error"] is None}
    assert set(decoded) == {"1", "bad-0.safetensors"}
    assert all(len(r["output_ids"]) == 2 for r in decoded.values())


def test_a_file_larger_than_any_export_is_refused_unread(model, exports, tmp_path):
    """A file bigger than an export of the pool's longest sequence can be is refused from its size alone (a sparse
    file of 64 GiB: reading it would exhaust memory); the largest size the bound allows is read."""
    pool = make_pool(model, page_size=8, num_pages=8)
    most = export_bytes_bound(pool, pool.max_seq_tokens)[1]
    assert len(exports[0]) <= export_bytes_bound(pool, len(PROMPTS[0]))[1] <= most
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)
    with pytest.raises(
        ExportError, match=f"huge.safetensors: {64 << 30} bytes is more than an export .*\\({most} bytes"
    ):
        read_export_file(huge, pool)
    edge = tmp_path / "edge.safetensors"
    edge.write_bytes(exports[0] + bytes(most - len(exports[0])))
    assert read_export_file(edge, pool) == exports[0] + bytes(most - len(exports[0]))
    with open(edge, "ab") as f:
        f.write(b"x")
    with pytest.raises(ExportError, match="bytes is more than an export"):
        read_export_file(edge, pool)
