"""Text ↔ token ids. A checkpoint directory with a ``tokenizer.json`` gets a Hugging Face ``tokenizers`` tokenizer;
the embedded ``tiny`` model reads UTF-8 bytes. Prompts can always be given as token ids instead."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from disagg.errors import ModelLoadError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; ``bos`` is prepended to every prompt. Decoding drops ids that are not bytes and
    replaces invalid UTF-8 (a model may emit any byte sequence)."""

    def __init__(self, bos: int, eos: int):
        self.bos, self.eos = bos, eos

    def encode(self, text: str) -> list[int]:
        return [self.bos, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package (special tokens such as BOS are added as the file's
    post-processor says; decoding skips special tokens)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read tokenizer {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
