"""Plans (kernels._plan): a plan's run equals the one-call function bit for bit for every kernel and option,
reads nothing back from the device, and refuses tensors of another shape than it was made for."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import (
    PagedDecodePlan,
    PagedPrefillPlan,
    PrefillPlan,
    Workspace,
    WriteKVPlan,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention,
    write_kv_cache,
)
from tests.host_reads import count_host_reads, summary
from tests.paged import random_fp8, random_paged_kv, slot_mapping
from tests.util import DEVICE, ON_CUDA, cu_seqlens, randn

DECODE_OPTIONS = [
    # (lens, hq, hkv, head_dim, page_size, q dtype, kv "same" or "fp8", options)
    ([1, 17, 40], 4, 2, 32, 8, torch.float32, "same", {}),
    ([5, 40, 33], 4, 2, 32, 16, torch.float32, "same", {"num_splits": 3, "return_lse": True}),
    ([9, 30], 4, 1, 32, 16, torch.bfloat16, "same", {"window": 20, "num_splits": 2, "return_lse": True}),
    ([30, 2], 8, 2, 32, 8, torch.float16, "same", {"softcap": 3.0, "sm_scale": 0.5}),
    ([600, 3], 4, 1, 32, 64, torch.float32, "same", {}),  # automatic split: 2 splits from the host lengths
    ([20, 50], 4, 2, 32, 16, torch.float16, "fp8", {"k_scale": 0.02, "v_scale": 0.03}),
    ([20, 50], 4, 2, 32, 16, torch.float32, "fp8", {"k_scale": "tensor", "v_scale": "tensor", "num_splits": 2}),
    ([0, 45, 7], 4, 2, 48, 4, torch.float32, "same", {"sinks": True, "return_lse": True}),  # a padding row
    ([45, 130], 4, 2, 32, 16, torch.float32, "same", {"sinks": True, "num_splits": 3}),  # sinks in the merge
]


def _sinks(gen, hq):
    return torch.randn(hq, generator=gen).to(DEVICE)


def _split_sinks(options):
    """The plan's options (with_sinks) and whether each run takes this layer's sinks."""
    sinks = options.pop("sinks", False)
    return options, sinks


def _same(expected, got):
    pairs = zip(*(x if isinstance(x, tuple) else (x,) for x in (expected, got)), strict=True)
    return all(torch.equal(e, g) for e, g in pairs)


def _layer_caches(gen, kv, kind):
    """A second layer's caches with the first's layout (a plan serves every layer)."""
    if kind == "fp8":
        return (random_fp8(gen, *kv.k_cache.shape), random_fp8(gen, *kv.k_cache.shape))
    return tuple(randn(*kv.k_cache.shape, dtype=kv.k_cache.dtype, generator=gen) for _ in range(2))


@pytest.mark.skipif(ON_CUDA and kernels._runtime.AUTOTUNE, reason="the one-call path autotunes; plans do not")
@pytest.mark.parametrize("lens, hq, hkv, d, ps, dtype, kind, options", DECODE_OPTIONS)
def test_decode_plan_equals_one_call_bitwise(gen, lens, hq, hkv, d, ps, dtype, kind, options):
    kv = random_paged_kv(gen, lens, hkv, d, ps, dtype)
    layers = [(kv.k_cache, kv.v_cache)]
    if kind == "fp8":
        layers = [(random_fp8(gen, *kv.k_cache.shape), random_fp8(gen, *kv.k_cache.shape))]
    layers.append(_layer_caches(gen, kv, kind))
    options, with_sinks = _split_sinks(dict(options))
    options = {
        k: torch.tensor([0.05], dtype=torch.float32, device=DEVICE) if v == "tensor" else v for k, v in options.items()
    }
    plan = PagedDecodePlan(
        *layers[0],
        lens,
        num_q_heads=hq,
        q_dtype=dtype,
        block_table_width=kv.block_table.shape[1],
        block_table=kv.block_table.cpu(),
        with_sinks=with_sinks,
        workspace=Workspace(DEVICE),
        **options,
    )
    if lens == [600, 3]:
        assert plan.num_splits == 2
    for k_cache, v_cache in layers:
        q = randn(len(lens), hq, d, dtype=dtype, generator=gen)
        sinks = {"sinks": _sinks(gen, hq)} if with_sinks else {}
        expected = paged_decode_attention(q, k_cache, v_cache, kv.block_table, kv.seq_lens, **options, **sinks)
        assert _same(expected, plan.run(q, k_cache, v_cache, kv.block_table, kv.seq_lens, **sinks))
        if k_cache is not layers[-1][0]:
            continue
        # into given outputs (last layer): the same values, nothing allocated
        out = torch.empty_like(q)
        lse = torch.empty(len(lens), hq, dtype=torch.float32, device=DEVICE) if options.get("return_lse") else None
        got = plan.run(q, k_cache, v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse, **sinks)
        assert (got[0] if lse is not None else got) is out
        assert _same(expected, got)


PAGED_PREFILL_OPTIONS = [
    # (seq_lens, query lens, hq, hkv, head_dim, page_size, q dtype, kv "same" or "fp8", options)
    ([50, 0, 70, 16, 90, 1], [0, 0, 1, 16, 70, 1], 4, 2, 32, 8, torch.float32, "same", {"return_lse": True}),
    ([100, 37], [40, 37], 4, 1, 64, 16, torch.float32, "same", {"window": 30, "sinks": True}),
    ([100, 30], [3, 2], 4, 2, 32, 16, torch.float32, "same", {"softcap": 4.0, "num_splits": 3, "sinks": True}),
    ([600, 40], [3, 5], 4, 1, 32, 64, torch.float32, "same", {"return_lse": True}),  # automatic split
    ([90, 30], [30, 30], 4, 2, 32, 16, torch.float16, "same", {"causal": False, "sm_scale": 0.2}),
    ([80, 33], [20, 1], 4, 2, 32, 16, torch.float32, "fp8", {"k_scale": "tensor", "v_scale": 0.03}),
]


@pytest.mark.skipif(ON_CUDA and kernels._runtime.AUTOTUNE, reason="the one-call path autotunes; plans do not")
@pytest.mark.parametrize("lens, q_lens, hq, hkv, d, ps, dtype, kind, options", PAGED_PREFILL_OPTIONS)
def test_paged_prefill_plan_equals_one_call_bitwise(gen, lens, q_lens, hq, hkv, d, ps, dtype, kind, options):
    kv = random_paged_kv(gen, lens, hkv, d, ps, dtype)
    layers = [(kv.k_cache, kv.v_cache)]
    if kind == "fp8":
        layers = [(random_fp8(gen, *kv.k_cache.shape), random_fp8(gen, *kv.k_cache.shape))]
    layers.append(_layer_caches(gen, kv, kind))
    options, with_sinks = _split_sinks(dict(options))
    options = {
        k: torch.tensor([0.05], dtype=torch.float32, device=DEVICE) if v == "tensor" else v for k, v in options.items()
    }
    cu = cu_seqlens(q_lens)
    plan = PagedPrefillPlan(
        *layers[0],
        q_lens,
        lens,
        num_q_heads=hq,
        q_dtype=dtype,
        block_table_width=kv.block_table.shape[1],
        block_table=kv.block_table.cpu(),
        with_sinks=with_sinks,
        **options,
    )
    if lens == [600, 40]:
        assert plan.num_splits > 1
    for k_cache, v_cache in layers:
        q = randn(sum(q_lens), hq, d, dtype=dtype, generator=gen)
        sinks = {"sinks": _sinks(gen, hq)} if with_sinks else {}
        args = (q, k_cache, v_cache, kv.block_table, cu, kv.seq_lens)
        assert _same(paged_prefill_attention(*args, **options, **sinks), plan.run(*args, **sinks))


@pytest.mark.parametrize(
    "dtype, cache, scale, slot_dtype",
    [
        (torch.float32, torch.float32, None, torch.int64),
        (torch.bfloat16, torch.bfloat16, None, torch.int32),
        (torch.float16, torch.float8_e4m3fn, 0.01, torch.int64),
        (torch.float32, torch.float8_e4m3fn, "tensor", torch.int32),
    ],
)
def test_write_plan_equals_one_call_bitwise(gen, dtype, cache, scale, slot_dtype):
    lens, hkv, d, ps = [7, 30], 2, 32, 8
    kv = random_paged_kv(gen, lens, hkv, d, ps, torch.float32)
    slots = slot_mapping(kv.block_table, lens, ps)
    slots[3] = -1  # padding: skipped
    slots = slots.to(slot_dtype)
    if scale == "tensor":
        scale = torch.tensor([0.02], dtype=torch.float32, device=DEVICE)
    scales = {"k_scale": scale, "v_scale": scale} if scale is not None else {}
    if cache == torch.float8_e4m3fn:
        base = random_fp8(gen, *kv.k_cache.shape)
    else:
        base = kv.k_cache.to(cache)
    plan = WriteKVPlan(
        base, base, len(slots), kv_dtype=dtype, slot_mapping=slots.cpu(), slot_dtype=slot_dtype, **scales
    )
    for _ in range(2):  # two layers
        k, v = (randn(len(slots), hkv, d, dtype=dtype, generator=gen) for _ in range(2))
        one = [base.clone(), base.clone()]
        planned = [base.clone(), base.clone()]
        write_kv_cache(k, v, *one, slots, **scales)
        plan.run(k, v, *planned, slots)
        for a, b in zip(one, planned, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert not torch.equal(planned[0].view(torch.uint8), base.view(torch.uint8))  # it wrote something


PREFILL_OPTIONS = [
    # (query lengths, key lengths or None, hq, hkv, head_dim, dtype, options)
    ([5, 40, 0, 33], None, 4, 2, 32, torch.float32, {}),
    ([20, 3], [50, 3], 4, 1, 64, torch.float32, {"return_lse": True}),  # Lq < Lk: bottom-right causal
    ([40, 30], None, 2, 2, 32, torch.bfloat16, {"window": 17, "softcap": 5.0, "return_lse": True}),
    ([30, 7], [12, 7], 4, 2, 32, torch.float16, {"causal": False, "sm_scale": 0.3}),
    ([0, 0], None, 4, 2, 32, torch.float32, {"return_lse": True}),  # nothing to launch
    ([17, 40], None, 4, 2, 80, torch.float32, {"sinks": True, "return_lse": True}),
]


@pytest.mark.skipif(ON_CUDA and kernels._runtime.AUTOTUNE, reason="the one-call path autotunes; plans do not")
@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, dtype, options", PREFILL_OPTIONS)
def test_prefill_plan_equals_one_call_bitwise(gen, lens_q, lens_k, hq, hkv, d, dtype, options):
    lens_k = lens_k or lens_q
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    options, with_sinks = _split_sinks(dict(options))
    plan = PrefillPlan(
        lens_q,
        lens_k,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        dtype=dtype,
        device=DEVICE,
        with_sinks=with_sinks,
        **options,
    )
    for _ in range(2):  # two layers
        q = randn(sum(lens_q), hq, d, dtype=dtype, generator=gen)
        k, v = (randn(sum(lens_k), hkv, d, dtype=dtype, generator=gen) for _ in range(2))
        sinks = {"sinks": _sinks(gen, hq)} if with_sinks else {}
        expected = prefill_attention(
            q, k, v, cu_q, cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), **options, **sinks
        )
        assert _same(expected, plan.run(q, k, v, cu_q, cu_k, **sinks))


def test_a_prefill_plan_refuses_another_batch(gen):
    plan = PrefillPlan([3, 9], num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=DEVICE)
    q = randn(12, 4, 32, dtype=torch.float32, generator=gen)
    k = randn(12, 2, 32, dtype=torch.float32, generator=gen)
    cu = cu_seqlens([3, 9])
    with pytest.raises(ValueError, match=r"q does not fit this plan \(another token count"):
        plan.run(q[:11], k, k, cu, cu)
    with pytest.raises(ValueError, match="k does not fit this plan"):
        plan.run(q, k[:, :1], k, cu, cu)
    with pytest.raises(ValueError, match="cu_seqlens_k does not fit this plan"):
        plan.run(q, k, k, cu, cu_seqlens([3, 4, 5]))
    with pytest.raises(ValueError, match="window requires causal"):
        PrefillPlan(
            [3], num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=DEVICE, causal=False, window=4
        )
    with pytest.raises(ValueError, match=r"seqlens_q must be >= 0, got seqlens_q\[1\] = -1"):
        PrefillPlan([3, -1], num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="seqlens_q has 2 sequences but seqlens_k has 1"):
        PrefillPlan([3, 1], [3], num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=DEVICE)


def test_run_reads_nothing_back_from_the_device(gen):
    lens = [10, 300]
    kv = random_paged_kv(gen, lens, 2, 32, 16, torch.float32)
    q = randn(2, 4, 32, dtype=torch.float32, generator=gen)
    k = randn(2, 2, 32, dtype=torch.float32, generator=gen)
    slots = torch.tensor([0, 17], device=DEVICE)
    decode = PagedDecodePlan(
        kv.k_cache,
        kv.v_cache,
        lens,
        num_q_heads=4,
        q_dtype=torch.float32,
        block_table_width=kv.block_table.shape[1],
        num_splits=2,
    )
    write = WriteKVPlan(kv.k_cache, kv.v_cache, 2, kv_dtype=torch.float32)
    prefill = PrefillPlan([2], num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=DEVICE)
    paged = PagedPrefillPlan(
        kv.k_cache,
        kv.v_cache,
        [1, 1],
        lens,
        num_q_heads=4,
        q_dtype=torch.float32,
        block_table_width=kv.block_table.shape[1],
        num_splits=2,
    )
    cu = cu_seqlens([2])
    with count_host_reads() as counts:
        write.run(k, k, kv.k_cache, kv.v_cache, slots)
        decode.run(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
        prefill.run(q, k, k, cu, cu)
        paged.run(q, kv.k_cache, kv.v_cache, kv.block_table, cu_seqlens([1, 1]), kv.seq_lens)
    assert not counts, summary(counts)


@pytest.fixture
def decode_plan(gen):
    lens = [10, 40, 3]
    kv = random_paged_kv(gen, lens, 2, 32, 16, torch.float32)
    plan = PagedDecodePlan(
        kv.k_cache, kv.v_cache, lens, num_q_heads=4, q_dtype=torch.float32, block_table_width=kv.block_table.shape[1]
    )
    return plan, kv, randn(3, 4, 32, dtype=torch.float32, generator=gen)


def test_a_plan_refuses_another_batch(gen, decode_plan):
    plan, kv, q = decode_plan
    args = (kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match=r"q does not fit this plan \(another batch.*expected shape \(3, 4, 32\)"):
        plan.run(torch.cat([q, q[:1]]), *args)
    with pytest.raises(ValueError, match="q does not fit this plan"):
        plan.run(q[:, :2], *args)
    with pytest.raises(ValueError, match="q does not fit this plan"):
        plan.run(q.double(), *args)
    with pytest.raises(ValueError, match="block_table does not fit this plan"):
        plan.run(q, kv.k_cache, kv.v_cache, kv.block_table[:, :-1], kv.seq_lens)
    with pytest.raises(ValueError, match="block_table does not fit this plan"):
        plan.run(q, kv.k_cache, kv.v_cache, kv.block_table[:2], kv.seq_lens)
    with pytest.raises(ValueError, match="seq_lens does not fit this plan"):
        plan.run(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens.long())
    other = randn(kv.k_cache.shape[0] + 1, *kv.k_cache.shape[1:], dtype=torch.float32, generator=gen)
    with pytest.raises(ValueError, match="k_cache does not fit this plan"):
        plan.run(q, other, kv.v_cache, kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match=r"v_cache does not fit this plan.*strides"):
        plan.run(q, kv.k_cache, kv.v_cache.transpose(0, 1).contiguous().transpose(0, 1), kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match="out does not fit this plan"):
        plan.run(q, *args, out=torch.empty(3, 4, 64))
    with pytest.raises(ValueError, match="return_lse"):
        plan.run(q, *args, lse=torch.empty(3, 4))


def test_a_paged_prefill_plan_refuses_another_batch_and_checks_its_lengths(gen):
    kv = random_paged_kv(gen, [20, 9], 2, 32, 8, torch.float32)
    width = kv.block_table.shape[1]
    common = {"num_q_heads": 4, "q_dtype": torch.float32, "block_table_width": width}
    plan = PagedPrefillPlan(kv.k_cache, kv.v_cache, [4, 9], [20, 9], with_sinks=True, **common)
    q = randn(13, 4, 32, dtype=torch.float32, generator=gen)
    cu = cu_seqlens([4, 9])
    args = (kv.k_cache, kv.v_cache, kv.block_table, cu, kv.seq_lens)
    sinks = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match=r"q does not fit this plan \(another token count"):
        plan.run(q[:12], *args, sinks=sinks)
    with pytest.raises(ValueError, match="cu_seqlens_q does not fit this plan"):
        plan.run(q, kv.k_cache, kv.v_cache, kv.block_table, cu_seqlens([4, 9, 0]), kv.seq_lens, sinks=sinks)
    with pytest.raises(ValueError, match="made with_sinks=True"):
        plan.run(q, *args)
    with pytest.raises(ValueError, match="sinks does not fit this plan"):
        plan.run(q, *args, sinks=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"sequence 1 has 10 new queries but seq_lens\[1\] = 9"):
        PagedPrefillPlan(kv.k_cache, kv.v_cache, [4, 10], [20, 9], **common)
    with pytest.raises(ValueError, match="query_lens has 1 sequences but seq_lens has 2"):
        PagedPrefillPlan(kv.k_cache, kv.v_cache, [4], [20, 9], **common)
    with pytest.raises(ValueError, match="made without sinks"):
        PagedPrefillPlan(kv.k_cache, kv.v_cache, [4, 9], [20, 9], **common).run(q, *args, sinks=sinks)


def test_a_write_plan_refuses_another_token_count(gen):
    kv = random_paged_kv(gen, [20], 2, 32, 8, torch.float32)
    plan = WriteKVPlan(kv.k_cache, kv.v_cache, 4, kv_dtype=torch.float32)
    k = randn(5, 2, 32, dtype=torch.float32, generator=gen)
    slots = torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"k does not fit this plan \(another token count"):
        plan.run(k, k, kv.k_cache, kv.v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping does not fit this plan"):
        plan.run(k[:4], k[:4], kv.k_cache, kv.v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping does not fit this plan"):
        plan.run(k[:4], k[:4], kv.k_cache, kv.v_cache, slots[:4].int())
    with pytest.raises(ValueError, match="slot_mapping must be contiguous"):  # the kernel reads it densely
        plan.run(k[:4], k[:4], kv.k_cache, kv.v_cache, torch.arange(8, device=DEVICE)[::2])


def test_plans_check_host_metadata(gen):
    kv = random_paged_kv(gen, [20, 9], 2, 32, 8, torch.float32)
    width = kv.block_table.shape[1]
    common = {"num_q_heads": 4, "q_dtype": torch.float32, "block_table_width": width}
    with pytest.raises(ValueError, match=r"seq_lens must be >= 0, got seq_lens\[1\] = -1"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, -1], **common)
    with pytest.raises(ValueError, match="block_table_width"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, width * 8 + 1], **common)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 99 is not a page"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, 9], block_table=[[0, 1, 2], [99, 1]], **common)
    with pytest.raises(ValueError, match="num_splits"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, 9], num_splits=0, **common)
    with pytest.raises(TypeError, match="q_dtype"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, 9], **{**common, "q_dtype": torch.float16})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, 9], **{**common, "num_q_heads": 3})
    with pytest.raises(TypeError, match="seq_lens must be"):
        PagedDecodePlan(kv.k_cache, kv.v_cache, [20, 9.0], **common)
    with pytest.raises(ValueError, match="slot_mapping holds slot"):
        WriteKVPlan(kv.k_cache, kv.v_cache, 2, kv_dtype=torch.float32, slot_mapping=[0, kv.k_cache.shape[0] * 8])
    with pytest.raises(ValueError, match="k_scale is required"):
        WriteKVPlan(*(random_fp8(gen, *kv.k_cache.shape) for _ in range(2)), 2, kv_dtype=torch.float32)


def test_workspace_is_shared_and_grows():
    ws = Workspace(DEVICE)
    small = ws.take(10)
    assert ws.take(5).data_ptr() == small.data_ptr()
    big = ws.take(1000)
    assert big.numel() == 1000 and ws.take(10).data_ptr() == big.data_ptr()
