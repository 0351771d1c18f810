"""Tune and time the prefill kernel on a GPU: every tile config on the bar shapes, against PyTorch SDPA backends.

Usage (on a CUDA machine): ``python bench/tune_prefill.py --out DIR [--quick]``. Writes ``DIR/prefill_tune.json``
(every timing, with device and versions) and ``DIR/prefill_ptx_stats.txt`` (registers, spills, shared memory and
the count of wgmma instructions of each compiled config). This is the tuning loop of issue 7; the broad sweep with
all peers is ``python -m bench prefill``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
import triton
import triton.testing

import kernels
import kernels.prefill as prefill
from disagg.roofline import attention_flops

TOTAL_TOKENS = 16384
HEADS = 32


def make_inputs(seqlen: int, head_dim: int, kv_heads: int, dtype=torch.bfloat16):
    batch = TOTAL_TOKENS // seqlen
    q = torch.randn(batch * seqlen, HEADS, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch * seqlen, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seqlen
    return batch, q, k, v, cu


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def sdpa_peers(q, k, v, batch, seqlen, causal, results, tflops_of):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qb = q.view(batch, seqlen, q.shape[1], q.shape[2]).transpose(1, 2)
    kb = k.view(batch, seqlen, k.shape[1], k.shape[2]).transpose(1, 2)
    vb = v.view(batch, seqlen, v.shape[1], v.shape[2]).transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    for name, backend in [
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]:
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(
                    qb, kb, vb, is_causal=causal, enable_gqa=gqa
                )
                fn()
                ms = bench(fn)
            results[name] = {"ms": ms, "tflops": tflops_of(ms)}
        except Exception as e:  # a backend that refuses the shape is recorded, not fatal
            results[name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--quick", action="store_true", help="default config only on the non-bar shapes")
    args = ap.parse_args()
    assert not kernels.INTERPRET, "needs a CUDA device"
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "device": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    print(meta, flush=True)
    # (head_dim, causal, seqlen, kv_heads, sweep all configs?)
    shapes = [(128, True, s, HEADS, s in (8192, 16384)) for s in (1024, 2048, 4096, 8192, 16384)]
    shapes += [(128, False, 16384, HEADS, True), (128, True, 16384, 8, False)]
    shapes += [(64, True, s, HEADS, s == 16384) for s in (8192, 16384)]
    shapes += [(256, True, s, HEADS, s == 16384) for s in (8192, 16384)]
    rows = []
    stats = []
    for head_dim, causal, seqlen, kv_heads, sweep in shapes:
        batch, q, k, v, cu = make_inputs(seqlen, head_dim, kv_heads)
        flops = attention_flops(batch, HEADS, seqlen, seqlen, head_dim, causal)
        tflops_of = functools.partial(_tflops, flops)
        row = {"head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch, "kv_heads": kv_heads}
        run = functools.partial(
            kernels.prefill_attention, q, k, v, cu, cu, causal=causal, max_seqlen_q=seqlen, max_seqlen_k=seqlen
        )
        configs = prefill.TUNING_SPACE if sweep else []
        default = prefill.default_config(head_dim, q.dtype)
        configs = [(default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"])] + [
            c
            for c in configs
            if c != (default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"])
        ]
        row["configs"] = {}
        ref = None
        for cfg in configs:
            if not prefill._fits(triton.Config({"BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}, num_stages=cfg[3]), head_dim, 2):
                continue
            try:
                with prefill.use_config(*cfg):
                    out = run()
                    if ref is None:
                        ref = out
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = bench(run)
                row["configs"][str(cfg)] = {"ms": ms, "tflops": tflops_of(ms), "rel_to_first": err}
                print(
                    f"d{head_dim} causal={causal} S={seqlen} hkv={kv_heads} cfg={cfg}: {ms:.3f} ms "
                    f"{tflops_of(ms):.0f} TFLOP/s",
                    flush=True,
                )
            except Exception as e:
                row["configs"][str(cfg)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"cfg {cfg} failed: {e}", flush=True)
        # Autotuned end-to-end (what a user gets by default).
        try:
            run()
            ms = bench(run)
            row["autotuned"] = {
                "ms": ms,
                "tflops": tflops_of(ms),
                "config": str(getattr(prefill._autotuned, "best_config", None)),
            }
            print(f"  autotuned: {ms:.3f} ms {tflops_of(ms):.0f} TFLOP/s {row['autotuned']['config']}", flush=True)
        except Exception as e:
            row["autotuned"] = {"error": str(e)[:300]}
        sdpa_peers(q, k, v, batch, seqlen, causal, row, tflops_of)
        # Accuracy against SDPA's math on a slice (float32 reference of the first sequence, first 4 heads).
        n = min(seqlen, 2048)
        qs, ks, vs = (t[:n, :4].float().transpose(0, 1) for t in (q, k, v))
        if kv_heads != HEADS:
            ks, vs = (t[:n, :1].float().transpose(0, 1).expand(4, n, head_dim) for t in (k, v))
        ref32 = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
        out_n = kernels.prefill_attention(
            q[:n, :4].contiguous(),
            k[:n, : (4 if kv_heads == HEADS else 1)].contiguous(),
            v[:n, : (4 if kv_heads == HEADS else 1)].contiguous(),
            cu[:2] * 0 + torch.tensor([0, n], device="cuda", dtype=torch.int32),
            torch.tensor([0, n], device="cuda", dtype=torch.int32),
            causal=causal,
        )
        row["rel_err_vs_fp32"] = ((out_n.float() - ref32).norm() / ref32.norm()).item()
        print(
            "  peers: "
            + ", ".join(
                f"{kname} {row[kname].get('tflops', 0):.0f}" if "tflops" in row[kname] else f"{kname} skipped"
                for kname in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
            ),
            f"rel_err {row['rel_err_vs_fp32']:.1e}",
            flush=True,
        )
        rows.append(row)
        (args.out / "prefill_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        del q, k, v
        torch.cuda.empty_cache()
    # Compiler report of the default config at head_dim 128.
    batch, q, k, v, cu = make_inputs(4096, 128, HEADS)
    for cfg in prefill.TUNING_SPACE[:4]:
        with prefill.use_config(*cfg):
            kernels.prefill_attention(q, k, v, cu, cu, max_seqlen_q=4096, max_seqlen_k=4096)
    for key, compiled in (
        list(prefill._prefill_kernel.device_caches[0][0].items())[-8:]
        if hasattr(prefill._prefill_kernel, "device_caches")
        else []
    ):
        try:
            ptx = compiled.asm.get("ptx", "")
            stats.append(
                f"{compiled.metadata.num_warps}w {compiled.metadata.num_stages}s regs={compiled.n_regs} "
                f"spills={compiled.n_spills} smem={compiled.metadata.shared} wgmma={ptx.count('wgmma.mma_async')} "
                f"mma.sync={ptx.count('mma.sync')} cp.async={ptx.count('cp.async')} key={str(key)[:120]}"
            )
        except Exception as e:
            stats.append(f"stat failed: {e}")
    (args.out / "prefill_ptx_stats.txt").write_text("\n".join(stats) + "\n")
    print("\n".join(stats))
    print(f"{'shape':34} {'ours(best cfg)':>14} {'autotuned':>10} {'flash':>7} {'cudnn':>7} {'effic':>7}")
    for r in rows:
        best = max((c.get("tflops", 0) for c in r["configs"].values()), default=0)
        peers = [r[kname].get("tflops", float("nan")) for kname in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")]
        print(
            f"d{r['head_dim']} {'causal' if r['causal'] else 'full  '} S={r['seqlen']:<6} hkv={r['kv_heads']:<3}"
            f"{best:14.0f} {r['autotuned'].get('tflops', math.nan):10.0f} " + " ".join(f"{p:7.0f}" for p in peers)
        )


if __name__ == "__main__":
    main()
