"""DPO by hand: the loss at known points, sequence log-probs against a hand sum, pairs, one micro round."""

import dataclasses
import json
import math
import os
import random

import pytest
import torch

import data
import train_dpo
import train_sft
from model import VLM, get_config
from train_dpo import build_pairs, dpo_loss, sequence_logps

LN2 = torch.tensor(2.0).log()  # float32 ln 2


def zeros(n=4):
    return torch.zeros(n), torch.zeros(n)


# ----------------------------------------------------------------------------------------------
# dpo_loss, a pure function


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_loss_at_zero_margin_is_exactly_ln2(label_smoothing):
    pc = torch.tensor([-3.0, -10.0, -1.5, -7.25])  # policy == reference: every margin is zero
    pr = torch.tensor([-4.0, -2.0, -9.5, -0.5])
    loss, rc, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32 and loss.item() == LN2.item()
    assert torch.equal(rc, torch.zeros(4)) and torch.equal(rr, torch.zeros(4))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_at_zero_margin(beta):
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -5.0])
    loss, _, _ = dpo_loss(pc, pr, pc, pr, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(1 / (4 * beta**2), rel=1e-6)


def test_nll_term_adds_weighted_chosen_nll():
    pc, pr = torch.tensor([-6.0, -3.0]), torch.tensor([-2.0, -4.0])
    nll = torch.tensor([1.5, 0.5])  # mean per-token NLL of each chosen response
    loss, _, _ = dpo_loss(pc, pr, pc, pr, beta=0.1, nll_weight=0.7, chosen_nll=nll)
    assert loss.item() == pytest.approx(math.log(2) + 0.7 * 1.0, abs=1e-6)


def test_sigmoid_loss_hand_computed():
    # margin h = (-1 - -2) - (-5 - -3) = 1 - (-2) = 3; beta 0.5 -> -log sigmoid(1.5)
    loss, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-1.0)
    # conservative DPO with eps = 0.2: -(0.8) log s(1.5) - 0.2 log s(-1.5)
    loss, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5,
                          label_smoothing=0.2)
    expect = 0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(1.5))
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    # IPO: (3 - 1/(2*0.5))^2 = 4
    loss, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5,
                          loss_type="ipo")
    assert loss.item() == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------
# sequence_logps on a real (micro) model


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return VLM(get_config("micro")).eval()


def make_batch(model, completions, prompt_len=6, pad_to=None):
    """Rows: [image tokens][prompt][completion]; targets -100 everywhere but the completion."""
    cfg = model.config
    n_img = cfg.tokens_per_image
    examples = []
    for i, completion in enumerate(completions):
        g = torch.Generator().manual_seed(i)
        prompt = torch.randint(10, cfg.text.vocab_size, (prompt_len,), generator=g)
        ids = torch.cat([torch.full((n_img,), cfg.image_token_id), prompt, torch.tensor(completion)])
        targets = ids.clone()
        targets[: n_img + prompt_len] = -100
        examples.append({"ids": ids, "targets": targets, "image": torch.randn(3, cfg.vision.image_size, cfg.vision.image_size, generator=g)})
    batch = train_sft.collate(examples, pad_id=0)
    if pad_to:  # extra right padding
        extra = pad_to - batch["input_ids"].shape[1]
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra))
        batch["targets"] = torch.nn.functional.pad(batch["targets"], (0, extra), value=-100)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra))
    return batch


def test_sequence_logps_equals_hand_sum_over_completion_only(micro):
    completions = [[11, 12, 13], [20, 21, 22, 23, 24]]
    batch = make_batch(micro, completions)
    got = sequence_logps(micro, batch)
    logits, _ = micro(batch["input_ids"], pixel_values=batch["pixel_values"])
    logp = logits.float().log_softmax(-1)
    for b, completion in enumerate(completions):
        start = micro.config.tokens_per_image + 6  # first completion token
        hand = sum(logp[b, start + j - 1, tok].item() for j, tok in enumerate(completion))
        assert got[b].item() == pytest.approx(hand, abs=1e-5)
    assert got.dtype == torch.float32 and got.shape == (2,)


def test_sequence_logps_padding_and_prompt_invariance(micro):
    completions = [[11, 12, 13], [20, 21, 22, 23, 24]]
    base = sequence_logps(micro, make_batch(micro, completions))
    padded = sequence_logps(micro, make_batch(micro, completions, pad_to=30))
    assert torch.allclose(base, padded, atol=1e-5)
    alone = sequence_logps(micro, make_batch(micro, completions[:1]))
    assert torch.allclose(base[:1], alone, atol=1e-5)
    # No completion tokens -> nothing counted: prompt and image tokens never enter the sum.
    empty = make_batch(micro, completions)
    empty["targets"][:] = -100
    assert torch.equal(sequence_logps(micro, empty), torch.zeros(2))


def test_policy_equals_reference_gives_ln2_and_a_step_raises_the_margin(micro):
    torch.manual_seed(0)
    policy = VLM(get_config("micro"))
    batch = make_batch(policy, [[11, 12, 13], [30, 31], [14, 15, 16], [40, 41, 42]])  # 2 chosen, then 2 rejected
    with torch.no_grad():
        ref_c, ref_r = sequence_logps(policy, batch).chunk(2)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    pol_c, pol_r = sequence_logps(policy, batch).chunk(2)
    loss, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new_c, new_r = sequence_logps(policy, batch).chunk(2)
    margin = ((new_c - ref_c) - (new_r - ref_r)).mean()
    assert margin.item() > 0


# ----------------------------------------------------------------------------------------------
# Pair construction


def s(text, correct, score):
    return {"text": text, "correct": correct, "key": (int(correct), score)}


def test_pairs_best_vs_worst_with_cap():
    ranked = [s("a", True, 90), s("b", False, 10), s("c", True, 70), s("d", False, 40), s("e", True, 80)]
    pairs = build_pairs(ranked, max_pairs_per_question=2)
    assert [(c["text"], r["text"]) for c, r in pairs] == [("a", "b"), ("e", "d")]
    assert len(build_pairs(ranked, max_pairs_per_question=1)) == 1


def test_pairs_skip_ties_and_identical_texts():
    assert build_pairs([s("a", True, 50), s("b", True, 50), s("c", True, 50)]) == []  # all equal
    assert build_pairs([s("same", True, 90), s("same", False, 10)]) == []  # identical texts
    pairs = build_pairs([s("x", True, 90), s("y", True, 60), s("z", True, 60), s("w", True, 60)], 3)
    assert [(c["text"], r["text"]) for c, r in pairs] == [("x", "w")]  # then y vs z is a tie: no more pairs


def test_pairs_need_a_correct_chosen_chain():
    assert build_pairs([s("a", False, 80), s("b", False, 20)]) == []  # no correct sample: no pair
    pairs = build_pairs([s("a", True, 60), s("b", False, 95), s("c", False, 30), s("d", False, 10)], 2)
    assert [(c["text"], r["text"]) for c, r in pairs] == [("a", "d")]  # b is wrong, so it is never chosen


def test_pairs_need_a_sound_chosen_chain():
    # A right answer reached through wrong steps (score 1) is not preferred once a floor is set.
    ranked = [s("sound", True, 95), s("lucky", True, 1), s("w1", False, 40), s("w2", False, 1)]
    assert [(c["text"], r["text"]) for c, r in build_pairs(ranked, 2, min_chosen_score=90)] == [("sound", "w2")]
    assert len(build_pairs(ranked, 2, min_chosen_score=0)) == 2  # without the floor, "lucky" is chosen too
    assert build_pairs([s("lucky", True, 1), s("w", False, 1)], 2, min_chosen_score=90) == []


def test_pairs_closest_wrong_chain_as_rejected():
    ranked = [s("best", True, 95), s("good", True, 92), s("near", False, 80), s("far", False, 5), s("junk", False, 1)]
    assert [(c["text"], r["text"]) for c, r in build_pairs(ranked, 2)] == [("best", "junk"), ("good", "far")]
    pairs = build_pairs(ranked, 2, rejected="closest")
    assert [(c["text"], r["text"]) for c, r in pairs] == [("best", "near"), ("good", "far")]
    assert build_pairs([s("a", True, 95), s("b", True, 50)], 2, rejected="closest") == []  # no wrong chain


# ----------------------------------------------------------------------------------------------
# A micro end-to-end run of the main job: every stage cached as a micro model, one DPO round.


def micro_run(out):
    """A tiny world in out/data and every SFT stage as one random micro model, marked finished (the job reuses it)."""
    data.build_world(os.path.join(out, "data"), train_scenes=24, val_scenes=3, test_scenes=3)
    tok = data.load_tokenizer(os.path.join(out, "data", "tokenizer.json"))
    torch.manual_seed(0)
    vlm = VLM(get_config("micro", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"]))
    vlm.tokenizer = tok
    for stage in ("base", "reasoning", "summary", "vanilla", "summary-only"):
        vlm.save_pretrained(train_sft.stage_dir(out, stage))
        with open(os.path.join(train_sft.stage_dir(out, stage), train_sft.STAGE_DONE), "w") as f:
            json.dump({"stage": stage}, f)


def teacher_sampler(real_sampler):
    """A random micro policy writes gibberish, so every sample would tie. The real sampler still runs;
    scripted-teacher chains (one sound, two flawed) are added so the round has pairs to learn from."""
    def sampler(policy, rows, image_root, cfg, seed):
        chains = real_sampler(policy, rows, image_root, cfg, seed)
        sound = data.ScriptedTeacher(data.ErrorRates(**{f.name: 0.0 for f in dataclasses.fields(data.ErrorRates)}))
        flawed = data.ScriptedTeacher(data.ErrorRates(miscount=0.5, arithmetic_slip=0.5))
        rng = random.Random(seed)
        paths = {r["id"]: sound.generate(r, 1, rng) + flawed.generate(r, 2, rng) for r in rows}
        return {r["id"]: chains[r["id"]] + [data.render_chain(p["steps"]) for p in paths[r["id"]]] for r in rows}
    return sampler


def test_micro_round_end_to_end(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out)
    monkeypatch.setattr(train_dpo, "sample_chains", teacher_sampler(train_dpo.sample_chains))
    results = train_dpo.main(["--out", out, "--iters", "1", "--pool-size", "6", "--samples-per-question", "2",
                              "--max-chain-tokens", "8", "--batch-size", "4", "--val-size", "4", "--eval-limit", "4"])
    assert os.path.isfile(os.path.join(out, "reasoning_dpo1", "model.safetensors"))
    with open(os.path.join(out, "logs", "dpo.jsonl")) as f:
        events = [json.loads(line) for line in f]
    start = next(e for e in events if e.get("event") == "start_check")
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(e["elapsed_s"] >= 0 for e in events)  # the DPO part's wall time
    steps = [e for e in events if "step" in e]
    assert steps and all(math.isfinite(e["loss"]) for e in steps)
    assert "two_agent_dpo1" in results["arms"] and os.path.isfile(os.path.join(out, "results.md"))


def test_sft_seed_reaches_every_stage(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "card.json").write_text("{}")  # the world exists: only the stages are built
    seen = {}
    monkeypatch.setattr(train_sft, "run_stage", lambda stage, cfg: seen.setdefault(stage, cfg.seed))
    train_dpo.build_missing_stages(train_dpo.DPOConfig(out=str(tmp_path), sft_seed=7))
    assert seen == dict.fromkeys(train_sft.STAGES, 7)  # every stage, each with the given seed
    assert train_dpo.DPOConfig().sft_seed == train_sft.TrainConfig().seed  # the default job is unchanged
