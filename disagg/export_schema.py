"""What a KV export's header and metadata may hold, checked in one place before anything uses them.

An export is a file format read from other machines, so its JSON is untrusted: :func:`parse_json` bounds nesting
before parsing (no RecursionError) and refuses NaN, Infinity and floats that overflow; :func:`check_metadata`
checks every metadata field's type and range against :data:`METADATA` and :data:`SAMPLING` (so a number that
would overflow a float, a bool where an int belongs, or a list where a string belongs is an ExportError here, not
an OverflowError or TypeError later). Whether values *match* the importing model and pool is
:mod:`disagg.export`'s business.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable
from typing import Any

from disagg.errors import ExportError

MAX_HEADER_BYTES = 1 << 20
"""Largest safetensors header read (a real export's is a few KB: one entry per tensor plus the metadata)."""
MAX_JSON_DEPTH = 8
"""Deepest JSON nesting read, in the header and in the metadata (exports use 3 levels)."""
MAX_TOKENS = 2**31 - 1
"""Bound on token counts and token ids (int32, as the kernels index them)."""

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_json(text: bytes, what: str) -> Any:
    """Parse untrusted JSON ``text`` (``what`` begins the error messages): nesting deeper than MAX_JSON_DEPTH, invalid
    JSON, NaN/Infinity and floats beyond float range are ExportErrors."""
    depth = deepest = 0
    for c in _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS):  # brackets outside strings
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise ExportError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")

    def finite(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):  # 1e400 parses as inf
            raise ValueError(token)
        return value

    def refuse(token: str) -> None:
        raise ValueError(token)

    try:
        return json.loads(text, parse_float=finite, parse_constant=refuse)
    except ValueError:  # also UnicodeDecodeError, and ints of more digits than Python converts
        raise ExportError(f"{what} is not valid JSON (or holds a non-finite number)") from None


def _int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _number(lo: float, hi: float) -> Callable[[Any], bool]:
    # parse_json gives only finite floats, and an int compares exactly with a float bound however large it is
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _text(max_len: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) <= max_len


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in string.hexdigits for c in v)


def _token_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 1024 and all(_int(0, MAX_TOKENS)(e) for e in v)


# field -> (check, what it must be)
METADATA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format_version": (_int(0, 2**31), "an int"),
    "fingerprint": (lambda v: isinstance(v, dict), "an object"),
    "kv_dtype": (_text(32), "a dtype name"),
    "kv_scale": (_optional(_number(1e-30, 1e30)), "null or a positive finite number"),
    "num_tokens": (_int(1, MAX_TOKENS), f"an int in 1..{MAX_TOKENS}"),
    "request_id": (_text(256), "a string of at most 256 characters"),
    "first_token": (_int(0, MAX_TOKENS), f"an int in 0..{MAX_TOKENS}"),
    "sampling": (lambda v: isinstance(v, dict), "an object"),
    "ttft_s": (_number(0, 1e9), "a number of seconds in 0..1e9"),
    "checksum": (_is_digest, "a sha256 hex digest"),
}
SAMPLING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (_int(1, MAX_TOKENS), f"an int in 1..{MAX_TOKENS}"),
    "temperature": (_number(0, 1e9), "a finite number >= 0"),
    "top_k": (_int(0, MAX_TOKENS), f"an int in 0..{MAX_TOKENS}"),
    "top_p": (_number(0, 1), "a number in (0, 1]"),
    "seed": (_int(-(2**63), 2**64 - 1), "a 64-bit int"),
    "eos_token_ids": (_optional(_token_list), "null or a list of at most 1024 token ids"),
}


def _check_fields(d: dict[str, Any], schema: dict[str, tuple[Callable[[Any], bool], str]], prefix: str) -> None:
    missing, unknown = sorted(set(schema) - set(d)), sorted(set(d) - set(schema))
    if missing:
        raise ExportError(f"malformed metadata: {prefix}{short(missing[0])} is missing")
    if unknown:
        raise ExportError(f"malformed metadata: unknown field {prefix}{short(unknown[0])}")
    for name, (check, must_be) in schema.items():
        if not check(d[name]):
            raise ExportError(f"malformed metadata: {prefix}{name} must be {must_be}, got {short(d[name])}")


def check_metadata(meta: Any) -> dict[str, Any]:
    """Check the export metadata's fields against METADATA and SAMPLING (exactly those fields, each of its type
    and range); returns ``meta``."""
    if not isinstance(meta, dict):
        raise ExportError("corrupted: the export metadata is not a JSON object")
    _check_fields(meta, METADATA, "")
    _check_fields(meta["sampling"], SAMPLING, "sampling.")
    return meta


def short(value: Any) -> str:
    """A value read from a file, for an error message: its repr cut to one short line."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= 60 else text[:57] + "..."
