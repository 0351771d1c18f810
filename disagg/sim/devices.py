"""GPUs as the simulator sees them: two ceilings, the fraction of them each kind of kernel reaches, memory, a price.

A device's ``flops`` is the compute ceiling (a large dense bf16 matmul), ``fp8_flops`` the same for fp8 tensor cores
(None where the part has none), and ``bandwidth`` the memory ceiling (a large device-to-device copy, bytes read plus
written): the quantities ``python -m bench`` measures at the start of every run (bf16 and copy; a measured bf16
ceiling scales the fp8 one by the datasheet ratio). Each kernel class then reaches a fraction of the roofline those
ceilings draw (``Efficiency``):
the model's GEMMs, prefill attention (measured by the benchmark as a fraction of the matmul ceiling) and paged decode
attention (as a fraction of the copy bandwidth). A fraction derates both roofs, but a kernel only ever meets the one
it is bound by, which is the roof its fraction was measured against.

Where no results file gives a quantity, a stated default stands in and the device says so (``Provenance``):
ceilings default to 80 % (compute) and 90 % (bandwidth) of the datasheet, which is what H100 and H200 reach
(~798 of 989 TFLOP/s, ~3.0 of 3.35 TB/s: shared/PERF.md, measured on the lent machines). fp8 matmuls reach a
smaller fraction of their peak, 72 % by default: 1,378-1,467 TFLOP/s of 1,979 for 8192 × 8192 matmuls with K = 4096
(Llama-8B's hidden size) on an H800 SXM (tilelang, benchmark/matmul_fp8/README.md); published figures for 8192³ range
from 59 % (PyTorch's ``_scaled_mm``) to 81 % (cuBLASLt). The efficiencies default to the values of ``Efficiency()``. Prices are illustrative on-demand cloud figures in USD per GPU-hour: a parameter to set, not a fact.

Datasheet peaks are dense (no 2:4 sparsity): NVIDIA H100 SXM5 and H200 SXM datasheets (bf16 989 TFLOP/s, fp8 1,979;
the sheets print the sparse figures 1,979 and 3,958 with "with sparsity"), A100 SXM4 (bf16 312, no fp8 tensor cores),
L40S (bf16 362, fp8 733), AMD MI300X (bf16 1,307, fp8 2,615). Memory is what the driver reports where known
(nvidia-smi: 81,559 MiB on an H100 80GB HBM3, 143,771 MiB on an H200), else the datasheet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from disagg.sim.links import NVLINK3, NVLINK4, PCIE4, XGMI, Link

DEFAULT = "default, not measured"
COMPUTE_DERATE = 0.8  # default compute ceiling as a fraction of the datasheet's dense bf16 peak
BANDWIDTH_DERATE = 0.9  # default copy bandwidth as a fraction of the datasheet's memory bandwidth
FP8_COMPUTE_DERATE = 0.72  # default fp8 matmul ceiling as a fraction of the datasheet's dense fp8 peak
MIB = 2**20


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the device roofline each kernel class reaches (0 < e <= 1). Defaults: the model's GEMMs 0.9 of
    the large-matmul ceiling (XLA's sm_90 matmul table: 4096³ bf16 at 783 TFLOP/s, 98 % of the ~798 ceiling,
    2048 × 4096 × 1024 at 679, 85 %); prefill attention 0.75 of it (FlashAttention-3, causal, head_dim 128: 616
    TFLOP/s, 77 % of the ceiling; shared/PERF.md); paged decode 0.9 of the copy bandwidth (FlashInfer reaches up to
    83 % of the datasheet bandwidth, 0.92 of the copy ceiling; shared/PERF.md)."""

    gemm: float = 0.9
    prefill_attention: float = 0.75
    decode_attention: float = 0.9

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not 0 < v <= 1:
                raise ValueError(f"{f.name}: efficiency must be in (0, 1], got {v}")


@dataclass(frozen=True)
class Provenance:
    """Where each calibrated quantity came from: ``DEFAULT`` or ``"measured: <results file>"``."""

    ceilings: str = DEFAULT
    gemm: str = DEFAULT
    prefill_attention: str = DEFAULT
    decode_attention: str = DEFAULT


@dataclass(frozen=True)
class Device:
    """One GPU. ``flops`` FLOP/s and ``bandwidth`` bytes/s are the ceilings in use; ``memory`` bytes of HBM;
    ``price_per_hour`` USD per GPU-hour; ``interconnect`` the GPU-to-GPU link inside a tensor-parallel instance."""

    name: str
    flops: float
    bandwidth: float
    memory: float
    price_per_hour: float
    interconnect: Link
    efficiency: Efficiency = Efficiency()
    provenance: Provenance = Provenance()
    fp8_flops: float | None = None  # FLOP/s of fp8 tensor cores; None: the part has none (fp8 weights dequantize)

    def __post_init__(self) -> None:
        for name in ("flops", "bandwidth", "memory"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.fp8_flops is not None and not self.fp8_flops > 0:
            raise ValueError(f"fp8_flops: must be > 0 or None, got {self.fp8_flops}")
        if not self.price_per_hour >= 0:
            raise ValueError(f"price_per_hour: must be >= 0, got {self.price_per_hour}")

    def with_price(self, price_per_hour: float) -> Device:
        return dataclasses.replace(self, price_per_hour=price_per_hour)

    def gemm_flops(self, dtype_bytes: int) -> float:
        """The matmul ceiling GEMMs with ``dtype_bytes``-byte operands meet: fp8 tensor cores for 1-byte operands
        where the part has them, else the bf16 ceiling (weights stored in fp8 are then dequantized first)."""
        return self.fp8_flops if dtype_bytes == 1 and self.fp8_flops else self.flops

    @property
    def measured(self) -> bool:
        """True when every calibrated quantity comes from a results file."""
        return all(v != DEFAULT for v in dataclasses.astuple(self.provenance))

    def describe(self) -> str:
        """One line with every number the costs use and where it came from."""
        e, p = self.efficiency, self.provenance
        fp8 = f" (fp8 {self.fp8_flops / 1e12:.0f})" if self.fp8_flops else ""
        return (
            f"{self.name}: {self.flops / 1e12:.0f} TFLOP/s{fp8}, {self.bandwidth / 1e12:.2f} TB/s ({p.ceilings}), "
            f"{self.memory / 1e9:.0f} GB, ${self.price_per_hour:.2f}/h; efficiency gemm {e.gemm:.2f} ({p.gemm}), "
            f"prefill attention {e.prefill_attention:.2f} ({p.prefill_attention}), "
            f"decode attention {e.decode_attention:.2f} ({p.decode_attention})"
        )


@dataclass(frozen=True)
class Datasheet:
    """A part's published figures: dense bf16 and fp8 FLOP/s (None: no fp8 tensor cores), memory bytes/s, memory
    bytes."""

    name: str
    peak_flops: float
    peak_bandwidth: float
    memory: float
    price_per_hour: float
    interconnect: Link
    peak_fp8_flops: float | None = None

    def device(self) -> Device:
        """The device with default (derated datasheet) ceilings and default efficiencies, labelled as such."""
        return Device(
            self.name,
            self.peak_flops * COMPUTE_DERATE,
            self.peak_bandwidth * BANDWIDTH_DERATE,
            self.memory,
            self.price_per_hour,
            self.interconnect,
            fp8_flops=self.peak_fp8_flops * FP8_COMPUTE_DERATE if self.peak_fp8_flops else None,
        )


DATASHEETS: dict[str, Datasheet] = {
    d.name.lower(): d
    for d in (
        Datasheet("H100", 989e12, 3.35e12, 81559 * MIB, 3.00, NVLINK4, 1979e12),  # SXM5 80 GB HBM3
        Datasheet("H200", 989e12, 4.8e12, 143771 * MIB, 3.80, NVLINK4, 1979e12),  # SXM 141 GB HBM3e
        Datasheet("A100", 312e12, 2.039e12, 80e9, 1.80, NVLINK3),  # SXM4 80 GB HBM2e, no fp8
        Datasheet("L40S", 362e12, 0.864e12, 48e9, 1.10, PCIE4, 733e12),  # 48 GB GDDR6, no NVLink
        Datasheet("MI300X", 1307e12, 5.3e12, 192e9, 3.00, XGMI, 2615e12),  # 192 GB HBM3
    )
}


def device(name: str) -> Device:
    """A preset with default ceilings and efficiencies: ``h100``, ``h200``, ``a100``, ``l40s``, ``mi300x``."""
    try:
        return DATASHEETS[name.lower()].device()
    except KeyError:
        raise ValueError(f"device: unknown preset {name!r}; known: {', '.join(DATASHEETS)}") from None


def preset_for(device_name: str) -> str | None:
    """The preset a measured device's reported name (e.g. ``"NVIDIA H100 80GB HBM3"``) belongs to, if any."""
    compact = device_name.lower().replace(" ", "").replace("-", "")
    return next((key for key in DATASHEETS if key in compact), None)
