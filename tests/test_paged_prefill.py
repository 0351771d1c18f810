"""paged_prefill_attention against the float64 reference over gathered pages (page sizes, GQA/MQA, head dims,
window, softcap, sinks, fp8, query runs of 0 / 1 / <= 16 / long, splits), its parity with the other kernels
(chunked prefill == whole prefill, Lq = 1 == decode, Lq = seq_len == prefill), and bad input."""

from __future__ import annotations

import pytest
import torch

import kernels
import kernels.decode as decode
import kernels.merge as merge
import kernels.paged_prefill as pp
from kernels import paged_decode_attention, paged_prefill_attention, prefill_attention, write_kv_cache
from kernels.reference import attention_ref, gather_pages, paged_prefill_attention_ref
from tests.paged import UNUSED_PAGE, random_fp8, random_paged_kv, shuffled_block_table, slot_mapping
from tests.util import DEVICE, TOL, cu_seqlens, randn, rel_err, replace_arg, trap_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_case(gen, seq_lens, q_lens, hq, hkv, d, page_size, dtype, **kw):
    """Random caches for ``seq_lens`` (every page random, shuffled tables whose unused entries point nowhere),
    ``q_lens[b]`` new queries per sequence; checks out and LSE against the reference. One split unless asked
    (the split merge costs a program per query row and head in the interpreter; automatic splits have a test)."""
    kw.setdefault("num_splits", 1)
    kv = random_paged_kv(gen, seq_lens, hkv, d, page_size, dtype)
    q = randn(sum(q_lens), hq, d, dtype=dtype, generator=gen)
    cu = cu_seqlens(q_lens)
    args = (q, kv.k_cache, kv.v_cache, kv.block_table, cu, kv.seq_lens)
    before = [t.clone() for t in args]
    out, lse = paged_prefill_attention(*args, return_lse=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, args, strict=True))  # inputs are read-only
    kw = {k: v for k, v in kw.items() if k not in ("num_splits", "max_seqlen_q")}
    ref, ref_lse = paged_prefill_attention_ref(*args, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    assert rel_err(lse, ref_lse) < TOL[dtype], rel_err(lse, ref_lse)
    return args, out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_head_dims_and_dtypes(gen, dtype, head_dim):
    run_case(gen, [70, 150], [9, 70], 4, 2, head_dim, 16, dtype)


@pytest.mark.parametrize("head_dim", [32, 48, 80, 112, 160, 176, 224])
def test_every_multiple_of_16_head_dim(gen, head_dim):
    run_case(gen, [40, 20], [5, 20], 2, 1, head_dim, 16, torch.float32)


@pytest.mark.parametrize("page_size", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_every_page_size_on_and_past_page_edges(gen, page_size):
    seq_lens = [page_size, page_size + 1, 2 * page_size + 1, 70]
    q_lens = [page_size, 1, min(page_size + 1, 40), 3]
    run_case(gen, seq_lens, q_lens, 2, 1, 64, page_size, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_page_sizes_in_16_bit(gen, dtype, page_size):
    run_case(gen, [300, 65], [130, 12], 4, 1, 64, page_size, dtype)


@pytest.mark.parametrize("hq, hkv", [(2, 2), (8, 2), (16, 2), (8, 1), (12, 4)])
def test_gqa_ratios_and_mqa(gen, hq, hkv):
    # Query runs of 1, <= 16 (one packed tile) and long (query tiles), on and past the 64-key tile edges.
    run_case(gen, [64, 65, 130, 129], [1, 16, 70, 65], hq, hkv, 64, 16, torch.float32)


def test_query_runs_of_0_1_short_and_long_in_one_batch(gen):
    run_case(gen, [50, 0, 70, 16, 200, 1], [0, 0, 1, 16, 130, 1], 4, 2, 64, 8, torch.float32)


@pytest.mark.parametrize("window", [1, 30, 100, 1000])
def test_sliding_window(gen, window):
    # 60 new tokens after a prefix of 140: window 30 has its lower edge inside the new chunk, 100 in the prefix.
    run_case(gen, [200, 37, 90], [60, 37, 1], 4, 1, 64, 16, torch.float32, window=window)


def test_window_in_bf16_with_splits(gen):
    run_case(gen, [300, 90], [40, 5], 4, 2, 128, 8, torch.bfloat16, window=70, num_splits=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_and_scale(gen, dtype):
    run_case(gen, [33, 200], [33, 20], 4, 2, 64, 16, dtype, softcap=3.0, sm_scale=0.5)


def test_not_causal(gen):
    run_case(gen, [100, 70, 5], [30, 70, 1], 4, 2, 64, 16, torch.float32, causal=False)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks(gen, num_splits, dtype):
    sinks = randn(4, dtype=torch.float32, generator=gen) * 3
    run_case(gen, [300, 20, 5], [4, 20, 1], 4, 2, 64, 16, dtype, sinks=sinks, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 3, 16])
def test_explicit_splits(gen, num_splits):
    # 16 splits is more than short sequences have tiles: empty splits merge away.
    run_case(gen, [1, 200, 700], [1, 7, 20], 4, 1, 64, 16, torch.float32, num_splits=num_splits)


def test_automatic_splits(gen, monkeypatch):
    chosen = []
    original = pp.choose_num_splits
    monkeypatch.setattr(pp, "choose_num_splits", lambda *a: chosen.append(original(*a)) or chosen[-1])
    run_case(gen, [1000, 3], [4, 2], 4, 1, 64, 16, torch.float32, num_splits=None)
    assert chosen == [1000 // decode.MIN_TOKENS_PER_SPLIT] and chosen[0] > 1


@pytest.mark.parametrize("block_n, block_q", [(16, 4), (32, 16), (128, 2)])
def test_other_tile_shapes(gen, monkeypatch, block_n, block_q):
    # The GPU configs' KV tiles and query tiles: key_tiles' runs, splits and the window edge in tile units.
    def config(max_seqlen_q, group, head_dim, dtype):
        return {"BLOCK_Q": block_q, "BLOCK_M": block_q * 4, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}

    monkeypatch.setattr(pp, "launch_config", config)
    run_case(gen, [150, 40], [21, 3], 8, 2, 64, 16, torch.float32, window=45, num_splits=2)


@pytest.mark.parametrize("block_n, page_size", [(16, 64), (32, 256), (128, 8)])
def test_tiles_smaller_and_larger_than_pages(gen, monkeypatch, block_n, page_size):
    # One page id per tile (tiles starting mid-page) or a vector of them per tile, with the window's edge and
    # the diagonal cutting tiles and pages.
    def config(max_seqlen_q, group, head_dim, dtype):
        return {"BLOCK_Q": 16, "BLOCK_M": 32, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}

    monkeypatch.setattr(pp, "launch_config", config)
    run_case(gen, [150, page_size + 3], [21, 3], 4, 2, 64, page_size, torch.float32, window=45, num_splits=2)


def fp8_case(gen, q_dtype, scale_as_tensor, seq_lens=(70, 300), q_lens=(9, 3), hq=8, hkv=2, d=128, ps=16, **kw):
    total = sum(seq_lens)
    k = randn(total, hkv, d, dtype=torch.float32, generator=gen) * 2
    v = randn(total, hkv, d, dtype=torch.float32, generator=gen)
    num_pages = sum(-(-n // ps) for n in seq_lens) + 2
    k_cache, v_cache = random_fp8(gen, num_pages, ps, hkv, d), random_fp8(gen, num_pages, ps, hkv, d)
    table = shuffled_block_table(list(seq_lens), ps, num_pages, gen)
    k_scale, v_scale = k.abs().max().item() / 448, v.abs().max().item() / 448
    if scale_as_tensor:
        k_scale = torch.tensor([k_scale], dtype=torch.float32, device=DEVICE)
        v_scale = torch.tensor([v_scale], dtype=torch.float32, device=DEVICE)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping(table, list(seq_lens), ps), k_scale=k_scale, v_scale=v_scale)
    q = randn(sum(q_lens), hq, d, dtype=q_dtype, generator=gen)
    args = (q, k_cache, v_cache, table, cu_seqlens(list(q_lens)), torch.tensor(seq_lens, dtype=torch.int32))
    args = (*args[:5], args[5].to(DEVICE))
    out = paged_prefill_attention(*args, k_scale=k_scale, v_scale=v_scale, **{"num_splits": 1, **kw})
    kw.pop("num_splits", None)
    ref, _ = paged_prefill_attention_ref(*args, k_scale=k_scale, v_scale=v_scale, **kw)
    return out, ref


@pytest.mark.parametrize("scale_as_tensor", [False, True])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_fp8_caches(gen, q_dtype, scale_as_tensor):
    out, ref = fp8_case(gen, q_dtype, scale_as_tensor, num_splits=2)
    assert out.dtype == q_dtype and rel_err(out, ref) < TOL[q_dtype], rel_err(out, ref)


def test_fp8_with_window_softcap_and_sinks(gen):
    sinks = randn(8, dtype=torch.float32, generator=gen)
    out, ref = fp8_case(gen, torch.float16, True, window=50, softcap=4.0, sinks=sinks, d=64)
    assert rel_err(out, ref) < 1e-2


def test_strided_views(gen):
    # q a view of a packed qkv projection; caches views of one (pages, 2, page_size, H, D) pool; block table a
    # column slice; seq_lens a strided view.
    seq_lens, q_lens = [40, 100], [7, 3]
    kv = random_paged_kv(gen, seq_lens, 2, 64, 16, torch.float32)
    pool = torch.stack([kv.k_cache, kv.v_cache], dim=1)
    wide = torch.full((2, kv.block_table.shape[1] + 3), UNUSED_PAGE, dtype=torch.int32, device=DEVICE)
    wide[:, 1 : 1 + kv.block_table.shape[1]] = kv.block_table
    lens_t = torch.tensor([seq_lens[0], -1, seq_lens[1], -1], dtype=torch.int32, device=DEVICE)[::2]
    q = randn(sum(q_lens), 8, 64, dtype=torch.float32, generator=gen)[:, :4]
    cu = cu_seqlens(q_lens)
    ref, _ = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_table, cu, kv.seq_lens)
    out = paged_prefill_attention(q, pool[:, 0], pool[:, 1], wide[:, 1:], cu, lens_t, num_splits=2)
    assert rel_err(out, ref) < TOL[torch.float32]


# --- parity with the other kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_equals_whole_prefill(gen, dtype):
    # One 90-token prompt prefilled in chunks of 40 + 1 + 49: each chunk's K/V written, then its queries attend.
    n, hq, hkv, d, ps = 90, 4, 2, 64, 16
    q = randn(n, hq, d, dtype=dtype, generator=gen)
    k = randn(n, hkv, d, dtype=dtype, generator=gen)
    v = randn(n, hkv, d, dtype=dtype, generator=gen)
    whole = prefill_attention(q, k, v, cu_seqlens([n]), cu_seqlens([n]), window=60)
    num_pages = 9
    k_cache = randn(num_pages, ps, hkv, d, dtype=dtype, generator=gen)
    v_cache = randn(num_pages, ps, hkv, d, dtype=dtype, generator=gen)
    table = shuffled_block_table([n], ps, num_pages, gen)
    slots = slot_mapping(table, [n], ps)
    chunks, start = [], 0
    for size in (40, 1, 49):
        end = start + size
        write_kv_cache(k[start:end], v[start:end], k_cache, v_cache, slots[start:end])
        seq_lens = torch.tensor([end], dtype=torch.int32, device=DEVICE)
        chunks.append(paged_prefill_attention(q[start:end], k_cache, v_cache, table, cu_seqlens([size]), seq_lens,
                                              window=60))  # fmt: skip
        start = end
    assert rel_err(torch.cat(chunks), whole.double()) < TOL[dtype]


@pytest.mark.parametrize("kw", [{}, {"window": 50, "softcap": 5.0}, {"num_splits": 3}])
def test_one_query_equals_decode(gen, kw):
    kv = random_paged_kv(gen, [1, 77, 300], 2, 128, 16, torch.float32)
    q = randn(3, 8, 128, dtype=torch.float32, generator=gen)
    kw = {**kw, "sinks": randn(8, dtype=torch.float32, generator=gen)}
    dec, dec_lse = paged_decode_attention(q, *kv.args, return_lse=True, **kw)
    out, lse = paged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_table, cu_seqlens([1, 1, 1]), kv.seq_lens,
                                       return_lse=True, **kw)  # fmt: skip
    assert rel_err(out, dec.double()) < 1e-5 and rel_err(lse, dec_lse.double()) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_all_queries_new_equals_prefill_on_gathered_kv(gen, causal):
    lens, hq, hkv, d = [50, 130, 1], 8, 2, 64
    kv = random_paged_kv(gen, lens, hkv, d, 8, torch.float16)
    q = randn(sum(lens), hq, d, dtype=torch.float16, generator=gen)
    k = torch.cat([gather_pages(kv.k_cache, kv.block_table[b], n) for b, n in enumerate(lens)]).half().to(DEVICE)
    v = torch.cat([gather_pages(kv.v_cache, kv.block_table[b], n) for b, n in enumerate(lens)]).half().to(DEVICE)
    cu = cu_seqlens(lens)
    dense = prefill_attention(q, k, v, cu, cu, causal=causal)
    out = paged_prefill_attention(q, *kv.args[:3], cu, kv.seq_lens, causal=causal, num_splits=1)
    assert rel_err(out, dense.double()) < TOL[torch.float16]


def test_sinks_agree_across_the_three_kernels(gen):
    # The last query row of each sequence is the same attention in prefill, paged prefill and decode.
    lens, q_lens, hq, hkv, d = [60, 140], [10, 140], 4, 1, 64
    kv = random_paged_kv(gen, lens, hkv, d, 16, torch.float32)
    sinks = randn(hq, dtype=torch.float32, generator=gen) * 4
    q = randn(sum(q_lens), hq, d, dtype=torch.float32, generator=gen)
    k = torch.cat([gather_pages(kv.k_cache, kv.block_table[b], n) for b, n in enumerate(lens)]).float().to(DEVICE)
    v = torch.cat([gather_pages(kv.v_cache, kv.block_table[b], n) for b, n in enumerate(lens)]).float().to(DEVICE)
    cq = cu_seqlens(q_lens)
    dense, dense_lse = prefill_attention(q, k, v, cq, cu_seqlens(lens), sinks=sinks, return_lse=True)
    paged, paged_lse = paged_prefill_attention(
        q, *kv.args[:3], cq, kv.seq_lens, sinks=sinks, return_lse=True, num_splits=1
    )
    last = cq[1:].long() - 1
    dec, dec_lse = paged_decode_attention(q[last], *kv.args, sinks=sinks, return_lse=True, num_splits=2)
    assert rel_err(paged, dense.double()) < 1e-5 and rel_err(paged_lse, dense_lse.double()) < 1e-5
    assert rel_err(dec, dense[last].double()) < 1e-5 and rel_err(dec_lse, dense_lse[last].double()) < 1e-5
    # And the sink changes the result: it is really in the denominator.
    plain = paged_prefill_attention(q, *kv.args[:3], cq, kv.seq_lens, num_splits=1)
    assert rel_err(plain, paged.double()) > 1e-3


# --- a key a query cannot see does not influence it (issue 13, item 4) --------------------------------------------


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_non_finite_values_at_hidden_keys_do_not_reach_other_rows(gen, poison):
    # Sequence of 100 tokens, the last 60 new, window 20: the key at position 70 is causally hidden from queries
    # at 40..69 and window-hidden from those at 90..99; queries at 70..89 see it and must come out non-finite.
    seq_len, lq, hq, d, ps = 100, 60, 2, 64, 16
    kv = random_paged_kv(gen, [seq_len], 1, d, ps, torch.float32)
    q = randn(lq, hq, d, dtype=torch.float32, generator=gen)
    cu = cu_seqlens([lq])
    clean, _ = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_table, cu, kv.seq_lens, window=20)
    page, offset = int(kv.block_table[0, 70 // ps]), 70 % ps
    for cache in (kv.v_cache, kv.k_cache):
        cache[page, offset, 0, 5] = poison
        out = paged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_table, cu, kv.seq_lens, window=20)
        pos = torch.arange(lq) + seq_len - lq
        blind = (pos < 70) | (pos >= 90)
        assert rel_err(out[blind], clean[blind]) < TOL[torch.float32]
        assert not torch.isfinite(out[~blind]).all(dim=-1).any()  # every row that sees it
        # The same in prefill_attention over the gathered K/V.
        k = gather_pages(kv.k_cache, kv.block_table[0], seq_len).float()
        v = gather_pages(kv.v_cache, kv.block_table[0], seq_len).float()
        dense = prefill_attention(q, k, v, cu, cu_seqlens([seq_len]), window=20)
        assert rel_err(dense[blind], clean[blind]) < TOL[torch.float32]
        assert not torch.isfinite(dense[~blind]).all(dim=-1).any()


# --- no host sync, bad input --------------------------------------------------------------------------------------


def test_max_seqlen_q_and_num_splits_given_make_no_host_sync(gen, monkeypatch):
    kv = random_paged_kv(gen, [30, 90], 2, 64, 16, torch.float32)
    q = randn(12, 4, 64, dtype=torch.float32, generator=gen)
    cu = cu_seqlens([2, 10])
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, grid))

    monkeypatch.setattr(pp, "_paged_prefill_kernel", Recorder("paged_prefill"))
    monkeypatch.setattr(merge, "merge_splits_kernel", Recorder("merge"))
    monkeypatch.setattr(kernels._runtime, "values_checkable", lambda t: False)

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    sinks = torch.zeros(4)
    paged_prefill_attention(q, *kv.args[:3], cu, kv.seq_lens, max_seqlen_q=10, num_splits=4, sinks=sinks)
    paged_prefill_attention(q, *kv.args[:3], cu, kv.seq_lens, max_seqlen_q=10, num_splits=1)
    assert launched == [("paged_prefill", (2, 2, 4)), ("merge", (12, 4)), ("paged_prefill", (2, 2, 1))]


@pytest.fixture
def no_launch(monkeypatch):
    trap_launches(monkeypatch, pp, "_paged_prefill_kernel")
    trap_launches(monkeypatch, merge, "merge_splits_kernel")


def _valid():
    gen = torch.Generator().manual_seed(1)
    kv = random_paged_kv(gen, [5, 40], 2, 64, 16, torch.float32)
    q = randn(12, 4, 64, dtype=torch.float32, generator=gen)
    return [q, kv.k_cache, kv.v_cache, kv.block_table, cu_seqlens([2, 10]), kv.seq_lens]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: replace_arg(a, 0, a[0][0]), ValueError, "q must have 3 dimensions"),
        (lambda a: replace_arg(a, 0, a[0].half()), TypeError, "q has dtype"),
        (lambda a: replace_arg(a, 0, a[0][..., :32]), ValueError, "q has head_dim 32 but the cache has 64"),
        (lambda a: replace_arg(a, 0, a[0][:, :3]), ValueError, "multiple of num_kv_heads"),
        (lambda a: replace_arg(a, 0, a[0][:11]), ValueError, "cu_seqlens_q must end at the token count 11"),
        (lambda a: replace_arg(a, 1, a[1][:, :, :1]), ValueError, "v_cache must have k_cache's shape"),
        (lambda a: replace_arg(a, 3, a[3].long()), TypeError, "block_table must have dtype"),
        (lambda a: replace_arg(a, 3, a[3][:1]), ValueError, "block_table must have one row per sequence"),
        (lambda a: replace_arg(a, 3, a[3][:, :2]), ValueError, "block_table is too narrow"),
        (lambda a: replace_arg(a, 4, a[4].long()), TypeError, "cu_seqlens_q must have dtype"),
        (lambda a: replace_arg(a, 4, a[4][:2]), ValueError, "cu_seqlens_q must have batch \\+ 1 = 3 entries"),
        (lambda a: replace_arg(a, 4, a[4].flip(0)), ValueError, "cu_seqlens_q must start at 0"),
        (lambda a: replace_arg(a, 4, cu_seqlens([6, 6])), ValueError, "sequence 0 has 6 new queries"),
        (lambda a: replace_arg(a, 5, a[5].long()), TypeError, "seq_lens must have dtype"),
        (lambda a: replace_arg(a, 5, a[5] - 6), ValueError, r"seq_lens\[0\] = -1"),
        (lambda a: replace_arg(a, 3, torch.where(a[3] == a[3][1, 1], 99, a[3])), ValueError, r"block_table\[1, 1\]"),
    ],
)
def test_bad_input_is_rejected_before_launch(no_launch, mutate, error, match):
    with pytest.raises(error, match=match):
        paged_prefill_attention(*mutate(_valid()))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sinks": torch.zeros(3)}, ValueError, "sinks must hold one float32 logit per query head"),
        ({"sinks": torch.zeros(4, dtype=torch.float64)}, TypeError, "sinks must have dtype"),
        ({"sinks": [0.0] * 4}, TypeError, "sinks must be a torch.Tensor"),
        ({"window": 4, "causal": False}, ValueError, "window requires causal"),
        ({"max_seqlen_q": 9}, ValueError, "max_seqlen_q=9 is shorter"),
        ({"max_seqlen_q": -1}, ValueError, "max_seqlen_q"),
        ({"num_splits": 0}, ValueError, "num_splits"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"k_scale": 1.0}, ValueError, "k_scale applies only"),
    ],
)
def test_bad_options_are_rejected_before_launch(no_launch, kwargs, error, match):
    if isinstance(kwargs.get("sinks"), torch.Tensor):
        kwargs["sinks"] = kwargs["sinks"].to(DEVICE)
    with pytest.raises(error, match=match):
        paged_prefill_attention(*_valid(), **kwargs)


def test_empty_batch_and_no_queries(gen):
    kv = random_paged_kv(gen, [30], 2, 64, 16, torch.float32)
    q = torch.empty(0, 4, 64, device=DEVICE)
    out, lse = paged_prefill_attention(q, *kv.args[:3], cu_seqlens([0]), kv.seq_lens, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_reference_matches_attention_ref_on_one_sequence(gen):
    # The reference's own sanity: gathered pages + bottom-right attention_ref.
    kv = random_paged_kv(gen, [45], 1, 64, 8, torch.float32)
    q = randn(5, 2, 64, dtype=torch.float32, generator=gen)
    ref, _ = paged_prefill_attention_ref(q, *kv.args[:3], cu_seqlens([5]), kv.seq_lens)
    k = gather_pages(kv.k_cache, kv.block_table[0], 45)
    v = gather_pages(kv.v_cache, kv.block_table[0], 45)
    direct, _ = attention_ref(q, k, v)
    assert torch.equal(ref, direct)
