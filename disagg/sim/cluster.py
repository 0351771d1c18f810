"""The two deployments the simulator compares, and the serving knobs every instance shares.

- ``Colocated``: N identical instances, each prefilling and decoding its own requests with continuous batching,
  either prefill-prioritised (a prefill step runs whole prompts and the running decodes wait for it) or with
  chunked prefill (every step carries all running decodes plus prompt chunks up to the token budget).
- ``Disaggregated``: P prefill instances and D decode instances, possibly of different devices and tensor-parallel
  sizes, with each request's KV cache sent from its prefill instance to its decode instance over a ``Link``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from disagg.roofline import ModelShape
from disagg.sim.costs import CostModel, StepCost
from disagg.sim.devices import Device
from disagg.sim.links import Link

Policy = Literal["prefill-first", "chunked"]


@dataclass(frozen=True)
class Pool:
    """``count`` instances, each ``tp`` GPUs of ``device`` in tensor parallelism."""

    device: Device
    count: int
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("count", "tp"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")

    @property
    def gpus(self) -> int:
        return self.count * self.tp

    @property
    def hourly_cost(self) -> float:
        return self.gpus * self.device.price_per_hour

    def describe(self) -> str:
        return f"{self.count}×{self.device.name}" + (f"(tp{self.tp})" if self.tp > 1 else "")


@dataclass(frozen=True)
class Colocated:
    """``chunk``: with chunked prefill, the tokens of one step (decodes first, then prompt chunks); None takes
    ``Serving.token_budget``. Smaller chunks bound the time decodes wait behind prefill, at some cost in prefill
    efficiency: the knob that trades TTFT for TPOT."""

    pool: Pool
    policy: Policy = "prefill-first"
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("prefill-first", "chunked"):
            raise ValueError(f"policy: 'prefill-first' or 'chunked', got {self.policy!r}")
        if self.chunk is not None and (self.policy != "chunked" or not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"chunk: a positive token count, with policy 'chunked' only; got {self.chunk!r}")

    @property
    def gpus(self) -> int:
        return self.pool.gpus

    @property
    def hourly_cost(self) -> float:
        return self.pool.hourly_cost

    @property
    def devices(self) -> tuple[Device, ...]:
        return (self.pool.device,)

    def describe(self) -> str:
        return f"colocated {self.pool.describe()} ({self.policy}{f' {self.chunk}' if self.chunk else ''})"


@dataclass(frozen=True)
class Disaggregated:
    prefill: Pool
    decode: Pool
    link: Link

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    @property
    def hourly_cost(self) -> float:
        return self.prefill.hourly_cost + self.decode.hourly_cost

    @property
    def devices(self) -> tuple[Device, ...]:
        return (self.prefill.device,) if self.prefill.device == self.decode.device else (
            self.prefill.device, self.decode.device)  # fmt: skip

    def describe(self) -> str:
        return (
            f"disaggregated {self.prefill.describe()} prefill + {self.decode.describe()} decode over {self.link.name}"
        )


Deployment = Colocated | Disaggregated


@dataclass(frozen=True)
class Serving:
    """Knobs every instance shares (their names follow vLLM's), and the cost model its steps are priced with.

    ``max_batch``: sequences an instance runs at once (max_num_seqs); ``token_budget``: tokens in one step
    (max_num_batched_tokens; a prompt longer than it still prefills alone in prefill-first steps);
    ``page_size``: KV is reserved in pages of this many tokens; ``mem_util``: fraction of the memory left after
    weights and activations that holds the KV pool (TensorRT-LLM's kv_cache_free_gpu_mem_fraction; vLLM's
    gpu_memory_utilization is a fraction of the whole memory instead); ``dtype_bytes`` of weights and GEMM inputs
    (1: fp8, see ``CostModel.fp8_gemm``), ``kv_bytes`` per KV element; ``terms``: the ``CostModel``."""

    max_batch: int = 256
    token_budget: int = 8192
    page_size: int = 16
    mem_util: float = 0.9
    dtype_bytes: int = 2
    kv_bytes: float = 2
    terms: CostModel = field(default_factory=CostModel)

    def __post_init__(self) -> None:
        for name in ("max_batch", "token_budget", "page_size", "dtype_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if self.dtype_bytes not in (1, 2, 4):
            raise ValueError(f"dtype_bytes: must be 1 (fp8), 2 (bf16) or 4 (fp32), got {self.dtype_bytes}")
        if not 0 < self.mem_util <= 1:
            raise ValueError(f"mem_util: must be in (0, 1], got {self.mem_util}")
        if not self.kv_bytes > 0:
            raise ValueError(f"kv_bytes: must be > 0, got {self.kv_bytes}")
        if not isinstance(self.terms, CostModel):
            raise TypeError(f"terms: expected a CostModel, got {type(self.terms).__name__}")

    def cost(self, model: ModelShape, device: Device, tp: int = 1) -> StepCost:
        """The step costs of ``model`` on ``tp`` × ``device`` under these knobs."""
        return StepCost(model, device, tp, dtype_bytes=self.dtype_bytes, kv_bytes=self.kv_bytes, terms=self.terms,
                        page_size=self.page_size)  # fmt: skip

    def kv_capacity_tokens(self, cost: StepCost) -> int:
        """Tokens of KV an instance with step costs ``cost`` holds under these knobs."""
        return cost.kv_capacity_tokens(self.mem_util, self.token_budget, self.max_batch)
