"""Graded tests of the assignment grpo (train_grpo.py: group_advantages, kl_k3, grpo_loss), on tensors made by hand.

GRPO (Shao et al. 2024): a chain's advantage is its reward against its own group's (r - mean) / (std + eps); the
loss is PPO's clipped surrogate per token (Schulman et al. 2017), summed over the chain tokens and divided by the
step's chain tokens; k3 = exp(d) - d - 1 with d = ref - logp estimates the KL to the reference.
"""

import math

import pytest
import torch

import train_grpo

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 0.0],  # one right chain of four
                        [1.5, 1.5, 1.5, 1.5],  # all tied: no signal
                        [0.0, 0.5, 1.0, 1.5]])


def test_advantages_by_hand_without_std():
    adv, trained = train_grpo.group_advantages(REWARDS, std=False)
    assert adv.tolist() == [[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [-0.75, -0.25, 0.25, 0.75]]
    assert trained.tolist() == [True, False, True]


def test_advantages_by_hand_with_std():
    adv, _ = train_grpo.group_advantages(REWARDS, std=True, eps=0.0)
    # row 0: mean 0.25, sample std sqrt((0.75^2 + 3 x 0.25^2) / 3) = 0.5; row 2: std sqrt(1.25 / 3)
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(adv[1], torch.zeros(4))  # a tied group: 0, never 0 / 0
    assert torch.allclose(adv[2], torch.tensor([-0.75, -0.25, 0.25, 0.75]) / math.sqrt(1.25 / 3))
    adv, _ = train_grpo.group_advantages(REWARDS)  # the default eps: a little under the exact values
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]) / (1 + 2e-4), atol=1e-6)


def test_each_group_is_its_own_baseline():
    rewards = torch.tensor([[10.0, 12.0], [0.0, 1.0]])  # far apart: a shared baseline would rank every chain alike
    adv, trained = train_grpo.group_advantages(rewards, std=False)
    assert adv.tolist() == [[-1.0, 1.0], [-0.5, 0.5]] and trained.all()
    adv, trained = train_grpo.group_advantages(torch.zeros(2, 3))
    assert not trained.any() and torch.equal(adv, torch.zeros(2, 3))


def test_kl_k3_by_hand():
    mask = torch.tensor([[True, True, False]])
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    assert torch.equal(train_grpo.kl_k3(logps, logps.clone(), mask), torch.zeros(1, 3))  # 0 at the reference
    kl = train_grpo.kl_k3(logps, torch.tensor([[-1.5, -1.0, -9.0]]), mask)
    # d = ref - logp = -0.5 and 1.0: exp(d) - d - 1; nothing off the mask
    assert kl[0].tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0], abs=1e-6)


def test_at_ratio_1_the_gradient_is_minus_the_advantage_per_step_token():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([1.0, -2.0])
    loss, kl = train_grpo.grpo_loss(logps, logps.detach(), adv, mask, n_tokens=8)  # 8: the whole step's tokens
    assert kl is None and loss.item() == pytest.approx((-1.0 * 2 + 2.0 * 2) / 8)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-1 / 8, -1 / 8, 0.0], [0.0, 2 / 8, 2 / 8]]))


def test_the_clip_stops_the_gradient_only_in_the_advantages_direction():
    old = torch.zeros(6, 1)
    ratios = torch.tensor([[1.5], [0.5], [1.5], [0.5], [1.1], [0.9]])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    logps = ratios.log().requires_grad_()
    loss, _ = train_grpo.grpo_loss(logps, old, adv, torch.ones(6, 1, dtype=torch.bool), n_tokens=6, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 0.8 - 1.5 + 0.5 + 1.1 - 0.9) / 6)  # -min(r A, clip(r) A) / 6
    loss.backward()
    g = logps.grad.squeeze(1)
    assert g[0] == 0 and g[1] == 0  # moved as far as the clip allows, in the advantage's direction
    assert torch.allclose(g[2:], -(ratios.squeeze(1) * adv)[2:] / 6)  # the other way, or inside the range


def test_the_kl_term_adds_its_weight_times_k3():
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask, adv = torch.tensor([[True, True]]), torch.tensor([0.0])
    loss, kl = train_grpo.grpo_loss(logps, logps, adv, mask, 2, ref_logps=ref, kl_coef=0.5)
    assert torch.allclose(kl, train_grpo.kl_k3(logps, ref, mask))
    assert loss.item() == pytest.approx(0.5 * (math.exp(-0.5) - 0.5 + math.exp(1.0) - 2.0) / 2, abs=1e-6)
