"""paged_decode_attention against the float64 reference over gathered pages: page sizes, GQA/MQA, split-KV,
window, softcap, fp8 KV, strided inputs, long contexts, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
import kernels.decode as decode
from kernels import paged_decode_attention, write_kv_cache
from kernels.reference import attention_ref, paged_decode_attention_ref
from tests.paged import UNUSED_PAGE, random_fp8, random_paged_kv, shuffled_block_table, slot_mapping
from tests.util import DEVICE, ON_CUDA, TOL, randn, rel_err, replace_arg, trap_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Against attention over the original, unquantized K/V, fp8 is judged by a looser bound: e4m3 keeps 3 mantissa
# bits, so each stored element is off by up to 2**-4 relative (≈3.6% RMS for uniform rounding), and the output
# inherits about that. Measured 3.0-3.6e-2 on these shapes for every q dtype; the bound leaves ~2x margin.
# (Against the values the fp8 cache really holds the usual TOL applies: the kernel's own arithmetic is as exact.)
FP8_END_TO_END_TOL = 6e-2


def run_case(gen, lens, hq, hkv, d, page_size, dtype, **kw):
    kv = random_paged_kv(gen, lens, hkv, d, page_size, dtype)
    q = randn(len(lens), hq, d, dtype=dtype, generator=gen)
    inputs = [t.clone() for t in (q, *kv.args)]
    out, lse = paged_decode_attention(q, *kv.args, return_lse=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, *kv.args), strict=True))  # inputs are read-only
    kw.pop("num_splits", None)
    ref, ref_lse = paged_decode_attention_ref(q, *kv.args, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    assert rel_err(lse, ref_lse) < TOL[dtype], rel_err(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
def test_head_dims_and_dtypes(gen, dtype, head_dim):
    run_case(gen, [1, 37, 130], 4, 2, head_dim, 16, dtype)


@pytest.mark.parametrize("head_dim", [d for d in decode.HEAD_DIMS if d not in (32, 64, 96, 128, 192, 256)])
def test_every_multiple_of_16_head_dim(gen, head_dim):
    run_case(gen, [1, 70], 4, 2, head_dim, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_every_page_size_on_and_past_page_boundaries(gen, dtype, page_size):
    lens = [1, page_size - 1, page_size, page_size + 1, 2 * page_size + 1]
    run_case(gen, lens, 2, 1, 64, page_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa_ratios(gen, dtype, group):
    run_case(gen, [70, 200], 2 * group, 2, 128, 16, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads", [8, 32])
def test_mqa(gen, dtype, num_q_heads):
    run_case(gen, [5, 150], num_q_heads, 1, 64, 32, dtype)


@pytest.mark.parametrize(
    "num_splits, dtype", [(2, torch.float32), (3, torch.float32), (16, torch.float32), (16, torch.bfloat16)]
)
def test_explicit_splits(gen, num_splits, dtype):
    # 16 splits is more than the 13 pages / 4 tiles of the 200-token sequence and far more than seq_len 1 has:
    # the empty splits must merge away.
    run_case(gen, [1, 200, 700], 4, 1, 64, 16, dtype, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_zero_length_sequences_give_zeros_and_read_no_page(gen, num_splits):
    # Padding rows (e.g. of a captured CUDA graph): seq_len 0, their block-table rows point at no page at all.
    kv = random_paged_kv(gen, [0, 37, 0, 130], 2, 64, 16, torch.float32)
    kv.block_table[0] = UNUSED_PAGE
    kv.block_table[2] = -1
    q = randn(4, 4, 64, dtype=torch.float32, generator=gen)
    out, lse = paged_decode_attention(q, *kv.args, return_lse=True, num_splits=num_splits)
    ref, ref_lse = paged_decode_attention_ref(q, *kv.args)
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(lse, ref_lse) < TOL[torch.float32]
    assert torch.all(out[[0, 2]] == 0) and torch.all(torch.isneginf(lse[[0, 2]]))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks(gen, num_splits, dtype):
    sinks = randn(8, dtype=torch.float32, generator=gen) * 3
    out, lse = run_case(gen, [0, 1, 90, 300], 8, 2, 64, 16, dtype, sinks=sinks, num_splits=num_splits)
    assert torch.all(out[0] == 0) and torch.allclose(lse[0], sinks, rtol=1e-6, atol=1e-6)  # only the sink is seen


def test_automatic_splits_split_long_contexts(gen, monkeypatch):
    chosen = []
    original = decode.choose_num_splits
    monkeypatch.setattr(decode, "choose_num_splits", lambda *a: chosen.append(original(*a)) or chosen[-1])
    run_case(gen, [1000, 3], 4, 1, 64, 16, torch.float32)
    assert chosen == [1000 // decode.MIN_TOKENS_PER_SPLIT]  # 2 programs: as many splits as the length allows


def test_choose_num_splits_on_the_benchmark_shapes():
    # H100 (132 SMs), 8 KV heads: batch 64 x 4k fills the GPU without splitting; batch 1 x 128k splits to ~2
    # programs per SM; short contexts are never cut below MIN_TOKENS_PER_SPLIT.
    assert decode.choose_num_splits(64, 8, 4096, 132) == 1
    assert decode.choose_num_splits(1, 8, 131072, 132) == 33
    assert decode.choose_num_splits(1, 8, 600, 132) == 2
    assert decode.choose_num_splits(1, 1, 10**7, 132) == decode.MAX_SPLITS
    assert decode.choose_num_splits(4, 8, 100, 132) == 1


@pytest.mark.parametrize(
    "window, num_splits", [(1, 1), (15, 1), (16, 1), (17, 1), (100, 1), (1000, 1), (1, 3), (17, 3), (100, 3)]
)
def test_sliding_window(gen, window, num_splits):
    # Windows inside one tile, on and past page (16) edges, longer than every sequence; with splits, some splits
    # fall wholly before the window and must come out empty.
    run_case(gen, [1, 16, 17, 150, 300], 4, 1, 64, 16, torch.float32, window=window, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_in_16_bit(gen, dtype):
    run_case(gen, [90, 260], 4, 2, 128, 8, dtype, window=70)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_softcap(gen, dtype, num_splits):
    run_case(gen, [33, 300], 4, 2, 64, 16, dtype, softcap=3.0, sm_scale=0.5, num_splits=num_splits)


def test_custom_and_default_scale(gen):
    run_case(gen, [50, 80], 2, 2, 96, 16, torch.float32, sm_scale=0.05)
    kv = random_paged_kv(gen, [40], 2, 128, 16, torch.float32)
    q = randn(1, 4, 128, dtype=torch.float32, generator=gen)
    assert torch.equal(
        paged_decode_attention(q, *kv.args), paged_decode_attention(q, *kv.args, sm_scale=1 / math.sqrt(128))
    )


@pytest.mark.parametrize("block_n", [16, 32, 128])
@pytest.mark.parametrize("window", [None, 50])
def test_every_tile_size_of_the_gpu_configs(gen, monkeypatch, block_n, window):
    # Split ranges and the window's first tile are counted in tiles: check them for the other tile sizes too.
    monkeypatch.setattr(decode, "default_config", lambda *a: {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 1})
    run_case(gen, [1, 40, 300], 4, 2, 64, 16, torch.float32, window=window, num_splits=3)


@pytest.mark.parametrize("block_n, page_size", [(16, 64), (32, 256), (128, 8), (32, 1)])
@pytest.mark.parametrize("window", [None, 37])
def test_tiles_smaller_and_larger_than_pages(gen, monkeypatch, block_n, page_size, window):
    # A tile inside one page (one page id, tiles starting mid-page) or spanning several (a vector of page ids,
    # the last pages past the sequence end unread); the window's edge and the context's end cut tiles and pages.
    monkeypatch.setattr(decode, "default_config", lambda *a: {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 1})
    lens = [1, page_size + 3, 3 * block_n + 5, 200]
    run_case(gen, lens, 4, 2, 64, page_size, torch.float32, window=window, num_splits=3)


def test_long_context_many_splits(gen):
    run_case(gen, [4000, 77], 4, 1, 64, 16, torch.float32, num_splits=32)


def test_return_lse_false_returns_the_output_only(gen):
    kv = random_paged_kv(gen, [20, 9], 2, 64, 8, torch.float16)
    q = randn(2, 4, 64, dtype=torch.float16, generator=gen)
    out = paged_decode_attention(q, *kv.args, num_splits=2)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, paged_decode_attention(q, *kv.args, num_splits=2, return_lse=True)[0])


def test_empty_batch():
    kv = random_paged_kv(torch.Generator().manual_seed(0), [], 2, 64, 16, torch.float32)
    q = torch.empty(0, 4, 64, device=DEVICE)
    out, lse = paged_decode_attention(q, *kv.args, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_strided_views_are_read_correctly(gen):
    # q a view of a packed qkv projection; the caches views of one (num_pages, 2, page_size, H, D) pool; the block
    # table a column slice of a wider table; seq_lens a strided view.
    lens, hq, hkv, d, ps = [40, 100], 4, 2, 64, 16
    kv = random_paged_kv(gen, lens, hkv, d, ps, torch.float32)
    pool = torch.stack([kv.k_cache, kv.v_cache], dim=1)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    assert not k_cache.is_contiguous()
    wide = torch.full((2, kv.block_table.shape[1] + 5), UNUSED_PAGE, dtype=torch.int32, device=DEVICE)
    wide[:, 2 : 2 + kv.block_table.shape[1]] = kv.block_table
    table = wide[:, 2:]
    lens_t = torch.tensor([lens[0], -1, lens[1], -1], dtype=torch.int32, device=DEVICE)[::2]
    qkv = randn(2, hq + 2 * hkv, d, dtype=torch.float32, generator=gen)
    q = qkv[:, :hq]
    ref, _ = paged_decode_attention_ref(q, *kv.args)
    for num_splits in (1, 3):
        out = paged_decode_attention(q, k_cache, v_cache, table, lens_t, num_splits=num_splits)
        assert rel_err(out, ref) < TOL[torch.float32]


# --- fp8 KV ------------------------------------------------------------------------------------------------------


def fp8_case(gen, q_dtype, scale_as_tensor, lens=(1, 64, 300), hq=8, hkv=2, d=128, ps=16, **kw):
    """Dense random K/V written into fp8 caches by write_kv_cache, then decoded."""
    total = sum(lens)
    k = randn(total, hkv, d, dtype=torch.float32, generator=gen) * 2
    v = randn(total, hkv, d, dtype=torch.float32, generator=gen)
    num_pages = sum(-(-n // ps) for n in lens) + 2
    k_cache = random_fp8(gen, num_pages, ps, hkv, d)
    v_cache = random_fp8(gen, num_pages, ps, hkv, d)
    table = shuffled_block_table(list(lens), ps, num_pages, gen)
    k_scale, v_scale = k.abs().max().item() / 448, v.abs().max().item() / 448
    if scale_as_tensor:
        k_scale = torch.tensor([k_scale], dtype=torch.float32, device=DEVICE)
        v_scale = torch.tensor([v_scale], dtype=torch.float32, device=DEVICE)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping(table, list(lens), ps), k_scale=k_scale, v_scale=v_scale)
    q = randn(len(lens), hq, d, dtype=q_dtype, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, lse = paged_decode_attention(
        q, k_cache, v_cache, table, seq_lens, k_scale=k_scale, v_scale=v_scale, return_lse=True, **kw
    )
    kw.pop("num_splits", None)
    stored, stored_lse = paged_decode_attention_ref(
        q, k_cache, v_cache, table, seq_lens, k_scale=k_scale, v_scale=v_scale, **kw
    )
    return (q, k, v, lens), (out, lse), (stored, stored_lse)


@pytest.mark.parametrize("scale_as_tensor", [False, True])
@pytest.mark.parametrize("q_dtype", DTYPES)
def test_fp8_cache_written_by_write_kv_cache(gen, q_dtype, scale_as_tensor):
    (q, k, v, lens), (out, lse), (stored, stored_lse) = fp8_case(gen, q_dtype, scale_as_tensor, num_splits=2)
    assert out.dtype == q_dtype
    # Against the reference on the values the cache holds: only the kernel's own arithmetic differs.
    assert rel_err(out, stored) < TOL[q_dtype], rel_err(out, stored)
    assert rel_err(lse, stored_lse) < TOL[q_dtype], rel_err(lse, stored_lse)
    # Against attention over the original (unquantized) K/V: the fp8 rounding of K and V dominates.
    start = 0
    dense = []
    for b, n in enumerate(lens):
        o, _ = attention_ref(q[b : b + 1].cpu(), k[start : start + n].cpu(), v[start : start + n].cpu())
        dense.append(o[0])
        start += n
    assert rel_err(out, torch.stack(dense)) < FP8_END_TO_END_TOL, rel_err(out, torch.stack(dense))


def test_fp8_with_window_softcap_and_splits(gen):
    _, (out, lse), (stored, stored_lse) = fp8_case(
        gen, torch.bfloat16, True, window=100, softcap=4.0, num_splits=3, d=64
    )
    assert rel_err(out, stored) < 1e-2 and rel_err(lse, stored_lse) < 1e-2


# --- no host sync on the explicit-split path ---------------------------------------------------------------------


def test_explicit_splits_make_no_host_sync(gen, monkeypatch):
    # As on CUDA without debug: values are not checkable, so with num_splits given the launcher must not read
    # any tensor value on the host. Every way of doing so raises here; the kernels are replaced by recorders.
    kv = random_paged_kv(gen, [30, 90], 2, 64, 16, torch.float32)
    q = randn(2, 4, 64, dtype=torch.float32, generator=gen)
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, grid))

    monkeypatch.setattr(decode, "_decode_kernel", Recorder("decode"))
    monkeypatch.setattr(decode, "_autotuned", Recorder("decode"))
    monkeypatch.setattr(kernels.merge, "merge_splits_kernel", Recorder("merge"))
    monkeypatch.setattr(kernels._runtime, "values_checkable", lambda t: False)

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    scale = torch.ones(1)
    paged_decode_attention(q, *kv.args, num_splits=4, return_lse=True)
    paged_decode_attention(
        q,
        kv.k_cache.to(torch.float8_e4m3fn),
        kv.v_cache.to(torch.float8_e4m3fn),
        kv.block_table,
        kv.seq_lens,
        k_scale=scale,
        v_scale=scale,
        num_splits=1,
    )
    assert launched == [("decode", (2, 2, 4)), ("merge", (2, 4)), ("decode", (2, 2, 1))]


# --- bad input: a clear error naming the argument, before any launch --------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    trap_launches(monkeypatch, decode, "_decode_kernel", "_autotuned")
    trap_launches(monkeypatch, kernels.merge, "merge_splits_kernel")


def _valid(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    kv = random_paged_kv(gen, [5, 40], 2, 64, 16, dtype)
    q = randn(2, 4, 64, dtype=dtype, generator=gen)
    return [q, *kv.args]


def _fp8(args):
    return [args[0], args[1].to(torch.float8_e4m3fn), args[2].to(torch.float8_e4m3fn), *args[3:]]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: replace_arg(a, 0, a[0][0]), ValueError, "q must have 3 dimensions"),
        (lambda a: replace_arg(a, 0, a[0].half()), TypeError, "q has dtype"),
        (lambda a: replace_arg(a, 0, a[0].int()), TypeError, "q must have dtype"),
        (lambda a: replace_arg(a, 0, a[0][..., :32]), ValueError, "q has head_dim 32 but the cache has 64"),
        (lambda a: replace_arg(a, 0, a[0][:, :3]), ValueError, "multiple of num_kv_heads"),
        (lambda a: replace_arg(a, 0, a[0][:1]), ValueError, "block_table must have one row per sequence"),
        (lambda a: replace_arg(a, 1, a[1][:, :, :1]), ValueError, "v_cache must have k_cache's shape"),
        (lambda a: replace_arg(a, 2, a[2].half()), TypeError, "v_cache has dtype"),
        (lambda a: [a[0][..., :40], a[1][..., :40], a[2][..., :40], *a[3:]], ValueError, "supported head dims"),
        (lambda a: replace_arg(replace_arg(a, 1, a[1][:, :12]), 2, a[2][:, :12]), ValueError, "page_size 12"),
        (lambda a: replace_arg(a, 1, a[1][0]), ValueError, "k_cache must have 4 dimensions"),
        (lambda a: replace_arg(a, 3, a[3].long()), TypeError, "block_table must have dtype"),
        (lambda a: replace_arg(a, 3, a[3][:, :2]), ValueError, "block_table is too narrow"),
        (lambda a: replace_arg(a, 3, a[3][:, :0]), ValueError, "block_table is too narrow"),
        (lambda a: replace_arg(a, 3, a[3][0]), ValueError, "block_table must have 2 dimensions"),
        (lambda a: replace_arg(a, 4, a[4].long()), TypeError, "seq_lens must have dtype"),
        (lambda a: replace_arg(a, 4, a[4][:1]), ValueError, "seq_lens must have one length per sequence"),
        (lambda a: replace_arg(a, 4, a[4] - 6), ValueError, r"seq_lens\[0\] = -1"),
        (
            lambda a: replace_arg(
                replace_arg(a, 3, torch.cat([a[3]] * 9, 1)), 4, a[4] * 0 + torch.tensor([5, 144]).to(a[4])
            ),
            ValueError,
            "longer than the cache's 7 pages",
        ),
        (
            lambda a: replace_arg(a, 3, torch.where(a[3] == a[3][1, 1], -1, a[3])),
            ValueError,
            r"block_table\[1, 1\] = -1",
        ),
        (
            lambda a: replace_arg(a, 3, torch.where(a[3] == a[3][0, 0], 99, a[3])),
            ValueError,
            r"block_table\[0, 0\] = 99",
        ),
    ],
)
def test_bad_input_is_rejected_before_launch(no_launch, mutate, error, match):
    args = mutate(_valid())
    with pytest.raises(error, match=match):
        paged_decode_attention(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window"),
        ({"sm_scale": -1.0}, "sm_scale"),
        ({"softcap": 0.0}, "softcap"),
        ({"num_splits": 0}, "num_splits"),
        ({"num_splits": 257}, "num_splits"),
        ({"num_splits": 2.0}, "num_splits"),
        ({"k_scale": 1.0}, "k_scale applies only to float8_e4m3fn caches"),
        ({"sinks": torch.zeros(3)}, "sinks must hold one float32 logit per query head"),
    ],
)
def test_bad_options_are_rejected_before_launch(no_launch, kwargs, match):
    if isinstance(kwargs.get("sinks"), torch.Tensor):
        kwargs["sinks"] = kwargs["sinks"].to(DEVICE)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(*_valid(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "k_scale is required"),
        ({"k_scale": 1.0}, ValueError, "v_scale is required"),
        ({"k_scale": 0.0, "v_scale": 1.0}, ValueError, "k_scale must be positive"),
        ({"k_scale": torch.ones(2), "v_scale": 1.0}, ValueError, "exactly one value"),
        ({"k_scale": torch.ones(1, dtype=torch.float64), "v_scale": 1.0}, TypeError, "k_scale must have dtype"),
        ({"k_scale": 1.0, "v_scale": torch.tensor([-1.0])}, ValueError, "v_scale must be positive"),
        ({"k_scale": "1", "v_scale": 1.0}, TypeError, "k_scale must be a float"),
    ],
)
def test_fp8_scales_are_checked(no_launch, kwargs, error, match):
    args = _fp8(_valid())
    for key in ("k_scale", "v_scale"):
        if isinstance(kwargs.get(key), torch.Tensor):
            kwargs[key] = kwargs[key].to(DEVICE)
    with pytest.raises(error, match=match):
        paged_decode_attention(*args, **kwargs)


def test_unused_block_table_entries_are_not_checked(gen):
    # Entries past each sequence's last page hold UNUSED_PAGE (no such page); only the used ones must be valid.
    run_case(gen, [5, 40], 4, 2, 64, 16, torch.float32, num_splits=2)


@pytest.mark.skipif(not ON_CUDA, reason="on CPU tensors the values are always checked")
def test_debug_mode_checks_page_ids_on_cuda(no_launch):
    args = _valid()
    args[3] = torch.where(args[3] == args[3][0, 0], 99, args[3])
    kernels.set_debug(True)
    try:
        with pytest.raises(ValueError, match="is not a page of the cache"):
            paged_decode_attention(*args, num_splits=1)
    finally:
        kernels.set_debug(False)


def test_wrong_device_is_rejected(no_launch):
    args = _valid()
    args[0] = args[0].to("meta")
    with pytest.raises(ValueError, match="q is on meta"):
        paged_decode_attention(*args)
