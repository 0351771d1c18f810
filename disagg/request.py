"""Requests, their sampling settings, and what the engine returns for each."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from disagg.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops.

    temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k (0: off), then top-p (nucleus;
    1.0: off), then a draw seeded by ``seed`` and the token's index, so a request's output depends on nothing but
    its prompt and these settings (not on its batch, its stage or its process). ``eos_token_ids`` None means the
    model's end-of-sequence tokens; ``()`` never stops early.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int):
            raise RequestError(f"seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids) if self.eos_token_ids is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise RequestError(f"sampling settings must have exactly the fields {sorted(names)}, got {sorted(d)}")
        eos = d["eos_token_ids"]
        return cls(**{**d, "eos_token_ids": tuple(int(e) for e in eos) if eos is not None else None})


@dataclass
class Request:
    """One prompt to serve. ``request_id`` names it in outputs and export files."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class RequestOutput:
    """The result of one request. ``output_ids`` are the generated tokens only. ``finish_reason`` is "eos",
    "length" (max_new_tokens or the model's context), "aborted" or "error" (then ``error`` says why).
    ``ttft_s``: time to first token (prefill stage); ``tpot_s``: mean time per output token after the first.
    ``cached_tokens``: prompt tokens whose KV came from the prefix cache instead of being computed."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = "error"
    error: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
