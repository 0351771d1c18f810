"""Time every prefill tile config on the shapes of the bar (issue 7's tuning loop). Needs a CUDA device.

``python bench/tune_prefill.py --out DIR`` writes ``DIR/prefill_tune.json``: for each shape, each config of
``kernels.prefill.TUNING_SPACE`` that fits (shared memory, and no spills on the path it runs: tensor descriptors
on sm_90, pointers before), its median time, TFLOP/s and its output's relative difference from the
default config's (a config that computes something else is a bug, not a speedup). The peers and ceilings are
measured by ``python -m bench prefill``; the configs' registers/spills/shared memory are read without a GPU by
``bench/compile_check.py --tuned``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import torch
import triton

import kernels
import kernels.prefill as prefill
from bench import results, timing
from disagg.roofline import attention_flops

TOTAL_TOKENS, HEADS = 16384, 32
SHAPES = [  # head_dim, causal, seqlen, kv_heads
    (128, True, 16384, 8), (128, True, 8192, 8), (128, True, 2048, 8), (128, False, 16384, 8),
    (64, True, 16384, 8), (256, True, 16384, 8),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="directory for the results ($OUT if set)"
    )
    args = ap.parse_args()
    if kernels.INTERPRET:
        raise SystemExit("tune_prefill needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    arch = kernels._runtime.arch(device)
    rows = []
    for head_dim, causal, seqlen, kv_heads in SHAPES:
        batch = TOTAL_TOKENS // seqlen
        q = torch.randn(TOTAL_TOKENS, HEADS, head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(TOTAL_TOKENS, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seqlen
        run = functools.partial(
            kernels.prefill_attention, q, k, v, cu, cu, causal=causal, max_seqlen_q=seqlen, max_seqlen_k=seqlen
        )
        flops = attention_flops(batch, HEADS, seqlen, seqlen, head_dim, causal)
        desc = prefill._wants_descriptors(q.dtype, arch) and prefill.tma_describable(q, k, v)
        default = prefill.default_config(head_dim, q.dtype, arch, desc)
        first = (default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"])
        row = {"head_dim": head_dim, "causal": causal, "seqlen": seqlen, "kv_heads": kv_heads, "configs": {}}
        row["tensor_descriptors"] = desc
        ref = None
        for cfg in [first, *(c for c in prefill.TUNING_SPACE if c != first)]:
            config = triton.Config({"BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}, num_warps=cfg[2], num_stages=cfg[3])
            fits = prefill._fits(config, head_dim, 2, desc)
            if not fits:
                continue
            try:
                with prefill.use_config(*cfg):
                    out = run()
                    ref = out if ref is None else ref
                    diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = timing.measure(run, device)
                row["configs"][str(cfg)] = {"ms": t.median_ms, "tflops": flops / t.median_ms / 1e9, "diff": diff}
            except Exception as e:  # a config that fails to compile or launch is recorded, not fatal
                row["configs"][str(cfg)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(head_dim, causal, seqlen, kv_heads, cfg, row["configs"][str(cfg)], flush=True)
        rows.append(row)
        (args.out / "prefill_tune.json").write_text(
            json.dumps({"meta": results.environment(device, False), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
