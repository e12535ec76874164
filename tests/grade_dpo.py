"""Graded tests of the assignment dpo (generate.py: token_logps; train_dpo.py: sequence_logps, dpo_loss).

Log-probs are checked on a stand-in model whose next-token probabilities are set by hand (so every log-prob is the
log of a known number); the loss at points where it is known exactly: ln 2 when the policy is the reference, the
hand-computed value of Rafailov et al. (2023) eq. 7 elsewhere, and its gradient's direction.
"""

import math

import pytest
import torch

import generate
import train_dpo

# Next-token probabilities at positions 0..4 of a 5-token row over a vocabulary of 4.
PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.2, 0.3], [0.3, 0.4, 0.1, 0.2], [0.2, 0.3, 0.4, 0.1],
                      [0.25, 0.25, 0.25, 0.25]])
IDS = torch.tensor([[0, 3, 2, 0, 1], [1, 1, 3, 2, 0]])
# Row 0: prompt = the first two tokens. Row 1: prompt = the first token, then three completion tokens, then one pad.
TARGETS = torch.tensor([[-100, -100, 2, 0, 1], [-100, 1, 3, 2, -100]])


class FixedLogits(torch.nn.Module):
    """A stand-in model: the same logits for any input, log(PROBS) shifted by a constant per position (log_softmax
    must remove it)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.logits = (PROBS.log() + torch.arange(5.0)[:, None]).expand(2, 5, 4).to(dtype)

    def forward(self, input_ids, pixel_values=None, **kwargs):
        return self.logits[:, :input_ids.shape[1]], None


def batch():
    return {"input_ids": IDS, "targets": TARGETS, "pixel_values": None}


def test_token_logps_score_each_next_token():
    logps, mask = generate.token_logps(FixedLogits(), IDS, TARGETS)
    # position t scores token t+1 under PROBS[t]; only the completion's positions count
    expected = torch.tensor([[0.4, 0.2, 0.3, 0.3], [0.2, 0.3, 0.1, 0.2]]).log()
    assert logps.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[False, True, True, True], [True, True, True, False]]
    assert torch.allclose(logps[mask], expected[mask], atol=1e-5)


def test_token_logps_are_fp32_whatever_the_models_dtype():
    logps, _ = generate.token_logps(FixedLogits(torch.bfloat16), IDS, TARGETS)
    assert logps.dtype == torch.float32


def test_sequence_logps_sum_the_completion_tokens_only():
    logps, counts = train_dpo.sequence_logps(FixedLogits(), batch(), return_counts=True)
    assert torch.allclose(logps, torch.tensor([math.log(0.2 * 0.3 * 0.3), math.log(0.2 * 0.3 * 0.1)]), atol=1e-5)
    assert counts.tolist() == [3, 3]
    assert torch.equal(train_dpo.sequence_logps(FixedLogits(), batch()), logps)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_the_loss_is_exactly_ln2_when_the_policy_is_the_reference(label_smoothing):
    chosen, rejected = torch.tensor([-3.0, -10.0, -1.5, -7.25]), torch.tensor([-4.0, -2.0, -9.5, -0.5])
    loss, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(),
                                                                beta=0.1, label_smoothing=label_smoothing)
    assert loss.item() == torch.tensor(2.0).log().item()  # every margin is 0: -log sigmoid(0), to the last bit
    assert torch.equal(chosen_rewards, torch.zeros(4)) and torch.equal(rejected_rewards, torch.zeros(4))


def test_the_loss_and_rewards_by_hand():
    # margin h = (-1 - -2) - (-5 - -3) = 3, beta 0.5: -log sigmoid(1.5); rewards beta x (policy - reference)
    args = torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-3.0])
    loss, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(*args, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.5) and rejected_rewards.item() == pytest.approx(-1.0)
    # conservative DPO, eps 0.2: -(0.8) log s(1.5) - 0.2 log s(-1.5)
    loss, _, _ = train_dpo.dpo_loss(*args, beta=0.5, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(1.5))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # IPO: (3 - 1 / (2 x 0.5))^2
    assert train_dpo.dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(4.0)


def test_the_loss_is_the_mean_over_pairs():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-5.0, -4.0])
    loss, _, _ = train_dpo.dpo_loss(pc, pr, torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -4.0]), beta=0.5)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.5)) + math.log(2)) / 2, abs=1e-6)


def test_a_step_down_the_gradient_raises_the_chosen_and_lowers_the_rejected():
    chosen, rejected = torch.tensor([-4.0, -6.0], requires_grad=True), torch.tensor([-5.0, -2.0], requires_grad=True)
    loss, _, _ = train_dpo.dpo_loss(chosen, rejected, torch.tensor([-4.5, -6.0]), torch.tensor([-5.0, -2.5]), beta=0.1)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_the_nll_term_adds_its_weight_times_the_chosen_nll():
    pc, pr = torch.tensor([-6.0, -3.0]), torch.tensor([-2.0, -4.0])
    nll = torch.tensor([1.5, 0.5])  # mean per-token NLL of each chosen chain
    loss, _, _ = train_dpo.dpo_loss(pc, pr, pc, pr, beta=0.1, nll_weight=0.7, chosen_nll=nll)
    assert loss.item() == pytest.approx(math.log(2) + 0.7 * 1.0, abs=1e-6)


def test_ipo_at_policy_equals_reference():
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -5.0])
    assert train_dpo.dpo_loss(pc, pr, pc, pr, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)  # 1/(4 b^2)


def test_named_errors():
    pc, pr = torch.tensor([-6.0]), torch.tensor([-2.0])
    with pytest.raises(ValueError, match="chosen_nll"):
        train_dpo.dpo_loss(pc, pr, pc, pr, beta=0.1, nll_weight=0.2)
    with pytest.raises(ValueError, match="loss_type"):
        train_dpo.dpo_loss(pc, pr, pc, pr, beta=0.1, loss_type="hinge")
