"""GRPO by hand: group advantages on a reward table, the sign of one update, the chain-token mask, PPO's clip, the k3
KL, and one micro run of the whole job."""

import json
import math
import os

import pytest
import torch

import agents
import checkpoint
import common
import eval as evaluation
import train_dpo
import train_grpo
from model import VLM, get_config
from test_dpo import make_batch, micro_run, teacher_sampler
from train_grpo import grpo_loss, group_advantages, kl_k3

# ----------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_by_hand_with_and_without_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0],   # one right chain of four
                            [1.5, 1.5, 1.5, 1.5],   # all tied: no signal
                            [0.0, 0.5, 1.0, 1.5]])
    adv, trained = group_advantages(rewards, std=False)
    assert trained.tolist() == [True, False, True] and int((~trained).sum()) == 1  # the tied group is skipped
    assert adv.tolist() == [[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [-0.75, -0.25, 0.25, 0.75]]
    adv, _ = group_advantages(rewards, std=True, eps=0.0)
    # row 0: mean 0.25, sample std sqrt((0.75^2 + 3 x 0.25^2) / 3) = 0.5; row 2: std sqrt(1.25 / 3)
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(adv[1], torch.zeros(4))  # 0 / 0 never reaches a tied group
    assert torch.allclose(adv[2], torch.tensor([-0.75, -0.25, 0.25, 0.75]) / math.sqrt(1.25 / 3))
    adv, trained = group_advantages(torch.zeros(2, 3))  # nothing right anywhere: every group skipped
    assert not trained.any() and torch.equal(adv, torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------
# The loss on a real (micro) model and on hand-made tensors


@pytest.fixture
def micro():
    torch.manual_seed(0)
    return VLM(get_config("micro"))


CHAINS = [[11, 12, 13], [20, 21, 22, 23], [30, 31], [40, 41, 42, 43, 44]]  # completion token ids


def test_the_rewards_on_hand_made_scored_chains():
    reward = train_grpo.reward
    assert reward(False, 100, "gated") == 0.0 and reward(False, 40, "gated") == 0.0  # a wrong answer: nothing
    assert reward(True, 100, "gated") == pytest.approx(1.0) and reward(True, 50, "gated") == pytest.approx(0.6)
    assert reward(True, 100) == pytest.approx(1.5) and reward(False, 40) == pytest.approx(0.2)  # additive, weight 0.5
    assert reward(True, 50, weight=0.0) == 1.0


def test_a_hard_pool_has_the_hard_splits_scenes(tmp_path):
    data_dir = str(tmp_path / "data")
    train_grpo.data.build_world(data_dir, train_scenes=6, val_scenes=1, test_scenes=1)
    cfg = train_grpo.GRPOConfig(steps=2, questions_per_step=3, hard_pool=True)
    pool = train_grpo.question_pool(cfg, data_dir)
    assert len(pool) == 6 and all(len(r["objects"]) == 8 and r["id"].startswith("grpo-seed0-hard-") for r in pool)
    plain = train_grpo.GRPOConfig(steps=2, hard_pool=False)
    assert all(len(r["objects"]) <= 7 for r in train_grpo.question_pool(plain, data_dir))


def test_one_update_raises_the_rewarded_chain_and_lowers_the_others(micro):
    batch = make_batch(micro, CHAINS)
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # exactly one chain rewarded
    cfg = train_grpo.GRPOConfig(precision="fp32", device="cpu")
    opt = micro.configure_optimizers(0.0, 1e-3, 0.0, 1e-3, freeze_vision=True)  # the script's optimiser
    scaler = common.make_scaler("cpu", "fp32")
    before = train_dpo.sequence_logps(micro, batch).detach()
    micro.train()
    m = train_grpo.update(micro, opt, scaler, [(batch, adv[0], None, None)], batch["n_targets"], cfg,
                          torch.device("cpu"), "the test step", "nothing saved")
    after = train_dpo.sequence_logps(micro, batch).detach()
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert after[0] > before[0] and (after[1:] < before[1:]).all()


def test_only_chain_tokens_carry_the_loss(micro):
    batch = make_batch(micro, CHAINS)
    logps, mask = train_dpo.token_logps(micro, batch)
    assert torch.equal(mask, batch["targets"][:, 1:] != -100) and int(mask.sum()) == batch["n_targets"]
    assert mask.sum(-1).tolist() == [len(c) for c in CHAINS]  # image and prompt tokens are out
    # d loss / d logp: -A / n_tokens on the chain, exactly 0 on image, prompt and padding positions
    leaf, adv = logps.detach().requires_grad_(), torch.tensor([1.0, -2.0, 0.5, -0.5])
    loss, _ = grpo_loss(leaf, leaf.detach(), adv, mask, batch["n_targets"])
    loss.backward()
    assert torch.equal(leaf.grad[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(leaf.grad[mask], (-adv[:, None] / batch["n_targets"]).expand_as(mask)[mask])
    # More right padding, and other ids under it, change nothing
    padded = make_batch(micro, CHAINS, pad_to=40)
    padded["input_ids"][padded["attention_mask"] == 0] = 7

    def loss_of(b):
        with torch.no_grad():
            lp, m = train_dpo.token_logps(micro, b)
        return grpo_loss(lp, lp, adv, m, b["n_targets"])[0].item()
    assert loss_of(padded) == pytest.approx(loss_of(batch), abs=1e-6)


def test_ppo_clip_stops_the_gradient_outside_the_range_in_the_advantages_direction():
    old = torch.zeros(6, 1)
    ratios = torch.tensor([[1.5], [0.5], [1.5], [0.5], [1.1], [0.9]])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    logps = ratios.log().requires_grad_()
    loss, _ = grpo_loss(logps, old, adv, torch.ones(6, 1, dtype=torch.bool), n_tokens=6, clip_eps=0.2)
    loss.backward()
    g = logps.grad.squeeze(1)
    # clipped: ratio 1.5 with A > 0 and ratio 0.5 with A < 0 (already moved as far as the clip allows)
    assert g[0] == 0 and g[1] == 0
    # unclipped: the other direction, or inside [0.8, 1.2]: d(-r A)/d logp = -r A / n_tokens
    assert torch.allclose(g[2:], -(ratios.squeeze(1) * adv)[2:] / 6)
    # the loss value: -min(rA, clip(r)A) / 6 by hand
    assert loss.item() == pytest.approx(-(1.2 - 0.8 - 1.5 + 0.5 + 1.1 - 0.9) / 6)


def test_kl_k3_is_zero_at_the_reference_and_positive_elsewhere():
    mask = torch.tensor([[True, True, False]])
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    assert torch.equal(kl_k3(logps, logps.clone(), mask), torch.zeros(1, 3))
    kl = kl_k3(logps, torch.tensor([[-1.5, -1.0, -9.0]]), mask)
    assert (kl[mask] > 0).all() and kl[0, 2] == 0  # off the chain: nothing
    d = torch.tensor(-0.5)
    assert kl[0, 0].item() == pytest.approx((d.exp() - d - 1).item())
    adv = torch.tensor([1.0])
    plain, _ = grpo_loss(logps, logps, adv, mask, 2)
    same, k = grpo_loss(logps, logps, adv, mask, 2, ref_logps=logps.clone(), kl_coef=0.5)
    assert same.item() == plain.item() and torch.equal(k, torch.zeros(1, 3))


# ----------------------------------------------------------------------------------------------
# The whole job on a micro world


@pytest.mark.parametrize("extra", [[], ["--ppo-epochs", "2", "--kl-coef", "0.1", "--no-std"]])
def test_micro_run_end_to_end(tmp_path, monkeypatch, extra):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8)
    # The random micro policy's chains all score alike; the teacher's (one sound, two flawed) mix the groups.
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    args = ["--out", out, "--steps", "2", "--questions-per-step", "3", "--group-size", "2", "--max-chain-tokens", "8",
            "--micro-batch", "8", "--eval-every", "1", "--val-size", "4", "--eval-limit", "4", *extra]
    results = train_grpo.main(args)
    grpo_dir = os.path.join(out, "reasoning_grpo")
    assert os.path.isfile(os.path.join(grpo_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(grpo_dir, checkpoint.GRPO_DONE))
    assert not os.path.exists(os.path.join(grpo_dir, "train_state.pt"))  # finished: nothing to resume
    with open(os.path.join(out, "logs", "grpo.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "solved", "skipped_groups", "adv_abs", "token_logp", "chain_tokens", "loss", "grad_norm",
                "lr", "elapsed_s"):
        assert all(key in r for r in steps), key
    assert all(r["chains"] == 3 * (2 + 3) and r["skipped_groups"] < 3 and math.isfinite(r["loss"]) for r in steps)
    assert [r["step"] for r in records if r.get("event") == "eval"] == [0, 1, 2]
    assert all(("kl" in r) == bool(extra) and r.get("kl", 0) >= 0 for r in steps)  # logged only when on
    assert "two_agent_grpo" in results["arms"] and "two_agent_grpo vs two_agent" in results["paired"]
    assert results["arms"]["two_agent_grpo"]["checkpoints"][0] == grpo_dir
    with open(os.path.join(out, "results_test_limit4.md")) as f:  # --eval-limit: not the job's results.md
        assert "two_agent_grpo" in f.read()
    # Run again: the finished run is reused, not trained again (and the evaluation, tested above, is skipped)
    monkeypatch.setattr(train_grpo, "train", lambda *a: pytest.fail("a finished GRPO run was trained again"))
    monkeypatch.setattr(train_grpo.evaluation, "run_eval", lambda out_dir, **kw: "evaluated")
    assert train_grpo.main(args) == "evaluated"


def test_an_interrupted_run_resumes_at_its_last_step(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    monkeypatch.setattr(evaluation, "evaluate_two_agent", lambda *a, **kw: {"chain_correct": 0.5, "overall": 0.5})
    monkeypatch.setattr(evaluation, "run_eval", lambda out_dir, **kw: "evaluated")
    real, calls = train_grpo.rollout, []

    def interrupted(*args):  # Ctrl-C during the second step's sampling
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train_grpo, "rollout", interrupted)
    args = ["--out", out, "--steps", "2", "--questions-per-step", "3", "--group-size", "2", "--max-chain-tokens", "8"]
    with pytest.raises(SystemExit) as e:
        train_grpo.main(args)
    grpo_dir = os.path.join(out, "reasoning_grpo")
    assert e.value.code == 130 and os.path.isfile(os.path.join(grpo_dir, "train_state.pt"))
    assert "two_agent_grpo" not in evaluation.arm_checkpoints(out)  # no arm until the run is finished
    with pytest.raises(SystemExit, match="group_size=2, not 3: pass the same option, or start over with --no-resume"):
        train_grpo.main(args[:-3] + ["3", "--max-chain-tokens", "8"])
    monkeypatch.setattr(train_grpo, "rollout", real)
    assert train_grpo.main(args) == "evaluated" and len(calls) == 2  # step 1 was not sampled again
    with open(os.path.join(out, "logs", "grpo.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [(r.get("event"), r["step"]) for r in records] == [("eval", 0), (None, 1), (None, 2), ("eval", 2)]
    assert os.path.isfile(os.path.join(grpo_dir, checkpoint.GRPO_DONE))


def test_grpo_arm_after_the_dpo_rounds_and_against_the_last_one(tmp_path):
    markers = {"reasoning_dpo1": checkpoint.ROUND_DONE, "reasoning_dpo2": checkpoint.ROUND_DONE,
               "reasoning_grpo": checkpoint.GRPO_DONE}
    for stage in ("base", "reasoning", "summary", "reasoning_dpo1", "reasoning_dpo2", "reasoning_grpo", "vanilla"):
        os.makedirs(tmp_path / stage)
        (tmp_path / stage / "config.json").write_text("{}")
        if stage != "vanilla":  # vanilla: interrupted, no marker, so no arm
            (tmp_path / stage / markers.get(stage, checkpoint.STAGE_DONE)).write_text("{}")
    assert list(evaluation.arm_checkpoints(str(tmp_path), rounds=1)) == ["direct", "two_agent", "two_agent_dpo1",
                                                                        "two_agent_grpo"]  # train_dpo.py --iters 1
    arms = evaluation.arm_checkpoints(str(tmp_path))
    assert list(arms) == ["direct", "two_agent", "two_agent_dpo1", "two_agent_dpo2", "two_agent_grpo"]
    assert arms["two_agent_grpo"] == ("two_agent", [str(tmp_path / "reasoning_grpo"), str(tmp_path / "summary")])
    flags = {"two_agent": ("0000", "0000"), "two_agent_dpo1": ("1111", "1111"), "two_agent_dpo2": ("1100", "1000"),
             "two_agent_grpo": ("1110", "0110")}
    tests = evaluation.paired_comparisons({a: {"correct": c, "chain_right": r} for a, (c, r) in flags.items()},
                                          [{"kind": "reasoning"}] * 4)
    assert (tests["two_agent_grpo vs two_agent_dpo2"]["b"], tests["two_agent_grpo vs two_agent_dpo2"]["c"]) == (1, 0)
    chain = tests["two_agent_grpo vs two_agent_dpo2 (chain)"]
    assert (chain["b"], chain["c"], chain["metric"]) == (2, 1, "chain")
    assert not any(k.startswith("two_agent_grpo vs two_agent_dpo1") for k in tests)  # the last round only


def test_options_are_checked_at_parse_time():
    with pytest.raises(SystemExit):
        train_grpo.main(["--process-weight", "1.5"])  # above 1 a wrong answer could outrank a right one
    with pytest.raises(SystemExit):
        train_grpo.main(["--group-size", "1"])
