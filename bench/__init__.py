"""phaseattn's microbenchmarks: our kernels against their peers on the same tensors, with the device's ceilings
measured in the same run, written to a JSON results file (``bench/results/``) and a readable table.

Run ``python -m bench prefill|decode|all [--smoke] [--quick] [--out FILE] [shape options]``; see
``bench/NOTES.md`` for the conventions. Importing this package imports nothing heavy: the CLI decides the
kernels' mode (``--smoke`` forces Triton's interpreter) before ``kernels`` is imported.
"""
