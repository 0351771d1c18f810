"""disagg: a small disaggregated-serving engine (prefill stage -> KV export -> decode stage) built on
phaseattn's kernels, plus the roofline arithmetic the benchmarks, notebooks and simulator share.

The engine's public names are importable from here (``from disagg import Engine, load_model, SamplingParams``);
they load lazily, so ``import disagg.roofline`` stays free of torch and the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Engine": "disagg.engine",
    "load_model": "disagg.loader",
    "Request": "disagg.request",
    "RequestOutput": "disagg.request",
    "SamplingParams": "disagg.request",
    "KVPool": "disagg.kv_pool",
    "make_pool": "disagg.engine",
    "PrefillStage": "disagg.prefill",
    "DecodeStage": "disagg.decode",
    "ColocatedStage": "disagg.colocated",
    "EngineError": "disagg.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'disagg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
