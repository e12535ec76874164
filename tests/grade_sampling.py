"""Graded tests of the assignment sampling (generate.py: sample_next_token).

The order of the cuts is the module docstring's: temperature, then top-k, then the top-p nucleus, then one draw. Each
test draws many rows of the same logits with a seeded generator and looks at which tokens ever come out (the support)
or how often each does (the distribution), against values worked out by hand.
"""

import torch

from generate import sample_next_token


def draws(logits, n=4000, **options):
    """n draws from one row of logits -> (n,) token ids."""
    g = torch.Generator().manual_seed(0)
    out = sample_next_token(logits.expand(n, -1), generator=g, **options)
    assert out.shape == (n,) and out.dtype == torch.long
    return out


def support(logits, **options):
    return set(draws(logits, **options).tolist())


def test_temperature_zero_is_the_argmax_whatever_the_cuts():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    for options in ({}, {"top_k": 3}, {"top_p": 0.5}):
        assert torch.equal(sample_next_token(logits, 0.0, **options), logits.argmax(-1))


def test_temperature_sharpens_or_flattens_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    expected = {0.5: [0.0159, 0.1173, 0.8668], 1.0: [0.0900, 0.2447, 0.6652], 2.0: [0.1863, 0.3072, 0.5065]}
    for t, shares in expected.items():
        counts = torch.bincount(draws(logits, n=40000, temperature=t), minlength=3) / 40000  # softmax(logits / t)
        assert torch.allclose(counts, torch.tensor(shares), atol=0.015), (t, counts)


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, 2.5, 0.0]])
    assert support(logits, temperature=1.0, top_k=3) == {1, 3, 4}
    assert support(logits, temperature=1.0, top_k=1) == {1}
    assert support(logits, temperature=1.0, top_k=6) == support(logits, temperature=1.0) == set(range(6))


def test_top_p_keeps_the_smallest_nucleus_that_reaches_it():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()  # sorted: 0.5, 0.3, 0.15, 0.05
    assert support(logits, temperature=1.0, top_p=0.45) == {1}  # the best token alone reaches 0.45
    assert support(logits, temperature=1.0, top_p=0.75) == {1, 3}  # 0.5 + 0.3 reaches 0.75
    assert support(logits, temperature=1.0, top_p=0.9) == {1, 3, 2}
    assert support(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}


def test_the_nucleus_keeps_its_tokens_relative_odds():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    counts = torch.bincount(draws(logits, n=40000, temperature=1.0, top_p=0.75), minlength=4) / 40000
    assert torch.allclose(counts, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.015)  # 0.5 and 0.3, renormalised


def test_temperature_comes_before_top_p():
    # At temperature 1 the best token holds 0.5 < 0.6, so the nucleus has two tokens; at 0.2 the best token alone
    # holds almost all the mass. Cutting before dividing would keep two tokens both times.
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert support(logits, temperature=1.0, top_p=0.6) == {1, 3}
    assert support(logits, temperature=0.2, top_p=0.6) == {1}


def test_top_k_then_top_p():
    logits = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]]).log()
    # top-k 2 leaves 0.3 and 0.25, renormalised 0.545 and 0.455: top-p 0.5 keeps the first alone
    assert support(logits, temperature=1.0, top_k=2, top_p=0.5) == {0}
    assert support(logits, temperature=1.0, top_k=2, top_p=0.6) == {0, 1}


def test_a_seeded_generator_repeats_its_draws():
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    one, two, other = (sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(one, two) and not torch.equal(one, other)
