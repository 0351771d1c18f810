"""write_kv_cache against its reference: every page size, padding slots, fp8 with saturation, strided views, and
bad input that must leave the caches untouched."""

from __future__ import annotations

import pytest
import torch

import kernels.kv_cache as kv_cache
from kernels import write_kv_cache
from kernels.reference import write_kv_cache_ref
from tests.paged import random_fp8
from tests.util import DEVICE, ON_CUDA, randn, replace_arg, trap_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_slots(gen, num_tokens, num_slots, padding_every=5, dtype=torch.int64):
    """Distinct random slots anywhere in the cache, every ``padding_every``-th token padding (-1)."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[::padding_every] = -1
    return slots.to(dtype).to(DEVICE)


def assert_written(cache, before, expected, slots):
    """``cache`` equals the reference; the slots not written still hold their old (sentinel) values."""
    page_size = cache.shape[1]
    if cache.dtype == torch.float8_e4m3fn:
        cache, before, expected = (t.view(torch.uint8) for t in (cache, before, expected))
    cache = cache.cpu()
    assert torch.equal(cache, expected.cpu())
    untouched = torch.ones(cache.shape[:2], dtype=torch.bool)
    written = slots.cpu().long()
    written = written[written >= 0]
    untouched[written // page_size, written % page_size] = False
    assert torch.equal(cache[untouched], before.cpu()[untouched])


def run_case(gen, num_tokens, num_pages, page_size, heads, d, dtype, slot_dtype=torch.int64, src_dtype=None, **scales):
    src_dtype = src_dtype or dtype
    k = randn(num_tokens, heads, d, dtype=src_dtype, generator=gen)
    v = randn(num_tokens, heads, d, dtype=src_dtype, generator=gen)
    if dtype == torch.float8_e4m3fn:
        k_cache, v_cache = (random_fp8(gen, num_pages, page_size, heads, d) for _ in range(2))
    else:
        k_cache, v_cache = (randn(num_pages, page_size, heads, d, dtype=dtype, generator=gen) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    slots = random_slots(gen, num_tokens, num_pages * page_size, dtype=slot_dtype)
    ref_k, ref_v = write_kv_cache_ref(k, v, k_cache, v_cache, slots, **scales)
    write_kv_cache(k, v, k_cache, v_cache, slots, **scales)
    assert_written(k_cache, before[0], ref_k, slots)
    assert_written(v_cache, before[1], ref_v, slots)
    return k, v, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [8, 16, 32, 64, 128, 256])
def test_every_page_size(gen, page_size, dtype):
    run_case(gen, 150, 1024 // page_size, page_size, 2, 64, dtype)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_slot_dtypes_and_head_dims(gen, slot_dtype, head_dim):
    run_case(gen, 70, 12, 16, 3, head_dim, torch.float16, slot_dtype=slot_dtype)


def test_many_tokens_in_one_call(gen):
    # A whole prefill's worth of tokens: programs handle blocks of tokens, so this stays fast interpreted.
    run_case(gen, 2048, 160, 16, 2, 128, torch.bfloat16)


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("scale_as_tensor", [False, True])
def test_fp8_cache_stores_scaled_saturated_values(gen, src_dtype, scale_as_tensor):
    k_scale, v_scale = 0.004, 0.02
    if scale_as_tensor:
        k_scale = torch.tensor([k_scale], device=DEVICE)
        v_scale = torch.tensor([v_scale], device=DEVICE)
    # randn values reach ~±4: over k_scale * 448 ≈ 1.8 they saturate to ±448.
    k, _, k_cache, _, slots = run_case(
        gen, 200, 16, 16, 2, 64, torch.float8_e4m3fn, src_dtype=src_dtype, k_scale=k_scale, v_scale=v_scale
    )
    keep = slots.cpu() >= 0
    s = slots.cpu()[keep]
    stored = k_cache.cpu()[s // 16, s % 16].float()
    x = k.cpu()[keep].float() / float(k_scale)
    big = x.abs() > 448
    assert big.any() and torch.equal(stored[big], 448 * x[big].sign())
    # e4m3 rounding: relative error at most 2**-4 for normal values (|x| >= 2**-6), absolute 2**-10 below.
    small = ~big
    err = (stored[small] - x[small]).abs()
    assert bool((err <= torch.maximum(x[small].abs() * 2**-4, torch.full_like(err, 2**-10))).all())


def test_strided_sources_and_cache_views(gen):
    # k/v views of a packed qkv projection; caches views into one (num_pages, 2, page_size, H, D) pool.
    tokens, hq, hkv, d, pages, ps = 90, 4, 2, 64, 10, 16
    qkv = randn(tokens, hq + 2 * hkv, d, dtype=torch.float32, generator=gen)
    k, v = qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    pool = randn(pages, 2, ps, hkv, d, dtype=torch.float32, generator=gen)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    before = pool.clone()
    slots = random_slots(gen, tokens, pages * ps)
    ref_k, ref_v = write_kv_cache_ref(k, v, k_cache, v_cache, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert_written(k_cache, before[:, 0], ref_k, slots)
    assert_written(v_cache, before[:, 1], ref_v, slots)


def test_zero_tokens_and_all_padding_change_nothing(gen):
    k_cache = randn(4, 8, 1, 64, dtype=torch.float32, generator=gen)
    v_cache = randn(4, 8, 1, 64, dtype=torch.float32, generator=gen)
    before = k_cache.clone(), v_cache.clone()
    empty = torch.empty(0, 1, 64, device=DEVICE)
    write_kv_cache(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int32, device=DEVICE))
    x = randn(5, 1, 64, dtype=torch.float32, generator=gen)
    padding = torch.tensor([-1, -2, -8, -(2**40), -1], dtype=torch.int64, device=DEVICE)  # any negative skips
    write_kv_cache(x, x, k_cache, v_cache, padding)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# --- bad input: rejected before any launch, caches unchanged ----------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    trap_launches(monkeypatch, kv_cache, "_write_kernel")


def _valid(cache_dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    src = torch.float32 if cache_dtype == torch.float8_e4m3fn else cache_dtype
    k = randn(6, 2, 64, dtype=src, generator=gen)
    if cache_dtype == torch.float8_e4m3fn:
        k_cache, v_cache = random_fp8(gen, 4, 8, 2, 64), random_fp8(gen, 4, 8, 2, 64)
    else:
        k_cache, v_cache = (randn(4, 8, 2, 64, dtype=cache_dtype, generator=gen) for _ in range(2))
    slots = torch.tensor([0, 9, -1, 31, 5, 17], dtype=torch.int32, device=DEVICE)
    return [k, k.clone(), k_cache, v_cache, slots]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: replace_arg(a, 0, a[0][0]), ValueError, "k must have 3 dimensions"),
        (lambda a: replace_arg(a, 1, a[1][:5]), ValueError, "v must have k's shape"),
        (lambda a: replace_arg(a, 1, a[1].double()), TypeError, "v must have dtype"),
        (
            lambda a: replace_arg(replace_arg(a, 0, a[0].half()), 1, a[1].half()),
            TypeError,
            "k has dtype torch.float16 but the",
        ),
        (
            lambda a: replace_arg(replace_arg(a, 0, a[0][..., :32]), 1, a[1][..., :32]),
            ValueError,
            "head_dim 32 but the cache",
        ),
        (lambda a: replace_arg(replace_arg(a, 0, a[0][:, :1]), 1, a[1][:, :1]), ValueError, "k has 1 heads"),
        (lambda a: replace_arg(a, 3, a[3][:3]), ValueError, "v_cache must have k_cache's shape"),
        (
            lambda a: replace_arg(replace_arg(a, 2, a[2][:, :6]), 3, a[3][:, :6]),
            ValueError,
            "page_size 6",
        ),
        (lambda a: replace_arg(a, 3, a[3].half()), TypeError, "v_cache has dtype"),
        (lambda a: replace_arg(a, 3, a[3].transpose(2, 3).contiguous().transpose(2, 3)), ValueError, "same strides"),
        (lambda a: replace_arg(a, 2, a[2].int()), TypeError, "k_cache must have dtype"),
        (lambda a: replace_arg(a, 4, a[4][:5]), ValueError, "one slot per token"),
        (lambda a: replace_arg(a, 4, a[4].float()), TypeError, "slot_mapping must have dtype"),
        (lambda a: replace_arg(a, 4, a[4] + 1), ValueError, "slot 32, but the cache has 32 slots"),
    ],
)
def test_bad_input_is_rejected_and_caches_unchanged(no_launch, mutate, error, match):
    args = mutate(_valid())
    before = [t.clone() for t in args[2:4]]
    with pytest.raises(error, match=match):
        write_kv_cache(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[2:4], before, strict=True))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "k_scale is required"),
        ({"k_scale": 1.0}, ValueError, "v_scale is required"),
        ({"k_scale": float("inf"), "v_scale": 1.0}, ValueError, "k_scale must be positive and finite"),
        ({"k_scale": 1.0, "v_scale": torch.zeros(1)}, ValueError, "v_scale must be positive"),
        ({"k_scale": torch.ones(1, 1, 2), "v_scale": 1.0}, ValueError, "exactly one value"),
        ({"k_scale": True, "v_scale": 1.0}, TypeError, "k_scale must be a float"),
    ],
)
def test_fp8_scales_are_checked_and_caches_unchanged(no_launch, kwargs, error, match):
    args = _valid(torch.float8_e4m3fn)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    before = [t.view(torch.uint8).clone() for t in args[2:4]]
    with pytest.raises(error, match=match):
        write_kv_cache(*args, **kwargs)
    assert all(torch.equal(a.view(torch.uint8), b) for a, b in zip(args[2:4], before, strict=True))


def test_scale_on_a_non_fp8_cache_is_rejected(no_launch):
    with pytest.raises(ValueError, match="k_scale applies only to float8_e4m3fn caches"):
        write_kv_cache(*_valid(), k_scale=1.0, v_scale=1.0)


@pytest.mark.skipif(ON_CUDA, reason="slot values are checked on CPU tensors (on CUDA only in debug mode)")
def test_out_of_range_int64_slot_is_rejected(no_launch):
    args = _valid()
    args[4] = torch.tensor([0, -7, -1, 31, 5, 10**9], dtype=torch.int64)
    with pytest.raises(ValueError, match="slot 1000000000"):
        write_kv_cache(*args)
