"""Links between GPUs: what a KV-cache transfer or a tensor-parallel all-reduce costs.

A link is one GPU's share of an interconnect, per direction: ``bandwidth`` (bytes/s) and a fixed ``latency``
(seconds) per message. The presets are nominal (datasheet) figures; real transfers reach somewhat less, and the
latency stands for a transfer's setup as well as the wire. Override them for a measured fabric.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per GPU, per direction
    latency: float  # seconds per message

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth: must be > 0, got {self.bandwidth}")
        if not self.latency >= 0:
            raise ValueError(f"latency: must be >= 0, got {self.latency}")

    def transfer_time(self, nbytes: float, gpus: int = 1) -> float:
        """Time to move ``nbytes`` point to point over ``gpus`` such links in parallel (an instance of ``gpus``
        GPUs sends its tensor-parallel shards over one link each)."""
        return self.latency + nbytes / (self.bandwidth * gpus)

    def allreduce_time(self, nbytes: float, ranks: int) -> float:
        """A ring all-reduce of ``nbytes`` over ``ranks`` GPUs: each sends and receives 2·(ranks−1)/ranks of the
        data in 2·(ranks−1) rounds, each paying the latency."""
        if ranks <= 1:
            return 0.0
        return 2 * (ranks - 1) * (self.latency + nbytes / (ranks * self.bandwidth))


# H100/H200 SXM: 900 GB/s bidirectional. Latency: NCCL all-reduces between two H100s over NVLink take 7-30 µs for
# 2 KB-2 MB messages as Vidur measured them (microsoft/vidur, data/profiling/network/h100_pair_nvlink/all_reduce.csv),
# about 10 µs for each of a ring's 2·(n−1) rounds.
NVLINK4 = Link("nvlink4", 450e9, 10e-6)
NVLINK3 = Link("nvlink3", 300e9, 2e-6)  # A100 SXM: 600 GB/s bidirectional
XGMI = Link("xgmi", 448e9, 2e-6)  # MI300X Infinity Fabric: 7 peers × 64 GB/s per direction
PCIE4 = Link("pcie4", 32e9, 5e-6)  # PCIe 4.0 x16
PCIE5 = Link("pcie5", 64e9, 5e-6)  # PCIe 5.0 x16
IB_NDR = Link("ib-ndr", 50e9, 10e-6)  # InfiniBand NDR 400 Gb/s, RDMA, one NIC per GPU
IB_HDR = Link("ib-hdr", 25e9, 10e-6)  # InfiniBand HDR 200 Gb/s
ETH_100G = Link("ethernet-100g", 12.5e9, 50e-6)  # 100 GbE, TCP
ETH_25G = Link("ethernet-25g", 3.125e9, 50e-6)  # 25 GbE, TCP

LINKS: dict[str, Link] = {
    link.name: link for link in (NVLINK4, NVLINK3, XGMI, PCIE4, PCIE5, IB_NDR, IB_HDR, ETH_100G, ETH_25G)
}


def link(name: str) -> Link:
    """A preset by name (see ``LINKS``)."""
    try:
        return LINKS[name.lower()]
    except KeyError:
        raise ValueError(f"link: unknown preset {name!r}; known: {', '.join(LINKS)}") from None
