"""The two phases must agree: for the same sequences, the last query row of prefill_attention equals
paged_decode_attention over a paged copy (written by write_kv_cache) of the same K/V. A disagreement would corrupt
disaggregated serving silently: the decode stage would continue a sequence the prefill stage never produced."""

from __future__ import annotations

import pytest
import torch

from kernels import paged_decode_attention, prefill_attention, write_kv_cache
from tests.paged import random_fp8, shuffled_block_table, slot_mapping
from tests.util import DEVICE, TOL, cu_seqlens, randn, rel_err

LENS = [1, 17, 100]
HQ, HKV, PAGE = 4, 2, 16


def paged_copy(gen, k, v, lens, cache_dtype, **scales):
    """Write packed K/V (total, HKV, D) into fresh paged caches (random sentinel contents) via write_kv_cache."""
    num_pages = sum(-(-n // PAGE) for n in lens) + 2
    shape = (num_pages, PAGE, HKV, k.shape[-1])
    if cache_dtype == torch.float8_e4m3fn:
        k_cache, v_cache = random_fp8(gen, *shape), random_fp8(gen, *shape)
    else:
        k_cache, v_cache = (randn(*shape, dtype=cache_dtype, generator=gen) for _ in range(2))
    table = shuffled_block_table(lens, PAGE, num_pages, gen)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping(table, lens, PAGE), **scales)
    return k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def last_rows(x, lens):
    ends = torch.tensor(lens).cumsum(0) - 1
    return x[ends.to(x.device)]


CASES = [({}, 1), ({"window": 40}, 3), ({"softcap": 5.0, "sm_scale": 0.2}, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options, num_splits", CASES, ids=["plain", "window-split", "softcap-split"])
def test_last_prefill_row_equals_decode(gen, dtype, options, num_splits):
    total, d = sum(LENS), 128
    q = randn(total, HQ, d, dtype=dtype, generator=gen)
    k = randn(total, HKV, d, dtype=dtype, generator=gen)
    v = randn(total, HKV, d, dtype=dtype, generator=gen)
    cu = cu_seqlens(LENS)
    pre, pre_lse = prefill_attention(q, k, v, cu, cu, causal=True, return_lse=True, **options)
    cache = paged_copy(gen, k, v, LENS, dtype)
    dec, dec_lse = paged_decode_attention(last_rows(q, LENS), *cache, num_splits=num_splits, return_lse=True, **options)
    assert rel_err(dec, last_rows(pre, LENS)) < TOL[dtype], rel_err(dec, last_rows(pre, LENS))
    assert rel_err(dec_lse, last_rows(pre_lse, LENS)) < TOL[dtype]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_fp8_decode_equals_prefill_on_the_dequantized_values(gen, q_dtype):
    # fp8 KV exists only in decode: its parity partner is prefill over the values the fp8 cache really holds.
    total, d = sum(LENS), 64
    k = randn(total, HKV, d, dtype=torch.float32, generator=gen)
    v = randn(total, HKV, d, dtype=torch.float32, generator=gen)
    k_scale, v_scale = 0.01, torch.tensor([0.008], device=DEVICE)
    k_cache, v_cache, table, seq_lens = paged_copy(
        gen, k, v, LENS, torch.float8_e4m3fn, k_scale=k_scale, v_scale=v_scale
    )
    slots = slot_mapping(table, LENS, PAGE).cpu()
    k_deq = k_cache.cpu()[slots // PAGE, slots % PAGE].float().to(DEVICE) * k_scale
    v_deq = v_cache.cpu()[slots // PAGE, slots % PAGE].float().to(DEVICE) * v_scale
    q = randn(total, HQ, d, dtype=torch.float32, generator=gen)
    cu = cu_seqlens(LENS)
    pre = prefill_attention(q, k_deq, v_deq, cu, cu, causal=True)
    dec = paged_decode_attention(
        last_rows(q, LENS).to(q_dtype), k_cache, v_cache, table, seq_lens, k_scale=k_scale, v_scale=v_scale
    )
    assert rel_err(dec, last_rows(pre, LENS)) < TOL[q_dtype], rel_err(dec, last_rows(pre, LENS))
