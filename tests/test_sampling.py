"""disagg.sampling: greedy, temperature, top-k, top-p, seeded draws."""

import pytest
import torch

from disagg.errors import RequestError
from disagg.request import SamplingParams
from disagg.sampling import filter_probs, sample


def test_greedy_is_argmax(gen):
    logits = torch.randn(5, 300, generator=gen)
    assert sample(logits, [SamplingParams()] * 5, range(5)) == logits.argmax(-1).tolist()
    # top_k=1 is greedy at any temperature
    assert sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 5, range(5)) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = filter_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    kept = filter_probs(logits, SamplingParams(temperature=1.0, top_p=0.4))
    torch.testing.assert_close(kept, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_top_k_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    kept = filter_probs(logits, SamplingParams(temperature=0.5, top_k=2))
    expected = torch.zeros(5)
    expected[[4, 0]] = torch.softmax(torch.tensor([3.0, 2.0]) / 0.5, 0)
    torch.testing.assert_close(kept, expected)


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    params = SamplingParams(temperature=1.0, seed=7)
    n = 4000
    tokens = torch.tensor(sample(probs.log().expand(n, 4), [params] * n, range(n)))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.03  # ~4 standard deviations of a frequency at n = 4000


def test_seeded_draws_are_reproducible_and_independent_of_the_batch(gen):
    logits = torch.randn(3, 50, generator=gen)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    first = sample(logits, params, [0, 5, 9])
    assert sample(logits, params, [0, 5, 9]) == first
    # row 1 alone, in another batch position, draws the same token
    assert sample(logits[1:2], params[1:2], [5]) == first[1:2]
    # another seed or another token index changes the stream
    many = [sample(logits[:1], [SamplingParams(temperature=1.0, seed=s)], [0])[0] for s in range(20)]
    assert len(set(many)) > 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_rejects_bad_settings(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_settings_round_trip_through_dict():
    p = SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, seed=11, eos_token_ids=(1, 2))
    assert SamplingParams.from_dict(p.to_dict()) == p
    with pytest.raises(RequestError, match="exactly the fields"):
        SamplingParams.from_dict({**p.to_dict(), "extra": 1})
