"""The KV export: how a request's prompt KV travels from the prefill stage to the decode stage.

One self-describing safetensors file per request (never pickle), independent of either pool's page size:

tensors
    ``k.{layer}``, ``v.{layer}``: (num_tokens, num_kv_heads, head_dim) in the KV dtype, token-major, holding exactly
    the prompt's tokens in position order (fp8 caches export their stored fp8 values, not dequantized ones);
    ``token_ids``, ``positions``: int64 (num_tokens,).
metadata (the safetensors header's ``__metadata__``, key ``phaseattn.kv_export``, a JSON object)
    ``format_version``; ``fingerprint`` of the model (architecture, layers, KV heads, head_dim, rotary settings,
    sliding windows, weight dtype, a digest of the weights); ``kv_dtype`` and ``kv_scale`` (the per-tensor fp8 scale
    of K and V, null for other dtypes); ``num_tokens``; ``request_id``; ``first_token`` (sampled by prefill);
    ``sampling`` (the request's :class:`SamplingParams`); ``ttft_s``; and ``checksum``: sha256 over the rest of the
    metadata and the payload hashed in logical token order (token ids, positions, then each layer's K and V rows),
    so it does not depend on page size or page placement in either pool.

:func:`read_export` refuses a file that is truncated, corrupted or tampered with, made for another model or KV
dtype, or of an unknown format version, with an :class:`ExportError` that says which; it only reads, so a refused
import has allocated nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from disagg.errors import EngineError, ExportError
from disagg.export_schema import MAX_HEADER_BYTES, check_metadata, parse_json, short
from disagg.kv_pool import KVPool
from disagg.model import CausalLM
from disagg.request import SamplingParams

FORMAT_VERSION = 1
METADATA_KEY = "phaseattn.kv_export"


def fingerprint(model: CausalLM) -> dict[str, Any]:
    """What must match between the model that wrote an export and the one that reads it."""
    c = model.config
    return {
        "architecture": c.architecture,
        "num_layers": c.num_layers,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rope": c.rope_params,
        "windows": list(c.windows),
        "dtype": str(model.dtype).removeprefix("torch."),
        "weights": model.weights_digest,
    }


def _payload_names(num_layers: int) -> list[str]:
    """The tensors the checksum covers, in the order it hashes them."""
    return ["token_ids", "positions"] + [f"{kv}.{i}" for i in range(num_layers) for kv in "kv"]


def _digest(meta: dict[str, Any], payload: Iterable[Any]) -> str:
    """sha256 over the metadata (checksum excluded) then the payload's bytes-like chunks (see the module docstring)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for chunk in payload:
        h.update(chunk)
    return h.hexdigest()


def _checksum(meta: dict[str, Any], tensors: dict[str, torch.Tensor], num_layers: int) -> str:
    """The checksum of export tensors held by name."""
    return _digest(meta, (tensors[n].contiguous().view(torch.uint8).numpy() for n in _payload_names(num_layers)))


@dataclass
class KVExport:
    """A verified export in memory. k[layer], v[layer]: (num_tokens, num_kv_heads, head_dim) CPU tensors."""

    request_id: str
    token_ids: list[int]
    first_token: int
    sampling: SamplingParams
    ttft_s: float
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def export_kv(
    model: CausalLM,
    pool: KVPool,
    seq: object,
    request_id: str,
    token_ids: list[int],
    first_token: int,
    sampling: SamplingParams,
    ttft_s: float,
) -> bytes:
    """Serialize the KV of ``seq``'s prompt (``len(token_ids)`` tokens held in ``pool``) into export bytes."""
    n = len(token_ids)
    slots = pool.slots(seq, 0, n)
    tensors: dict[str, torch.Tensor] = {
        "token_ids": torch.tensor(token_ids, dtype=torch.int64),
        "positions": torch.arange(n, dtype=torch.int64),
    }
    kv = pool.gather_tokens(slots).cpu()  # (layers, 2, n, kv_heads, head_dim): ONE copy of every layer's K/V
    for layer in range(pool.num_layers):
        tensors[f"k.{layer}"], tensors[f"v.{layer}"] = kv[layer, 0], kv[layer, 1]
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(model),
        "kv_dtype": str(pool.dtype).removeprefix("torch."),
        "kv_scale": pool.kv_scale,
        "num_tokens": n,
        "request_id": request_id,
        "first_token": int(first_token),
        "sampling": sampling.to_dict(),
        "ttft_s": float(ttft_s),
    }
    # k.0, v.0, k.1, ... are consecutive in ``kv``: its bytes are the payload after the token ids and positions
    payload = [tensors[n].view(torch.uint8).numpy() for n in ("token_ids", "positions")] + [
        kv.view(torch.uint8).numpy()
    ]
    meta["checksum"] = _digest(meta, payload)
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def _parse_header(data: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(``__metadata__``, the whole header, where the payload starts) of a safetensors file (8-byte little-endian
    header length, then JSON, then the payload), after checking the header and the tensors' offsets against the
    data's size."""
    if len(data) < 8:
        raise ExportError(f"truncated: {len(data)} bytes is not even a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ExportError(f"truncated: the header needs {size} bytes, the file has {len(data) - 8} after its length")
    if size > MAX_HEADER_BYTES:
        raise ExportError(f"not an export: a header of {size} bytes (exports' are under {MAX_HEADER_BYTES})")
    header = parse_json(data[8 : 8 + size], "not a safetensors file: the header")
    try:
        ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(e, int) for e in ends):
            raise TypeError
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ExportError("not a safetensors file (unreadable header)") from None
    payload = len(data) - 8 - size
    if ends and max(ends) > payload:
        raise ExportError(f"truncated: the tensors need {max(ends)} bytes, the file holds {payload}")
    return metadata, header, 8 + size


def _header(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors header (see :func:`_parse_header`)."""
    return _parse_header(data)[0]


def _check_fingerprint(theirs: Any, ours: dict[str, Any]) -> None:
    if not isinstance(theirs, dict):
        raise ExportError("the export has no model fingerprint")
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise ExportError(
                f"made for another model: {key} is {short(theirs.get(key))} in the export, {value!r} here"
            )


def read_export(data: bytes, model: CausalLM, pool: KVPool) -> KVExport:
    """Verify export bytes against the importing model and pool, and return their content.

    Raises ExportError (never allocating anything) when the data is truncated, not an export, of another format
    version, for another model or KV dtype, malformed, or fails its checksum.
    """
    metadata, header, start = _parse_header(data)
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ExportError("not a phaseattn KV export (no export metadata)")
    if not isinstance(raw, str):
        raise ExportError("corrupted: the export metadata is not a JSON string")
    meta = parse_json(raw.encode("utf-8", "surrogatepass"), "corrupted: the export metadata")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ExportError(f"unknown format version {short(version)}; this engine reads {FORMAT_VERSION}")
    check_metadata(meta)
    _check_fingerprint(meta["fingerprint"], fingerprint(model))
    kv_dtype = str(pool.dtype).removeprefix("torch.")
    if meta["kv_dtype"] != kv_dtype or meta["kv_scale"] != pool.kv_scale:
        raise ExportError(
            f"KV dtype/scale {short(meta['kv_dtype'])}/{meta['kv_scale']} in the export, {kv_dtype}/{pool.kv_scale} "
            "here"
        )
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for malformed data
        raise ExportError(f"corrupted: {e}") from None
    n, layers = meta["num_tokens"], pool.num_layers
    kv_shape = (n, pool.num_kv_heads, pool.head_dim)
    expected = {"token_ids": ((n,), torch.int64), "positions": ((n,), torch.int64)}
    expected |= {f"{kv}.{i}": (kv_shape, pool.dtype) for i in range(layers) for kv in "kv"}
    if set(tensors) != set(expected):
        raise ExportError(f"malformed: expected tensors {sorted(expected)} for {n} tokens, found {sorted(tensors)}")
    for name, (shape, dtype) in expected.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            raise ExportError(f"malformed: {name} is {tuple(tensors[name].shape)} {tensors[name].dtype}")
    # hashed straight from the file: the stored bytes of each tensor, in the checksum's order
    view = memoryview(data)
    spans = (header[name]["data_offsets"] for name in _payload_names(layers))
    if meta["checksum"] != _digest(meta, (view[start + a : start + b] for a, b in spans)):
        raise ExportError("checksum mismatch: the export was corrupted or modified after it was written")
    if not torch.equal(tensors["positions"], torch.arange(n)):
        raise ExportError("malformed: positions must be 0 .. num_tokens-1")
    token_ids = tensors["token_ids"].tolist()
    vocab = model.config.vocab_size
    try:
        sampling = SamplingParams.from_dict(meta["sampling"])
    except EngineError as e:
        raise ExportError(f"malformed metadata: {e}") from None
    export = KVExport(
        request_id=meta["request_id"],
        token_ids=token_ids,
        first_token=meta["first_token"],
        sampling=sampling,
        ttft_s=float(meta["ttft_s"]),
        k=[tensors[f"k.{i}"] for i in range(layers)],
        v=[tensors[f"v.{i}"] for i in range(layers)],
    )
    if not all(0 <= t < vocab for t in [*token_ids, export.first_token]):
        raise ExportError(f"malformed: token ids outside the vocabulary of {vocab}")
    return export


def write_export(path: Path, data: bytes) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves a partial export behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror}") from None


def export_bytes_bound(pool: KVPool, num_tokens: int) -> tuple[int, int]:
    """(fewest, most) bytes an export of ``num_tokens`` tokens into ``pool`` can take: its K/V, plus at most its
    int64 token ids and positions and a safetensors header (8-byte length and at most MAX_HEADER_BYTES of JSON)."""
    kv = num_tokens * pool.bytes_per_token()
    return kv, kv + 16 * num_tokens + 8 + MAX_HEADER_BYTES


def read_export_file(path: Path, pool: KVPool) -> bytes:
    """The bytes of an export file for ``pool``, refused (ExportError, nothing read) when the file is larger than
    any export of the pool's longest sequence can be, so a hostile or wrong file cannot exhaust host memory."""
    most = export_bytes_bound(pool, pool.max_seq_tokens)[1]
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > most:
                raise ExportError(
                    f"{Path(path).name}: {size} bytes is more than an export for this model and pool can hold "
                    f"({most} bytes for its longest sequence of {pool.max_seq_tokens} tokens)"
                )
            return f.read(most + 1)
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}") from None
