"""disagg.sampling: greedy, temperature, top-k, top-p, min-p, counter-based seeded draws, batched."""

import pytest
import torch

from disagg.errors import RequestError
from disagg.request import SamplingParams
from disagg.sampling import filter_probs, row_key, sample, sample_ids, uniform_noise


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, float64, written for clarity: the distribution the sampler must draw from."""
    x = logits.double() / p.temperature
    if 0 < p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=0)
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, dim=0) - sorted_p
    drop = (before >= p.top_p) | (sorted_p < p.min_p * sorted_p[0])
    drop[0] = False
    probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return probs / probs.sum()


def test_greedy_is_argmax(gen):
    logits = torch.randn(5, 300, generator=gen)
    assert sample(logits, [SamplingParams()] * 5, range(5)) == logits.argmax(-1).tolist()
    # top_k=1 is greedy at any temperature, and so is min_p=1 (only the most likely token survives)
    assert sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 5, range(5)) == logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=2.0, min_p=1.0)] * 5, range(5)) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_probs(logits, [SamplingParams(temperature=1.0, top_p=0.7)])
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept = filter_probs(logits, [SamplingParams(temperature=1.0, top_p=0.4)])
    torch.testing.assert_close(kept, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_probs(logits, [SamplingParams(temperature=1.0, min_p=0.5)])  # keeps p >= 0.25
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_k_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    kept = filter_probs(logits, [SamplingParams(temperature=0.5, top_k=2)])
    expected = torch.zeros(1, 5)
    expected[0, [4, 0]] = torch.softmax(torch.tensor([3.0, 2.0]) / 0.5, 0)
    torch.testing.assert_close(kept, expected)


def test_batched_filters_equal_the_per_row_reference(gen):
    """Every row of one batch, each with its own settings, against a float64 per-row reference."""
    logits = torch.randn(12, 97, generator=gen) * 3
    params = [
        SamplingParams(
            temperature=float(torch.rand(1, generator=gen)) * 2 + 0.1,
            top_k=int(torch.randint(0, 120, (1,), generator=gen)),
            top_p=float(torch.rand(1, generator=gen)) * 0.9 + 0.1 if i % 3 else 1.0,
            min_p=float(torch.rand(1, generator=gen)) * 0.3 if i % 2 else 0.0,
        )
        for i in range(12)
    ]
    probs = filter_probs(logits, params)
    expected = torch.stack([reference_probs(row, p) for row, p in zip(logits, params, strict=True)]).float()
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-4)
    # and every draw lands on a kept token
    tokens = sample_ids(logits, params, range(12))
    assert bool((probs.gather(1, tokens[:, None]) > 0).all())


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    params = SamplingParams(temperature=1.0, seed=7)
    n = 4000
    tokens = torch.tensor(sample(probs.log().expand(n, 4), [params] * n, range(n)))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.03  # ~4 standard deviations of a frequency at n = 4000


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    params = SamplingParams(temperature=1.0, top_p=0.6, seed=3)  # keeps 0.4 and 0.3 -> 4/7, 3/7
    n = 4000
    tokens = torch.tensor(sample(logits.expand(n, 4), [params] * n, range(n)))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - torch.tensor([4 / 7, 3 / 7, 0, 0])).abs().max() < 0.035


def test_seeded_draws_are_reproducible_and_independent_of_the_batch(gen):
    logits = torch.randn(3, 50, generator=gen)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    first = sample(logits, params, [0, 5, 9])
    assert sample(logits, params, [0, 5, 9]) == first
    # row 1 alone, in another batch position, with greedy neighbours, draws the same token
    assert sample(logits[1:2], params[1:2], [5]) == first[1:2]
    mixed = sample(logits[[0, 1, 2]].flip(0), [SamplingParams(), params[1], SamplingParams()], [0, 5, 0])
    assert mixed[1] == first[1]
    # another seed or another token index changes the stream
    many = [sample(logits[:1], [SamplingParams(temperature=1.0, seed=s)], [0])[0] for s in range(20)]
    assert len(set(many)) > 1
    many = [sample(logits[:1], [SamplingParams(temperature=1.0, seed=1)], [i])[0] for i in range(20)]
    assert len(set(many)) > 1


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300])
def test_tiny_temperatures_are_greedy(gen, temperature):
    """logits / temperature overflows float32 (or the temperature itself underflows to 0): still the argmax."""
    logits = torch.randn(6, 40, generator=gen) * 100
    logits[:, 0] = -1e4  # token 0 is the least likely: an overflow that picks it shows
    params = [SamplingParams(temperature=temperature, top_p=0.9, seed=i) for i in range(3)]
    params += [SamplingParams(temperature=temperature, seed=i) for i in range(3)]
    assert sample(logits, params, range(6)) == logits.argmax(-1).tolist()


def test_noise_is_uniform_and_keyed(gen):
    keys = torch.tensor([row_key(1, 0), row_key(1, 1), row_key(2, 0)], dtype=torch.int64)
    u = uniform_noise(keys, 20000)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    assert (u.mean(1) - 0.5).abs().max() < 0.01  # std of a mean of 20000 uniforms: 0.002
    hist = torch.histc(u[0].float(), bins=10, min=0, max=1) / 20000
    assert (hist - 0.1).abs().max() < 0.01
    assert torch.equal(uniform_noise(keys[1:2], 20000), u[1:2])  # a row's noise does not depend on the batch
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    # neighbouring vocab ids are uncorrelated
    assert abs(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]) < 0.03


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 1.5},
    ],
)
def test_rejects_bad_settings(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_settings_round_trip_through_dict():
    p = SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=11, eos_token_ids=(1, 2))
    assert SamplingParams.from_dict(p.to_dict()) == p
    with pytest.raises(RequestError, match="exactly the fields"):
        SamplingParams.from_dict({**p.to_dict(), "extra": 1})
