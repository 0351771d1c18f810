"""The simulator against published measurements: how far off its throughput predictions are.

``python -m disagg.sim validate [--json]`` runs every row of a shipped table (``data/trtllm_perf_overview.json``:
NVIDIA TensorRT-LLM's performance overview, Llama-3.1-8B-Instruct FP8 on one H100 and one H200, its citation and
method in the file; ``--table`` another, e.g. ``data/trtllm_perf_overview_llama70b.json``, rows of the same document
for Llama-3.3-70B on one H200 and two H100s, held out from every choice of default) through the simulator and prints predicted against published total output tokens/s, the error
of each row and the median and max |error|.

Each row is simulated as the benchmark ran it, with nothing set per row but what the benchmark itself sets:

- the workload: ``requests`` requests of exactly ISL prompt and OSL output tokens, all arriving at time 0;
- the engine: the device preset (default, uncalibrated ceilings), fp8 weights, GEMMs and KV, the default
  ``CostModel`` (TensorRT-LLM's overlap scheduler is on by default, as the model assumes), KV pages of 32 tokens
  (TensorRT-LLM's tokens_per_block), 0.95 of the free memory for KV (the table's kv_cache_free_gpu_mem_fraction),
  steps that mix decodes with prompt tokens up to the token budget;
- max batch size and max num tokens as trtllm-bench derives them from the memory and the row's ISL/OSL
  (``trtllm_bench_limits``: its rule, tensorrt_llm/bench/build/tuning.py, restated).

The error of a row is predicted / published − 1.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disagg.roofline import LLAMA3_8B, LLAMA3_70B, ModelShape
from disagg.sim.cluster import Colocated, Pool, Serving
from disagg.sim.costs import CostModel
from disagg.sim.devices import Device, device
from disagg.sim.engine import simulate
from disagg.sim.metrics import throughput
from disagg.sim.workload import Requests

DATA = Path(__file__).parent / "data" / "trtllm_perf_overview.json"
# Rows of the same document for another model and tensor parallelism, not used to choose any default: a check that
# the model generalises.
HELD_OUT = Path(__file__).parent / "data" / "trtllm_perf_overview_llama70b.json"
MODELS = {m.name: m for m in (LLAMA3_8B, LLAMA3_70B)}
PAGE_SIZE = 32  # TensorRT-LLM's default tokens_per_block
GIB = 2**30


@dataclass(frozen=True)
class Row:
    isl: int
    osl: int
    device: str
    requests: int
    published: float  # output tokens/s
    predicted: float
    max_batch: int
    token_budget: int

    @property
    def error(self) -> float:
        """predicted / published − 1."""
        return self.predicted / self.published - 1


@dataclass(frozen=True)
class Validation:
    source: str
    rows: tuple[Row, ...]

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(r.error) for r in self.rows)

    @property
    def max_abs_error(self) -> float:
        return max(abs(r.error) for r in self.rows)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows": [
                {"isl": r.isl, "osl": r.osl, "device": r.device, "requests": r.requests, "max_batch": r.max_batch,
                 "token_budget": r.token_budget, "published_output_tokens_per_s": r.published,
                 "predicted_output_tokens_per_s": r.predicted, "error": r.error}
                for r in self.rows
            ],
            "median_abs_error": self.median_abs_error,
            "max_abs_error": self.max_abs_error,
        }  # fmt: skip

    def table(self) -> str:
        lines = [
            f"{self.source}",
            f"{'ISL/OSL':>11} {'device':>6} {'published':>10} {'predicted':>10} {'error':>7}   (batch, budget)",
        ]
        for r in self.rows:
            lines.append(
                f"{f'{r.isl}/{r.osl}':>11} {r.device:>6} {r.published:>10,.0f} {r.predicted:>10,.0f} "
                f"{r.error:>+7.1%}   ({r.max_batch}, {r.token_budget})"
            )
        lines.append(f"median |error| {self.median_abs_error:.1%}, max |error| {self.max_abs_error:.1%}")
        return "\n".join(lines)


def trtllm_bench_limits(
    model: ModelShape, dev: Device, isl: int, osl: int, dtype_bytes: int, kv_bytes: float, tp: int = 1
) -> tuple[int, int]:
    """(max batch size, max num tokens) as trtllm-bench sets them when not given: the requests of ISL + OSL tokens
    that fit 0.95 of the memory left after the weights (capped at 4,096), rounded up to 32/128/256, and that many
    requests × (1 + ISL/OSL) tokens (capped at 32,768, at least 2,048), rounded up to 256/512/1,024, and at least
    ISL + max batch size."""
    kv_per_token = model.kv_bytes_per_token(kv_bytes) * max(tp, model.kv_heads) / model.kv_heads
    free = tp * dev.memory - model.params * dtype_bytes
    raw_bs = min(0.95 * free / (kv_per_token * (isl + osl)), 4096)
    raw_tokens = min(raw_bs * (1 + isl / osl), 32768)
    batch = max(64, _round_up(raw_bs, ((256, 32), (1024, 128)), 256))
    tokens = max(2048, _round_up(raw_tokens, ((4096, 256), (8192, 512)), 1024))
    # Chunked prefill is off by default, so trtllm-bench raises max num tokens to fit a whole prompt beside a full
    # batch of decodes (bench/benchmark/utils/general.py, get_settings).
    return batch, max(tokens, isl + batch)


def _round_up(x: float, rungs: tuple[tuple[int, int], ...], step: int) -> int:
    """``x`` rounded up to a multiple of the step of the first rung whose limit it is below, else of ``step``."""
    step = next((s for limit, s in rungs if x < limit), step)
    return step * math.ceil(x / step)


def load(path: str | os.PathLike = DATA) -> dict:
    """The table: a JSON object with ``source``, ``model_shape``, ``dtype_bytes``, ``kv_bytes``, ``tp`` (one size, or
    one per device preset name) and ``rows`` of ``isl``, ``osl``, ``requests`` and one published output tokens/s per
    device preset name."""
    with open(path) as f:
        doc = json.load(f)
    for key in ("source", "model_shape", "dtype_bytes", "kv_bytes", "tp", "rows"):
        if key not in doc:
            raise ValueError(f"validation table: {path} lacks {key!r}")
    return doc


def predict(
    model: ModelShape,
    dev: Device,
    isl: int,
    osl: int,
    requests: int,
    *,
    dtype_bytes: int,
    kv_bytes: float,
    tp: int = 1,
    terms: CostModel | None = None,
) -> tuple[float, int, int]:
    """Simulated output tokens/s of ``requests`` requests of ISL/OSL tokens all queued at once, as trtllm-bench
    runs them; returns it with the max batch and token budget used."""
    batch, budget = trtllm_bench_limits(model, dev, isl, osl, dtype_bytes, kv_bytes, tp)
    serving = Serving(
        max_batch=batch,
        token_budget=budget,
        page_size=PAGE_SIZE,
        mem_util=0.95,
        dtype_bytes=dtype_bytes,
        kv_bytes=kv_bytes,
        terms=terms or CostModel(),
    )
    reqs = Requests(np.zeros(requests), np.full(requests, isl, np.int64), np.full(requests, osl, np.int64))
    result = simulate(Colocated(Pool(dev, 1, tp), "chunked"), reqs, model, serving)
    return throughput(result).output_tokens_per_s, batch, budget


def validate(path: str | os.PathLike = DATA, terms: CostModel | None = None) -> Validation:
    """Every row of the table at ``path`` on every device it names (default presets), under ``terms``."""
    doc = load(path)
    model = MODELS[doc["model_shape"]]
    rows = []
    for row in doc["rows"]:
        for name in sorted(k for k in row if k not in ("isl", "osl", "requests")):
            tp = doc["tp"][name] if isinstance(doc["tp"], dict) else doc["tp"]
            predicted, batch, budget = predict(
                model, device(name), row["isl"], row["osl"], row["requests"], dtype_bytes=doc["dtype_bytes"],
                kv_bytes=doc["kv_bytes"], tp=tp, terms=terms,
            )  # fmt: skip
            rows.append(Row(row["isl"], row["osl"], name, row["requests"], row[name], predicted, batch, budget))
    return Validation(doc["source"], tuple(rows))
