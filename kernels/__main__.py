"""``python -m kernels``: both phases on random inputs, each checked against its float64 reference.

A prompt batch goes through ``prefill_attention``; its K/V are written into a paged cache (shuffled pages) with
``write_kv_cache``; one decode step attends over the pages with ``paged_decode_attention``; then three more tokens
per sequence are written and attended at once with ``paged_prefill_attention`` (chunked prefill / speculative
verification), with attention sinks. Runs compiled on a GPU or through Triton's interpreter on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import kernels
from kernels.reference import paged_decode_attention_ref, paged_prefill_attention_ref, prefill_attention_ref


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(  # no options: --help says what the command does
        prog="python -m kernels",
        description=" ".join(__doc__.replace("``", "").split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    ).parse_args(argv)
    device = "cpu" if kernels.INTERPRET else "cuda"
    dtype, hq, hkv, d, page = torch.bfloat16, 8, 2, 128, 16
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 130, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=gen).to(device, dtype) for h in (hq, hkv, hkv))
    mode = "Triton interpreter (CPU)" if kernels.INTERPRET else f"compiled on {torch.cuda.get_device_name()}"
    print(f"mode: {mode}; {len(lengths)} sequences {lengths}, {hq}/{hkv} heads, head_dim {d}, {dtype}")

    start = time.perf_counter()
    out = kernels.prefill_attention(q, k, v, cu, cu, causal=True)
    ref, _ = prefill_attention_ref(q, k, v, cu, cu, causal=True)
    print(
        f"prefill_attention:      rel. error {_rel(out, ref):.1e} ({time.perf_counter() - start:.2f} s incl. compile)"
    )

    # Page the prompts' K/V: each sequence gets whole pages, in shuffled order, plus room for EXTRA more tokens.
    extra = 3
    pages_per_seq = [-(-(n + extra) // page) for n in lengths]
    order = torch.randperm(sum(pages_per_seq), generator=gen)
    block_table = torch.zeros(len(lengths), max(pages_per_seq), dtype=torch.int32)
    slots, used = [], 0
    for b, (n, p) in enumerate(zip(lengths, pages_per_seq, strict=True)):
        block_table[b, :p] = order[used : used + p]
        used += p
        slots += [int(block_table[b, t // page]) * page + t % page for t in range(n)]
    k_cache = torch.randn(used, page, hkv, d, generator=gen).to(device, dtype)  # stale data in unused slots
    v_cache = torch.randn(used, page, hkv, d, generator=gen).to(device, dtype)
    kernels.write_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots, dtype=torch.int32, device=device))

    # One decode step: the last prompt token of each sequence queries its whole cached context.
    last = (cu[1:] - 1).long()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    block_table = block_table.to(device)
    start = time.perf_counter()
    dec = kernels.paged_decode_attention(q[last], k_cache, v_cache, block_table, seq_lens)
    ref, _ = paged_decode_attention_ref(q[last], k_cache, v_cache, block_table, seq_lens)
    print(
        f"paged_decode_attention: rel. error {_rel(dec, ref):.1e} ({time.perf_counter() - start:.2f} s incl. compile)"
    )
    print(f"decode == last prefill row: rel. difference {_rel(dec, out[last].double().cpu()):.1e}")

    # Three more tokens per sequence, written and attended at once over the prefix, with attention sinks.
    new_k, new_v = (torch.randn(extra * len(lengths), hkv, d, generator=gen).to(device, dtype) for _ in range(2))
    new_q = torch.randn(extra * len(lengths), hq, d, generator=gen).to(device, dtype)
    table = block_table.cpu()
    new_slots = [int(table[b, t // page]) * page + t % page for b, n in enumerate(lengths) for t in range(n, n + extra)]
    kernels.write_kv_cache(new_k, new_v, k_cache, v_cache, torch.tensor(new_slots, dtype=torch.int32, device=device))
    cu_new = torch.arange(len(lengths) + 1, dtype=torch.int32, device=device) * extra
    seq_lens = seq_lens + extra
    sinks = torch.randn(hq, generator=gen).to(device)
    start = time.perf_counter()
    ext = kernels.paged_prefill_attention(new_q, k_cache, v_cache, block_table, cu_new, seq_lens, sinks=sinks)
    ref, _ = paged_prefill_attention_ref(new_q, k_cache, v_cache, block_table, cu_new, seq_lens, sinks=sinks)
    print(
        f"paged_prefill_attention: rel. error {_rel(ext, ref):.1e} ({time.perf_counter() - start:.2f} s incl. compile)"
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the lines printed so far are the partial results
        print("interrupted", file=sys.stderr)
        sys.exit(130)
