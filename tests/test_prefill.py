"""prefill_attention against the float64 reference: varlen, causal (bottom-right), GQA, window, softcap."""

from __future__ import annotations

import contextvars
import math

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.prefill as prefill
from kernels import prefill_attention
from kernels.reference import prefill_attention_ref
from tests.util import DEVICE, ON_CUDA, TOL, cu_seqlens, randn, rel_err, trap_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_case(gen, lens_q, lens_k, hq, hkv, d, dtype, **kw):
    q = randn(sum(lens_q), hq, d, dtype=dtype, generator=gen)
    k = randn(sum(lens_k), hkv, d, dtype=dtype, generator=gen)
    v = randn(sum(lens_k), hkv, d, dtype=dtype, generator=gen)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse = prefill_attention(q, k, v, cq, ck, return_lse=True, **kw)
    ref, ref_lse = prefill_attention_ref(q, k, v, cq, ck, **kw)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert rel_err(lse, ref_lse) < tol, rel_err(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
def test_head_dims_and_dtypes(gen, dtype, head_dim):
    run_case(gen, [37, 0, 100], [37, 0, 100], 4, 2, head_dim, dtype, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_lengths_at_and_around_block_edges(gen, dtype, causal):
    lens = [1, 63, 64, 65, 128, 129, 0, 2]
    run_case(gen, lens, lens, 2, 1, 64, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_queries_than_keys_is_bottom_right_causal(gen, dtype):
    # A chunked-prefill / prefix-cache shape: the queries are the last Lq of Lk positions.
    run_case(gen, [1, 17, 64, 70], [50, 17, 200, 300], 4, 4, 64, dtype, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_queries_than_keys_gives_empty_rows(gen, dtype):
    out, lse = run_case(gen, [20, 90], [5, 10], 2, 2, 64, dtype, causal=True)
    # Query i of a sequence sees keys j <= i + Lk - Lq: the first Lq - Lk rows see nothing.
    assert torch.all(out[:15].float() == 0) and torch.all(torch.isneginf(lse[:15]))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa_ratios(gen, group, dtype):
    run_case(gen, [33, 80], [33, 80], 2 * group, 2, 64, dtype, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mqa(gen, dtype):
    run_case(gen, [70, 9], [70, 9], 8, 1, 128, dtype, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 16, 63, 64, 100, 1000])
def test_sliding_window(gen, dtype, window):
    run_case(gen, [150, 1, 64], [150, 1, 64], 2, 1, 64, dtype, causal=True, window=window)


@pytest.mark.parametrize("head_dim", [d for d in prefill.HEAD_DIMS if d not in (32, 64, 96, 128, 192, 256)])
def test_every_multiple_of_16_head_dim(gen, head_dim):
    run_case(gen, [37, 70], [37, 70], 2, 1, head_dim, torch.float32, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_sinks(gen, dtype, window):
    sinks = randn(4, dtype=torch.float32, generator=gen) * 3
    # Includes rows that see no key (Lq > Lk): out 0, lse = the sink.
    out, lse = run_case(gen, [70, 30, 9], [70, 130, 4], 4, 2, 64, dtype, window=window, sinks=sinks)
    assert torch.all(out[100:105].float() == 0)
    assert torch.allclose(lse[100:105], sinks.expand(5, 4), rtol=1e-6, atol=1e-6)


def test_sliding_window_with_fewer_queries_than_keys(gen):
    run_case(gen, [40, 3], [230, 100], 2, 1, 64, torch.float32, causal=True, window=70)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_softcap(gen, dtype, causal):
    run_case(gen, [90, 30], [90, 30], 2, 2, 64, dtype, causal=causal, softcap=3.0, sm_scale=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_causal_cross_lengths(gen, dtype):
    run_case(gen, [10, 100, 0], [130, 7, 5], 4, 2, 96, dtype, causal=False)


def test_custom_scale(gen):
    run_case(gen, [70], [70], 2, 2, 32, torch.float32, sm_scale=0.05)


def test_strided_inputs_are_read_correctly(gen):
    # q, k, v as views into one packed qkv projection (non-contiguous head stride), and a transposed copy whose
    # head_dim stride is not 1: both must give the same answer as contiguous inputs.
    total, hq, hkv, d = 75, 4, 2, 64
    qkv = randn(total, hq + 2 * hkv, d, dtype=torch.float32, generator=gen)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    cu = cu_seqlens([30, 45])
    ref, _ = prefill_attention_ref(q, k, v, cu, cu)
    assert rel_err(prefill_attention(q, k, v, cu, cu), ref) < 1e-5
    q_t = q.transpose(0, 2).contiguous().transpose(0, 2)  # strides (1, total, total*hq)
    assert q_t.stride(-1) != 1
    assert rel_err(prefill_attention(q_t, k, v, cu, cu), ref) < 1e-5


def test_lse_merges_two_key_halves(gen):
    # The LSE is natural-log: attention over [keys A ∪ keys B] = merge of the two partial attentions.
    q = randn(1, 2, 64, dtype=torch.float32, generator=gen)
    k = randn(100, 2, 64, dtype=torch.float32, generator=gen)
    v = randn(100, 2, 64, dtype=torch.float32, generator=gen)
    one = cu_seqlens([1])
    full = prefill_attention(q, k, v, one, cu_seqlens([100]), causal=False)
    oa, la = prefill_attention(q, k[:60], v[:60], one, cu_seqlens([60]), causal=False, return_lse=True)
    ob, lb = prefill_attention(q, k[60:], v[60:], one, cu_seqlens([40]), causal=False, return_lse=True)
    lse = torch.logaddexp(la, lb)
    merged = oa * torch.exp(la - lse)[..., None] + ob * torch.exp(lb - lse)[..., None]
    assert rel_err(merged, full) < 1e-5


def test_max_seqlen_hints(gen):
    lens = [10, 90]
    q = randn(100, 2, 64, dtype=torch.float32, generator=gen)
    cu = cu_seqlens(lens)
    ref = prefill_attention(q, q, q, cu, cu)
    hinted = prefill_attention(q, q, q, cu, cu, max_seqlen_q=90, max_seqlen_k=90)
    assert torch.equal(ref, hinted)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        prefill_attention(q, q, q, cu, cu, max_seqlen_q=50, max_seqlen_k=90)


def test_empty_batch_and_zero_tokens():
    q = torch.empty(0, 2, 64, device=DEVICE)
    cu = cu_seqlens([0, 0])
    out, lse = prefill_attention(q, q, q, cu, cu, return_lse=True)
    assert out.shape == (0, 2, 64) and lse.shape == (0, 2)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.tuples(st.integers(0, 140), st.integers(0, 60)), min_size=1, max_size=4),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([32, 64, 96]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 90)),
)
def test_random_shapes_property(gen, lens, group, head_dim, causal, window):
    # Key lengths are query lengths plus a random prefix, as in chunked prefill over a cached prefix.
    lens_q = [lq for lq, _ in lens]
    lens_k = [lq + extra for lq, extra in lens]
    run_case(
        gen,
        lens_q,
        lens_k,
        2 * group,
        2,
        head_dim,
        torch.float32,
        causal=causal or window is not None,
        window=window,
    )


# --- bad input: a clear error naming the argument, before any launch --------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    trap_launches(monkeypatch, prefill, "_prefill_kernel", "_autotuned")


def _valid(dtype=torch.float32):
    q = torch.randn(10, 4, 64, device=DEVICE).to(dtype)
    k = torch.randn(10, 2, 64, device=DEVICE).to(dtype)
    return q, k, k.clone(), cu_seqlens([4, 6]), cu_seqlens([4, 6])


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "q must have 3 dimensions"),
        (lambda a: (a[0], a[1][..., :32], a[2][..., :32], *a[3:]), ValueError, "head_dim mismatch"),
        (lambda a: (a[0][:, :3], *a[1:]), ValueError, "multiple of num_kv_heads"),
        (lambda a: (a[0].half(), *a[1:]), TypeError, "dtype"),
        (lambda a: (*a[:3], a[3].long(), a[4]), TypeError, "cu_seqlens_q must have dtype"),
        (
            lambda a: (
                *a[:3],
                cu_seqlens([6, 4]) * 0 + torch.tensor([0, 7, 6], dtype=torch.int32, device=DEVICE),
                a[4],
            ),
            ValueError,
            "non-decreasing",
        ),
        (lambda a: (*a[:3], cu_seqlens([4, 6, 0]), a[4]), ValueError, "batch \\+ 1"),
        (lambda a: (*a[:3], cu_seqlens([4, 5]), a[4]), ValueError, "must end at the token count 10"),
        (lambda a: (*a[:3], cu_seqlens([4, 6]) + 1, a[4]), ValueError, "must start at 0"),
        (
            lambda a: (a[0][..., :40], a[1][..., :40], a[2][..., :40], *a[3:]),
            ValueError,
            "supported head dims",
        ),
        (lambda a: (a[0].int(), *a[1:]), TypeError, "q must have dtype"),
    ],
)
def test_bad_input_is_rejected_before_launch(no_launch, mutate, error, match):
    args = mutate(_valid())
    with pytest.raises(error, match=match):
        prefill_attention(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window"),
        ({"window": 5, "causal": False}, "window requires causal"),
        ({"sm_scale": -1.0}, "sm_scale"),
        ({"softcap": 0.0}, "softcap"),
        ({"max_seqlen_q": -1}, "max_seqlen_q"),
    ],
)
def test_bad_options_are_rejected_before_launch(no_launch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefill_attention(*_valid(), **kwargs)


def test_wrong_device_is_rejected(no_launch):
    q, k, v, cq, ck = _valid()
    other = "meta"
    with pytest.raises(ValueError, match="q is on meta"):
        prefill_attention(q.to(other), k, v, cq, ck)


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    q = randn(20, 2, 128, dtype=torch.float32, generator=gen)
    cu = cu_seqlens([20])
    a = prefill_attention(q, q, q, cu, cu)
    b = prefill_attention(q, q, q, cu, cu, sm_scale=1 / math.sqrt(128))
    assert torch.equal(a, b)


@pytest.mark.skipif(not ON_CUDA, reason="the interpreter runs one config; every tuned config is checked on the GPU")
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("config", prefill.TUNING_SPACE)
def test_every_tuning_config_is_correct(gen, head_dim, config):
    block_m, block_n, warps, stages = config
    if not prefill._fits(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_stages=stages), head_dim, 2):
        pytest.skip("config does not fit this head_dim (pruned by the autotuner too)")
    with prefill.use_config(block_m, block_n, warps, stages):
        run_case(gen, [1, 130, 257, 0], [1, 200, 257, 0], 8, 2, head_dim, torch.bfloat16, causal=True)
        run_case(gen, [77], [77], 4, 4, head_dim, torch.float16, causal=True, window=40, softcap=10.0)


# --- the tensor-descriptor (TMA) path: the same checks through tl.make_tensor_descriptor -------------------------


@pytest.fixture
def descriptors(monkeypatch):
    """Prefill forced onto the tensor-descriptor path; yields the USE_DESC value of every launch (strides TMA
    cannot describe still take the pointer path)."""
    taken = []
    original = prefill.issue

    def spy(kernel, *args):
        taken.append(args[-1]["USE_DESC"])
        return original(kernel, *args)

    monkeypatch.setattr(prefill, "issue", spy)
    with prefill.use_tensor_descriptors(True):
        yield taken


DESC_CASES = {  # (lens_q, lens_k, hq, hkv, head_dim, dtype, options)
    "d96 padded, empty sequence": ([37, 0, 100], [37, 0, 100], 2, 1, 96, torch.bfloat16, {}),
    "block edges": ([1, 63, 64, 65, 128, 129, 0, 2], [1, 63, 64, 65, 128, 129, 0, 2], 2, 1, 64, torch.float16, {}),
    "fewer queries than keys, GQA 4": ([1, 17, 70], [50, 17, 150], 4, 1, 128, torch.bfloat16, {}),
    "window and sinks": ([70, 30, 9], [70, 130, 4], 4, 2, 64, torch.float32, {"window": 20, "sinks": True}),
    "softcap, not causal": ([90, 30], [40, 130], 2, 2, 64, torch.float16, {"causal": False, "softcap": 3.0}),
}


@pytest.mark.parametrize("case", DESC_CASES.values(), ids=DESC_CASES.keys())
def test_tensor_descriptor_path(gen, descriptors, case):
    lens_q, lens_k, hq, hkv, d, dtype, kw = case
    if kw.get("sinks"):
        kw = {**kw, "sinks": randn(hq, dtype=torch.float32, generator=gen) * 3}
    run_case(gen, lens_q, lens_k, hq, hkv, d, dtype, **kw)
    assert descriptors == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_descriptor_path_reads_nothing_past_a_sequence(gen, descriptors, dtype):
    # The descriptors cover one sequence each: the masked tail tile of sequence 0 (70 keys, tiles of 64) reaches
    # into sequence 1, whose first value row is Inf, and a later query row there sees a key that is Inf; rows that
    # cannot see a poisoned key must match the reference, the rows that do see one must be non-finite.
    lens = [70, 50]
    q = randn(120, 2, 64, dtype=dtype, generator=gen)
    k = randn(120, 2, 64, dtype=dtype, generator=gen)
    v = randn(120, 2, 64, dtype=dtype, generator=gen)
    cu = cu_seqlens(lens)
    ref, _ = prefill_attention_ref(q, k, v, cu, cu)
    v[70, 1, 3] = float("inf")  # sequence 1's key 0: seen by all of sequence 1, never by sequence 0
    out = prefill_attention(q, k, v, cu, cu)
    assert descriptors == [True]
    assert rel_err(out[:70], ref[:70]) < TOL[dtype]
    assert not torch.isfinite(out[70:, 1]).all(dim=-1).any() and rel_err(out[70:, 0], ref[70:, 0]) < TOL[dtype]


@pytest.mark.parametrize("desc", [True, False])
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_finite_value_at_a_causally_hidden_key_in_16_bit(gen, dtype, poison, desc):
    # The masked tiles test V for Inf/NaN (on the descriptor path from head_dim 128 on by its bits, per 16-bit
    # format: kernels._jit.all_finite): key 70 of a 100-token sequence is hidden from queries 0..69, which must
    # match the reference; the queries from 70 on see it (head 1 only) and must be non-finite.
    q = randn(100, 2, 128, dtype=dtype, generator=gen)
    k = randn(100, 2, 128, dtype=dtype, generator=gen)
    v = randn(100, 2, 128, dtype=dtype, generator=gen)
    cu = cu_seqlens([100])
    ref, _ = prefill_attention_ref(q, k, v, cu, cu)
    v[70, 1, 3] = poison
    with prefill.use_tensor_descriptors(desc):
        out = prefill_attention(q, k, v, cu, cu)
    assert rel_err(out[:70], ref[:70]) < TOL[dtype] and rel_err(out[70:, 0], ref[70:, 0]) < TOL[dtype]
    assert not torch.isfinite(out[70:, 1]).all(dim=-1).any()


def test_strides_tma_cannot_describe_take_the_pointer_path(gen, descriptors):
    total, hq, hkv, d = 75, 4, 2, 64
    qkv = randn(total, hq + 2 * hkv, d, dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]  # packed projection: describable
    cu = cu_seqlens([30, 45])
    ref, _ = prefill_attention_ref(q, k, v, cu, cu)
    q_t = q.transpose(0, 2).contiguous().transpose(0, 2)  # head_dim stride != 1: not describable
    assert prefill.tma_describable(q, k, v) and not prefill.tma_describable(q_t)
    assert rel_err(prefill_attention(q, k, v, cu, cu), ref) < TOL[torch.bfloat16]
    assert rel_err(prefill_attention(q_t, k, v, cu, cu), ref) < TOL[torch.bfloat16]
    assert descriptors == [True, False]


@pytest.mark.parametrize("fresh_null", [True, False], ids=["null-per-context", "shared-null"])
def test_descriptor_scratch_allocator_is_set_unless_the_caller_has_one(monkeypatch, fresh_null):
    """Device-side tensor descriptors need Triton's global-scratch allocator: the launcher sets one when none is
    set (whether the default is a NullAllocator instance of its own, as before triton 3.9, or the shared one), and
    never replaces an allocator the caller set."""
    from triton.runtime import _allocation

    calls = []
    monkeypatch.setattr(triton, "set_allocator", calls.append)
    null = _allocation.NullAllocator() if fresh_null else getattr(_allocation, "_NULL_ALLOCATOR", None)

    def ensure_with(current):
        monkeypatch.setattr(_allocation, "_allocator", contextvars.ContextVar("_allocator", default=current))
        prefill._ensure_allocator()

    contextvars.copy_context().run(ensure_with, null or _allocation.NullAllocator())
    assert calls == [prefill._scratch]
    contextvars.copy_context().run(ensure_with, lambda size, alignment, stream: None)
    assert calls == [prefill._scratch]
