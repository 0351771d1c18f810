"""merge_attention_states against its reference, including sides that saw no key (lse = -inf), and the identity
it exists for: attention over A ∪ B = merge(attention over A, attention over B)."""

from __future__ import annotations

import pytest
import torch

import kernels.merge as merge
from kernels import merge_attention_states, paged_decode_attention
from kernels.reference import merge_attention_states_ref
from tests.paged import random_paged_kv
from tests.util import DEVICE, TOL, randn, rel_err, trap_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_states(gen, tokens, heads, d, dtype):
    out_a, out_b = (randn(tokens, heads, d, dtype=dtype, generator=gen) for _ in range(2))
    lse_a, lse_b = (randn(tokens, heads, dtype=torch.float32, generator=gen) * 4 for _ in range(2))
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_matches_reference(gen, dtype, head_dim):
    states = random_states(gen, 37, 3, head_dim, dtype)
    out, lse = merge_attention_states(*states)
    ref, ref_lse = merge_attention_states_ref(*states)
    assert out.dtype == dtype and out.shape == states[0].shape and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype] and rel_err(lse, ref_lse) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sides_that_saw_no_key(gen, dtype):
    out_a, lse_a, out_b, lse_b = random_states(gen, 4, 2, 64, dtype)
    ninf = float("-inf")
    lse_a[0] = ninf  # row 0: only b saw keys; a's output is garbage and must be ignored
    out_a[0] = float("nan")
    lse_b[1] = ninf  # row 1: only a
    lse_a[2], lse_b[2] = ninf, ninf  # row 2: neither
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    assert rel_err(out, ref) < TOL[dtype] and rel_err(lse, ref_lse) < 1e-6
    # One-sided rows pass through (the LSE round trip through the log2 domain costs an ulp).
    assert torch.equal(out[0], out_b[0]) and torch.allclose(lse[0], lse_b[0], rtol=1e-6, atol=0)
    assert torch.equal(out[1], out_a[1]) and torch.allclose(lse[1], lse_a[1], rtol=1e-6, atol=0)
    assert torch.all(out[2].float() == 0) and torch.all(torch.isneginf(lse[2]))


def test_strided_inputs(gen):
    out_a, lse_a, out_b, lse_b = random_states(gen, 10, 4, 64, torch.float32)
    ref = merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    got = merge_attention_states(
        out_a.transpose(0, 1).contiguous().transpose(0, 1),
        lse_a.t().contiguous().t(),
        torch.stack([out_b, out_b], 2)[:, :, 0],
        lse_b,
    )
    assert rel_err(got[0], ref[0]) < 1e-6 and rel_err(got[1], ref[1]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_over_two_page_sets_merges_to_decode_over_both(gen, dtype):
    # Cascade attention: a shared prefix (pages A) and a per-sequence suffix (pages B) attended separately and
    # merged equal one decode over A then B.
    ps, hq, hkv, d = 16, 4, 2, 64
    kv = random_paged_kv(gen, [64 + 37], hkv, d, ps, dtype)
    q = randn(1, hq, d, dtype=dtype, generator=gen)
    table = kv.block_table
    lens = lambda n: torch.tensor([n], dtype=torch.int32, device=DEVICE)
    full = paged_decode_attention(q, kv.k_cache, kv.v_cache, table, kv.seq_lens)
    out_a, lse_a = paged_decode_attention(q, kv.k_cache, kv.v_cache, table[:, :4], lens(64), return_lse=True)
    out_b, lse_b = paged_decode_attention(q, kv.k_cache, kv.v_cache, table[:, 4:], lens(37), return_lse=True)
    merged, _ = merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert rel_err(merged, full.double()) < TOL[dtype]


def test_empty_input():
    out = torch.empty(0, 2, 64, device=DEVICE)
    lse = torch.empty(0, 2, device=DEVICE)
    merged, merged_lse = merge_attention_states(out, lse, out, lse)
    assert merged.shape == (0, 2, 64) and merged_lse.shape == (0, 2)


@pytest.fixture
def no_launch(monkeypatch):
    trap_launches(monkeypatch, merge, "_merge_states_kernel")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "out_a must have 3 dimensions"),
        (lambda a: (a[0], a[1], a[2][:2], a[3]), ValueError, "out_b must have out_a's shape"),
        (lambda a: (a[0], a[1], a[2].half(), a[3]), TypeError, "out_b has dtype"),
        (lambda a: (a[0], a[1].double(), *a[2:]), TypeError, "lse_a must have dtype"),
        (lambda a: (a[0], a[1][:, :1], *a[2:]), ValueError, "lse_a must have shape"),
        (lambda a: (*a[:3], a[3][0]), ValueError, "lse_b must have 2 dimensions"),
        (lambda a: tuple(t[..., :0] if t.dim() == 3 else t for t in a), ValueError, "head_dim 0"),
    ],
)
def test_bad_input_is_rejected_before_launch(no_launch, mutate, error, match):
    args = mutate(random_states(torch.Generator().manual_seed(3), 5, 2, 64, torch.float32))
    with pytest.raises(error, match=match):
        merge_attention_states(*args)


@pytest.mark.parametrize("side", ["lse_a", "lse_b"])
def test_positive_infinite_lse_is_refused(gen, monkeypatch, side):
    # Some libraries mark an empty partial with +inf; here -inf is the marker and +inf would give NaN.
    trap_launches(monkeypatch, merge, "_merge_states_kernel")
    out_a, lse_a, out_b, lse_b = random_states(gen, 4, 2, 64, torch.float32)
    (lse_a if side == "lse_a" else lse_b)[2, 1] = float("inf")
    with pytest.raises(ValueError, match=rf"{side}\[2, 1\] is \+inf"):
        merge_attention_states(out_a, lse_a, out_b, lse_b)


def test_sink_on_one_side_merges_to_attention_with_the_sink(gen):
    # The documented use with sinks: one side carries the sink, the other does not. Keys [0, 45) with the sink,
    # keys [45, 90) (a window of 45 ending at the query) without, merged == all 90 keys with the sink.
    kv = random_paged_kv(gen, [90], 2, 64, 16, torch.float32)
    q = randn(1, 4, 64, dtype=torch.float32, generator=gen)
    sinks = randn(4, dtype=torch.float32, generator=gen)
    whole, whole_lse = paged_decode_attention(q, *kv.args, sinks=sinks, return_lse=True)
    first = torch.full_like(kv.seq_lens, 45)
    a, lse_a = paged_decode_attention(q, *kv.args[:3], first, sinks=sinks, return_lse=True)
    b, lse_b = paged_decode_attention(q, *kv.args, window=45, return_lse=True)
    out, lse = merge_attention_states(a, lse_a, b, lse_b)
    assert rel_err(out, whole.double()) < 1e-5 and rel_err(lse, whole_lse.double()) < 1e-5
