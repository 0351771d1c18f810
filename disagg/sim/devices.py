"""GPUs as the simulator sees them: two ceilings, the fraction of them each kind of kernel reaches, memory, a price.

A device's ``flops`` is the compute ceiling (a large dense bf16 matmul) and ``bandwidth`` the memory ceiling (a
large device-to-device copy, bytes read plus written): the quantities ``python -m bench`` measures at the start of
every run. Each kernel class then reaches a fraction of the roofline those two ceilings draw (``Efficiency``):
the model's GEMMs, prefill attention (measured by the benchmark as a fraction of the matmul ceiling) and paged decode
attention (as a fraction of the copy bandwidth). A fraction derates both roofs, but a kernel only ever meets the one
it is bound by, which is the roof its fraction was measured against.

Where no results file gives a quantity, a stated default stands in and the device says so (``Provenance``):
ceilings default to 80 % (compute) and 90 % (bandwidth) of the datasheet, which is what H100 and H200 reach
(~798 of 989 TFLOP/s, ~3.0 of 3.35 TB/s), and the efficiencies to the values of ``Efficiency()``. Prices are
illustrative on-demand cloud figures in USD per GPU-hour: a parameter to set, not a fact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from disagg.sim.links import NVLINK3, NVLINK4, PCIE4, XGMI, Link

DEFAULT = "default, not measured"
COMPUTE_DERATE = 0.8  # default compute ceiling as a fraction of the datasheet's dense bf16 peak
BANDWIDTH_DERATE = 0.9  # default copy bandwidth as a fraction of the datasheet's memory bandwidth


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the device roofline each kernel class reaches (0 < e <= 1)."""

    gemm: float = 0.9
    prefill_attention: float = 0.75
    decode_attention: float = 0.8

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

    def __post_init__(self) -> None:
        for name in ("flops", "bandwidth", "memory"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.price_per_hour >= 0:
            raise ValueError(f"price_per_hour: must be >= 0, got {self.price_per_hour}")

    def with_price(self, price_per_hour: float) -> Device:
        return dataclasses.replace(self, price_per_hour=price_per_hour)

    @property
    def measured(self) -> bool:
        """True when every calibrated quantity comes from a results file."""
        return all(v != DEFAULT for v in dataclasses.astuple(self.provenance))

    def describe(self) -> str:
        """One line with every number the costs use and where it came from."""
        e, p = self.efficiency, self.provenance
        return (
            f"{self.name}: {self.flops / 1e12:.0f} TFLOP/s, {self.bandwidth / 1e12:.2f} TB/s ({p.ceilings}), "
            f"{self.memory / 1e9:.0f} GB, ${self.price_per_hour:.2f}/h; efficiency gemm {e.gemm:.2f} ({p.gemm}), "
            f"prefill attention {e.prefill_attention:.2f} ({p.prefill_attention}), "
            f"decode attention {e.decode_attention:.2f} ({p.decode_attention})"
        )


@dataclass(frozen=True)
class Datasheet:
    """A part's published figures: dense bf16 FLOP/s, memory bytes/s, memory bytes."""

    name: str
    peak_flops: float
    peak_bandwidth: float
    memory: float
    price_per_hour: float
    interconnect: Link

    def device(self) -> Device:
        """The device with default (derated datasheet) ceilings and default efficiencies, labelled as such."""
        return Device(
            self.name,
            self.peak_flops * COMPUTE_DERATE,
            self.peak_bandwidth * BANDWIDTH_DERATE,
            self.memory,
            self.price_per_hour,
            self.interconnect,
        )


DATASHEETS: dict[str, Datasheet] = {
    d.name.lower(): d
    for d in (
        Datasheet("H100", 989e12, 3.35e12, 80e9, 3.00, NVLINK4),  # SXM5 80 GB HBM3
        Datasheet("H200", 989e12, 4.8e12, 141e9, 3.80, NVLINK4),  # SXM 141 GB HBM3e
        Datasheet("A100", 312e12, 2.039e12, 80e9, 1.80, NVLINK3),  # SXM4 80 GB HBM2e
        Datasheet("L40S", 362e12, 0.864e12, 48e9, 1.10, PCIE4),  # 48 GB GDDR6, no NVLink
        Datasheet("MI300X", 1307e12, 5.3e12, 192e9, 3.00, XGMI),  # 192 GB HBM3
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
