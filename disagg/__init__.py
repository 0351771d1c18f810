"""disagg: a small disaggregated-serving engine (prefill stage -> KV export -> decode stage) built on
phaseattn's kernels, plus the roofline arithmetic the benchmarks, notebooks and simulator share."""
