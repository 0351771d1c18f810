"""disagg.sim: does disaggregation pay? A discrete-event simulator of an LLM serving cluster, colocated or
disaggregated, with step costs from the roofline of each device (calibrated by ``bench`` results where they exist).

The pieces, one a module: ``devices`` (GPUs, their ceilings, efficiencies and prices), ``calibration`` (reading
bench results), ``links`` (interconnects), ``costs`` (what a step costs: rooflines plus the terms of a
``CostModel``), ``workload`` (request streams), ``cluster`` (the two deployments), ``engine`` (the event loop),
``metrics`` (TTFT, TPOT, SLO attainment, goodput, throughput), ``search`` (the cheapest deployment meeting a goodput
target), ``validate`` (predictions against a published table). ``python -m disagg.sim`` is the command line;
``python -m disagg.sim.bench`` times a 1,000-GPU, 100k-request run.
"""

from disagg.roofline import LLAMA3_8B, LLAMA3_70B, ModelShape
from disagg.sim.calibration import calibrate, calibrated_devices, read_results
from disagg.sim.cluster import Colocated, Disaggregated, Pool, Serving
from disagg.sim.costs import ROOFLINE, CostModel, StepCost
from disagg.sim.devices import DEFAULT, Device, Efficiency, device
from disagg.sim.engine import simulate
from disagg.sim.links import LINKS, Link, link
from disagg.sim.metrics import SLO, SimResult, Throughput, attainment, goodput, summarize, throughput
from disagg.sim.validate import Validation
from disagg.sim.workload import Bursty, Fixed, LogNormal, Poisson, Requests, TraceLengths, Uniform, Workload

__all__ = [
    "DEFAULT",
    "LINKS",
    "LLAMA3_8B",
    "LLAMA3_70B",
    "ROOFLINE",
    "SLO",
    "Bursty",
    "Colocated",
    "CostModel",
    "Device",
    "Disaggregated",
    "Efficiency",
    "Fixed",
    "Link",
    "LogNormal",
    "ModelShape",
    "Poisson",
    "Pool",
    "Requests",
    "Serving",
    "SimResult",
    "StepCost",
    "Throughput",
    "TraceLengths",
    "Uniform",
    "Validation",
    "Workload",
    "attainment",
    "calibrate",
    "calibrated_devices",
    "device",
    "goodput",
    "link",
    "read_results",
    "simulate",
    "summarize",
    "throughput",
]
