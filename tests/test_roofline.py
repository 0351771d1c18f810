"""disagg.roofline: FLOP/byte counts against hand-computed and brute-force cases."""

import itertools

import pytest

from disagg import roofline as rl


def brute_pairs(sq, sk, window=None):
    return sum(
        1 for i in range(sq) for j in range(sk) if j <= i + sk - sq and (window is None or j > i + sk - sq - window)
    )


@pytest.mark.parametrize("window", [None, 1, 3, 50])
def test_causal_pairs_matches_brute_force(window):
    for sq, sk in itertools.product(range(0, 17), range(0, 17)):
        assert rl.causal_pairs(sq, sk, window) == brute_pairs(sq, sk, window)


def test_hand_computed_counts():
    # Causal 4x4: 1+2+3+4 = 10 pairs; 4 FLOPs per pair per head-dim element.
    assert rl.attention_flops(1, 1, 4, 4, 8, causal=True) == 4 * 10 * 8
    # Square causal halves (plus the diagonal) the non-causal count: FA's "halved for causal" up to O(1/N).
    n = 16384
    assert rl.attention_flops(1, 32, n, n, 128, True) / rl.attention_flops(1, 32, n, n, 128, False) == pytest.approx(
        0.5, rel=1e-4
    )
    # Decode, Llama-3-8B-like attention: 8 KV heads, d 128, 4096 context, bf16: K+V = 2*8*4096*128*2 bytes.
    assert rl.decode_bytes(1, 32, 8, 4096, 128) == 2 * 8 * 4096 * 128 * 2 + 2 * 32 * 128 * 2
    # GQA 32:8 decode with bf16 KV has intensity ~ group size / ... : 4*32*d*ctx flops over ~4*8*d*ctx bytes = 4.
    ai = rl.intensity(rl.decode_flops(64, 32, 4096, 128), rl.decode_bytes(64, 32, 8, 4096, 128))
    assert ai == pytest.approx(4.0, rel=1e-3)
    assert rl.gemm_flops(2, 3, 4) == 48 and rl.gemm_bytes(2, 3, 4, 1) == 8 + 12 + 6


def test_roofline_and_model_shapes():
    h100 = rl.Roofline(flops=800e12, bandwidth=3.0e12)
    assert h100.ridge == pytest.approx(266.67, rel=1e-3)
    assert h100.attainable(4.0) == 12e12 and h100.attainable(1e6) == 800e12
    assert h100.time(800e12, 3.0e12) == 1.0
    assert rl.LLAMA3_8B.params == pytest.approx(8.03e9, rel=1e-2)
    assert rl.LLAMA3_70B.params == pytest.approx(70.6e9, rel=1e-2)
    assert rl.LLAMA3_8B.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16
