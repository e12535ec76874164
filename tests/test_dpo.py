"""DPO by hand: the loss at known points, sequence log-probs against a hand sum, pairs, one micro round."""

import dataclasses
import json
import math
import os
import random

import pytest
import torch

import agents
import checkpoint
import data
import train_dpo
import train_sft
import world
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


def test_nll_weight_without_chosen_nll_is_a_named_error():
    pc, pr = torch.tensor([-6.0, -3.0]), torch.tensor([-2.0, -4.0])
    with pytest.raises(ValueError, match="nll_weight needs chosen_nll"):
        dpo_loss(pc, pr, pc, pr, beta=0.1, nll_weight=0.2)


def test_round_start_check_raises_a_named_error_when_the_reference_differs(monkeypatch):
    # A reference pass that scores the chosen chains 1 nat lower: the round's first loss is not ln 2. A named error,
    # not an assert, so it holds under python -O too.
    from test_gpu_path import host_side_pairs
    from test_train_sft import micro_model
    policy = micro_model()
    pairs = host_side_pairs(monkeypatch, policy, 2)
    real = train_dpo.sequence_logps

    def reference_off(model, batch, return_counts=False):
        out = real(model, batch, return_counts)
        if torch.is_grad_enabled():
            return out
        return out - torch.tensor([1.0] * (len(out) // 2) + [0.0] * (len(out) // 2))
    monkeypatch.setattr(train_dpo, "sequence_logps", reference_off)
    cfg = train_dpo.DPOConfig(batch_size=2, precision="fp32", lr=1e-4)
    with pytest.raises(train_dpo.ReferenceMismatch, match="not 0.693147"):
        train_dpo.dpo_round(policy, pairs, cfg, torch.device("cpu"), lambda record: None, 1, ".")


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


def micro_run(out, world_options=None, **job):
    """A tiny world in out/data (no hard split to evaluate, unless world_options, data.py's, ask) and every SFT stage
    as one random micro model, marked finished as the main job with these options (train_dpo.JobConfig's) leaves it,
    so that the job reuses it."""
    data.build_world(os.path.join(out, "data"), **{"train_scenes": 24, "val_scenes": 3, "test_scenes": 3,
                                                   "hard_val_scenes": 0, "hard_test_scenes": 0, **(world_options or {})})
    tok = data.load_tokenizer(os.path.join(out, "data", "tokenizer.json"))
    torch.manual_seed(0)
    vlm = VLM(get_config("micro", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"]))
    vlm.tokenizer = tok
    for stage in [s for s, spec in train_sft.STAGES.items() if not spec.get("after_rl")]:  # in order: a summary
        vlm.save_pretrained(checkpoint.stage_dir(out, stage))  # stage records the reasoning stage's id
        mark_finished(out, stage, **job)


def mark_finished(out, stage, **job):
    """The marker the main job with these options (train_dpo.JobConfig's) writes last on a stage it trained."""
    tcfg, extra, inputs = train_dpo.stage_plan(train_dpo.JobConfig(out=str(out), **job), stage)
    with open(os.path.join(checkpoint.stage_dir(str(out), stage), checkpoint.STAGE_DONE), "w") as f:
        # steps / wall_s: 1 step per 1000 s, so that a control matched to the rounds' time trains 1 step
        json.dump({"stage": stage, "steps": 1, "wall_s": 1000.0, **train_sft.stage_record(tcfg, extra, inputs)}, f)


def teacher_sampler(real_sampler):
    """A random micro policy writes gibberish, so every sample would tie. The real sampler still runs;
    scripted-teacher chains (one sound, two flawed) are added so the round has pairs to learn from."""
    def sampler(policy, rows, image_root, cfg, seed, **options):
        chains = real_sampler(policy, rows, image_root, cfg, seed, **options)
        sound = world.ScriptedTeacher(world.ErrorRates(**{f.name: 0.0 for f in dataclasses.fields(world.ErrorRates)}))
        flawed = world.ScriptedTeacher(world.ErrorRates(miscount=0.5, arithmetic_slip=0.5))
        rng = random.Random(seed)
        paths = {r["id"]: sound.generate(r, 1, rng) + flawed.generate(r, 2, rng) for r in rows}
        return {r["id"]: chains[r["id"]] + [data.render_chain(p["steps"]) for p in paths[r["id"]]] for r in rows}
    return sampler


def test_micro_round_end_to_end(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
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
    assert "two_agent_dpo1" in results["arms"] and os.path.isfile(os.path.join(out, "results_test_limit4.md"))


def test_iters_n_evaluates_rounds_1_to_n_and_a_rebuilt_round_makes_the_later_ones_out_of_date(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    args = ["--out", out, "--pool-size", "6", "--samples-per-question", "2", "--max-chain-tokens", "8",
            "--batch-size", "4", "--val-size", "4", "--eval-limit", "4", "--no-sft-more"]  # the rounds alone
    results = train_dpo.main(args + ["--iters", "2"])
    assert [a for a in results["arms"] if "dpo" in a] == ["two_agent_dpo1", "two_agent_dpo2"]
    results = train_dpo.main(args + ["--iters", "1"])  # round 1 cached: round 2 stays, but is not asked for
    assert [a for a in results["arms"] if "dpo" in a] == ["two_agent_dpo1"]
    assert checkpoint.finished(os.path.join(out, "reasoning_dpo2"))
    os.remove(os.path.join(out, "reasoning_dpo1", checkpoint.ROUND_DONE))  # as if round 1 had been interrupted
    results = train_dpo.main(args + ["--iters", "1"])  # round 1 trained again: round 2 came from the old one
    assert [a for a in results["arms"] if "dpo" in a] == ["two_agent_dpo1"]
    assert checkpoint.finished(os.path.join(out, "reasoning_dpo1"))
    assert not checkpoint.finished(os.path.join(out, "reasoning_dpo2")) and checkpoint.dpo_rounds(out) == {
        1: os.path.join(out, "reasoning_dpo1")}


def test_sft_seed_reaches_every_stage(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "card.json").write_text("{}")  # the world exists: only the stages are built
    seen = {}
    monkeypatch.setattr(train_sft, "run_stage", lambda stage, cfg, *_: seen.setdefault(stage, cfg.seed))
    train_dpo.build_missing_stages(train_dpo.DPOConfig(out=str(tmp_path), sft_seed=7, summary_chains=0))
    assert seen == {s: 7 for s, spec in train_sft.STAGES.items() if not spec.get("after_rl")}  # each with the seed
    assert train_dpo.DPOConfig().sft_seed == train_sft.TrainConfig().seed  # the default job is unchanged


# ----------------------------------------------------------------------------------------------
# Pairs aimed at greedy decoding's mistake


def scored(text, correct, score):
    """A chain as rank_samples scores it."""
    return {"text": text, "correct": correct, "score": score, "key": (int(correct), score)}


def aimed(candidates, greedy, cap=2, floor=90):
    return [(c["text"], r["text"]) for c, r in train_dpo.aimed_pairs(candidates, greedy, cap, floor)]


def test_aimed_pairs_need_a_wrong_greedy_chain():
    candidates = [scored("a", True, 100), scored("b", False, 40)]
    assert train_dpo.aimed_pairs(candidates, scored("g", True, 100), 2, 90) == []  # greedy right: nothing to fix


def test_aimed_pairs_best_sound_candidates_against_greedy():
    greedy = scored("g", False, 51)
    candidates = [scored("a", True, 92), scored("w", False, 60), scored("b", True, 100), scored("d", True, 95)]
    assert aimed(candidates, greedy, cap=2) == [("b", "g"), ("d", "g")]  # key order: 100, then 95
    assert aimed(candidates, greedy, cap=3) == [("b", "g"), ("d", "g"), ("a", "g")]
    assert aimed(candidates, greedy, cap=1) == [("b", "g")]
    pairs = train_dpo.aimed_pairs(candidates, greedy, 2, 90)
    assert all(r is greedy for _, r in pairs)  # the rejected chain is greedy's own record


def test_aimed_pairs_deduplicate_and_never_choose_greedys_text():
    greedy = scored("g", False, 51)
    twice = [scored("a", True, 100), scored("a", True, 100), scored("b", True, 95)]
    assert aimed(twice, greedy, cap=2) == [("a", "g"), ("b", "g")]  # "a" once, so "b" gets the second pair
    same = [scored("g", True, 100), scored("b", True, 95)]  # a candidate with greedy's text is skipped
    assert aimed(same, greedy, cap=2) == [("b", "g")]


def test_aimed_pairs_need_a_sound_correct_candidate():
    greedy = scored("g", False, 51)
    lucky = [scored("lucky", True, 89), scored("w", False, 95)]  # right answer, wrong steps; wrong answer
    assert aimed(lucky, greedy, floor=90) == []
    assert aimed(lucky, greedy, floor=0) == [("lucky", "g")]  # without the floor it is chosen
    assert aimed([scored("edge", True, 90)], greedy, floor=90) == [("edge", "g")]  # the floor itself passes
    assert aimed([], greedy) == []


# ----------------------------------------------------------------------------------------------
# Step-DPO: the prefix before the first wrong step


# A hand-made scene: a red circle at top left, a blue square at center, a red triangle at bottom right.
SCENE = [{"cell": "top left", "shape": "circle", "color": "red", "size": "small", "x": 8, "y": 8},
         {"cell": "center", "shape": "square", "color": "blue", "size": "large", "x": 24, "y": 24},
         {"cell": "bottom right", "shape": "triangle", "color": "red", "size": "small", "x": 40, "y": 40}]
RED_TWO = "Count: red objects at top left, bottom right, total 2.\n"
SOUND = ("<thoughts>\n" + RED_TWO + "Count: blue objects at center, total 1.\n"
         "Add: 2 + 1 = 3, so the answer is 3.\n</thoughts>")
WRONG_AT_1 = ("<thoughts>\n" + RED_TWO + "Count: blue objects at center, middle left, total 2.\n"
              "Add: 2 + 2 = 4, so the answer is 4.\n</thoughts>")
WRONG_AT_0 = ("<thoughts>\nCount: red objects at top left, total 1.\nCount: blue objects at center, total 1.\n"
              "Add: 1 + 1 = 2, so the answer is 2.\n</thoughts>")


def sum_row(qid="q0"):
    """'How many red objects and blue objects are there in total?' on SCENE: 2 + 1 = 3."""
    return {"id": qid, "image": "images/none.png",
            "question": "How many red objects and blue objects are there in total?", "answer": "3", "family": "sum",
            "kind": "reasoning", "objects": SCENE,
            "spec": {"family": "sum", "a": {"color": "red"}, "b": {"color": "blue"}}}


def test_hand_made_question_and_chains_are_as_labelled():
    row, scorer = sum_row(), data.SceneStepScorer()
    claims = world.solve(SCENE, row["spec"])
    assert world.answer_of(claims[-1], row["spec"]) == "3"
    assert SOUND == data.render_chain([world.to_step(c) for c in claims[:-1]] + [world.to_step(claims[-1], "3")])
    assert [scorer.first_error(row, t) for t in (SOUND, WRONG_AT_1, WRONG_AT_0)] == [None, 1, 0]


def test_first_error_prefix_keeps_the_steps_before_the_first_wrong_one():
    row, scorer = sum_row(), data.SceneStepScorer()
    assert train_dpo.first_error_prefix(row, WRONG_AT_1, scorer) == "<thoughts>\n" + RED_TWO
    assert train_dpo.first_error_prefix(row, WRONG_AT_0, scorer) == "<thoughts>\n"
    right_steps_wrong_answer = SOUND.replace("so the answer is 3", "so the answer is 4")
    assert train_dpo.first_error_prefix(row, right_steps_wrong_answer, scorer) == (
        "<thoughts>\n" + RED_TWO + "Count: blue objects at center, total 1.\n")  # all but the last step
    for text in (WRONG_AT_1, WRONG_AT_0, right_steps_wrong_answer):
        prefix = train_dpo.first_error_prefix(row, text, scorer)
        assert text.startswith(prefix) and "</thoughts>" not in prefix


def test_first_error_prefix_is_shared_by_chosen_and_rejected_text_and_tokens(tmp_path):
    """Step-DPO: the continued sound chain and the wrong one share the prefix, token for token."""
    data.build_world(str(tmp_path), train_scenes=4, val_scenes=1, test_scenes=1)
    tok = data.load_tokenizer(str(tmp_path))
    row = sum_row()
    prefix = train_dpo.first_error_prefix(row, WRONG_AT_1, data.SceneStepScorer())
    chosen = prefix + SOUND[len(prefix):]  # the prefix + a sound continuation
    assert chosen == SOUND and WRONG_AT_1.startswith(prefix)
    prompt, _ = data.render_conversation(tok, data.task_messages("reasoning", row["question"]), 9, True)
    shared = prompt + tok.encode(" " + prefix, add_special_tokens=False).ids  # what agents.complete continues
    for text in (chosen, WRONG_AT_1):
        ids, mask = data.render_conversation(tok, data.task_messages("reasoning", row["question"], text), 9)
        assert ids[:len(shared)] == shared and sum(mask[:len(shared)]) == len(shared) - len(prompt)


# ----------------------------------------------------------------------------------------------
# One round's pairs with --rejected greedy / first_error, on scripted chains


class ScriptedSampler:
    """Stands in for agents.sample_chains: the chains of each call come from a script, every call is recorded."""

    def __init__(self, *replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, policy, rows, image_root, cfg, seed, k=None, temperature=None, prefixes=None, desc="sampling"):
        self.calls.append({"ids": [r["id"] for r in rows], "k": k, "temperature": temperature, "prefixes": prefixes})
        reply = self.replies.pop(0)
        return {r["id"]: reply[r["id"]] for r in rows}


def pairs_of(pairs):
    return [(row["id"], chosen["text"], rejected["text"]) for row, chosen, rejected in pairs]


def test_round_pairs_greedy_rejects_the_greedy_chain_when_wrong(monkeypatch):
    pool = [sum_row("q0"), sum_row("q1"), sum_row("q2")]
    greedy = {"q0": [SOUND], "q1": [WRONG_AT_1], "q2": [WRONG_AT_1]}
    samples = {"q1": [WRONG_AT_0, SOUND], "q2": [WRONG_AT_1, WRONG_AT_0]}  # only greedy's wrong questions
    sampler = ScriptedSampler(greedy, samples)
    monkeypatch.setattr(agents, "sample_chains", sampler)
    cfg = train_dpo.DPOConfig(rejected="greedy", samples_per_question=2, min_chosen_score=90, pass_filter=False)
    pairs, stats = train_dpo.round_pairs(None, pool, "unused", cfg, 5, data.AnswerFilter(), data.SceneStepScorer())
    # q0: greedy is right; q2: no sound sample; q1: its sound sample against its greedy chain
    assert pairs_of(pairs) == [("q1", SOUND, WRONG_AT_1)]
    assert stats == {"sample_correct": pytest.approx(1 / 4), "greedy_correct": pytest.approx(1 / 3),
                     "kept_questions": 2}  # no --pass-filter: every question sampled
    assert [(c["ids"], c["k"], c["temperature"], c["prefixes"]) for c in sampler.calls] == [
        (["q0", "q1", "q2"], 1, 0.0, None), (["q1", "q2"], None, None, None)]


def test_round_pairs_first_error_continues_the_wrong_greedy_chains(monkeypatch):
    pool = [sum_row("q0"), sum_row("q1"), sum_row("q2")]
    greedy = {"q0": [SOUND], "q1": [WRONG_AT_1], "q2": [WRONG_AT_0]}
    p1 = "<thoughts>\n" + RED_TWO
    other_wrong = p1 + "Count: no blue objects, total 0.\nAdd: 2 + 0 = 2, so the answer is 2.\n</thoughts>"
    continued = {"q1": [SOUND, other_wrong], "q2": [WRONG_AT_0, "<thoughts>\nblue blue"]}
    sampler = ScriptedSampler(greedy, continued)
    monkeypatch.setattr(agents, "sample_chains", sampler)
    cfg = train_dpo.DPOConfig(rejected="first_error", samples_per_question=2, min_chosen_score=90, pass_filter=False)
    pairs, stats = train_dpo.round_pairs(None, pool, "unused", cfg, 5, data.AnswerFilter(), data.SceneStepScorer())
    # the continuation call: exactly the questions greedy got wrong, each from before its first wrong step
    continuing = sampler.calls[1]
    assert len(sampler.calls) == 2 and continuing["ids"] == ["q1", "q2"]
    assert continuing["prefixes"] == {"q1": p1, "q2": "<thoughts>\n"}
    # q2's continuations are all wrong: no pair
    assert pairs_of(pairs) == [("q1", SOUND, WRONG_AT_1)]
    assert all(c["text"].startswith(continuing["prefixes"][row["id"]]) for row, c, _ in pairs)
    assert stats["greedy_correct"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# The summary set with the reasoning agent's own chains


NO_SLIPS = world.ErrorRates(**{f.name: 0.0 for f in dataclasses.fields(world.ErrorRates)})


def other_answer(answer):
    if answer.isdigit():
        return str(int(answer) + 1)
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    return next(a for a in list(world.COLORS) + list(world.SHAPES) if a != answer)


@pytest.mark.parametrize("high, mid, buckets", [(90, 50, ("high", "mid", "low")),  # the default thresholds
                                                (50, 2, ("high", "high", "low"))])  # the world's --high / --mid
def test_on_policy_summary_set_adds_the_agents_chains_on_training_questions(tmp_path, monkeypatch, high, mid, buckets):
    out = str(tmp_path / "out")
    data_dir = os.path.join(out, "data")
    data.build_world(data_dir, train_scenes=4, val_scenes=2, test_scenes=2, high=high, mid=mid)
    tok = data.load_tokenizer(data_dir)
    torch.manual_seed(0)
    vlm = VLM(get_config("micro", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"]))
    vlm.tokenizer = tok
    vlm.save_pretrained(checkpoint.stage_dir(out, "reasoning"))
    train = data.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    teacher = data.read_jsonl(os.path.join(data_dir, "summary_sft.jsonl"))

    sound = {r["id"]: world.ScriptedTeacher(NO_SLIPS).path(r, random.Random(0))["steps"] for r in train}

    def untidy(steps):  # the agent's own formatting: stray spaces, blank lines, no end tag
        return "<thoughts>\n" + "".join(f"  {s['title']}: {s['content']}  \n\n" for s in steps)

    def wrong_conclusion(r):  # the sound steps, then another answer
        steps = [dict(s) for s in sound[r["id"]]]
        steps[-1]["content"] = steps[-1]["content"].replace(f"answer is {r['answer']}.",
                                                            f"answer is {other_answer(r['answer'])}.")
        return data.render_chain(steps)

    chains = {r["id"]: [untidy(sound[r["id"]]), wrong_conclusion(r), "blue blue blue"] for r in train}
    calls = []

    def sampler(policy, rows, image_root, cfg, seed, k=None, temperature=None, prefixes=None, desc="sampling"):
        calls.append((type(policy), [r["id"] for r in rows], k, temperature, prefixes))
        return {r["id"]: chains[r["id"]][:k] for r in rows}
    monkeypatch.setattr(agents, "sample_chains", sampler)

    cfg = train_dpo.DPOConfig(out=out, summary_chains=3, summary_temperature=0.7)
    name = agents.on_policy_summary_set(cfg, data_dir, torch.device("cpu"))
    assert name == "summary_onpolicy_sft.jsonl"
    assert calls == [(VLM, [r["id"] for r in train], 3, 0.7, None)]  # the SFT reasoning agent, every train question
    written = data.read_jsonl(os.path.join(data_dir, name))
    new = [r for r in written if str(r.get("path")).startswith("agent")]
    dumps = sorted(json.dumps(r, sort_keys=True) for r in written if r not in new)
    assert dumps == sorted(json.dumps(r, sort_keys=True) for r in teacher)  # every teacher row, unchanged
    assert len(new) == 3 * len(train) and len(written) == len(teacher) + 3 * len(train)

    teacher_keys = {frozenset(r) for r in teacher if r["task"] == "summary"}
    assert len(teacher_keys) == 1 and all(set(r) == set(next(iter(teacher_keys))) for r in new)
    truth = {r["id"]: r for r in train}
    assert {r["id"] for r in new} == set(truth)  # training questions only: no val or test id
    expected = {  # path -> (chain, chain_correct, bucket): scores 100 (sound), 51 (right steps, wrong answer), 1 (junk)
        "agent0": lambda r: (data.render_chain(sound[r["id"]]), True, buckets[0]),
        "agent1": lambda r: (wrong_conclusion(r), False, buckets[1]),
        "agent2": lambda r: ("<thoughts>\n: blue blue blue\n</thoughts>", False, buckets[2])}
    for r in new:
        q = truth[r["id"]]
        assert r["task"] == "summary" and r["answer"] == q["answer"]
        assert all(r[k] == q[k] for k in ("image", "question", "family", "kind"))
        assert (r["chain"], r["chain_correct"], r["bucket"]) == expected[r["path"]](q)
        assert r["chain"] == data.render_chain(data.parse_chain(chains[r["id"]][int(r["path"][-1])]))
    assert sorted(r["path"] for r in new) == sorted(["agent0", "agent1", "agent2"] * len(train))


def test_summary_stages_train_on_the_on_policy_set_built_once(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "card.json").write_text("{}")  # the world exists: only the stages are built
    seen, built = {}, []
    monkeypatch.setattr(train_sft, "run_stage", lambda stage, cfg, *_: seen.setdefault(stage, cfg.data_file))
    monkeypatch.setattr(agents, "on_policy_summary_set",
                        lambda cfg, data_dir, device: built.append(data_dir) or "summary_onpolicy_sft.jsonl")
    train_dpo.build_missing_stages(train_dpo.DPOConfig(out=str(tmp_path), summary_chains=2, device="cpu"))
    assert built == [os.path.join(str(tmp_path), "data")]  # once, for both summary stages
    assert seen == {"base": None, "reasoning": None, "summary": "summary_onpolicy_sft.jsonl", "vanilla": None,
                    "summary-only": "summary_onpolicy_sft.jsonl"}
    seen.clear()
    train_dpo.build_missing_stages(train_dpo.DPOConfig(out=str(tmp_path), summary_chains=0, device="cpu"))
    sft = [s for s, spec in train_sft.STAGES.items() if not spec.get("after_rl")]
    assert len(built) == 1 and seen == dict.fromkeys(sft)  # 0 chains: the teacher's set, no build


def test_summary_only_stage_alone_still_gets_the_on_policy_set(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "card.json").write_text("{}")
    for stage in ("base", "reasoning", "summary", "vanilla"):  # finished earlier: reused
        os.makedirs(checkpoint.stage_dir(str(tmp_path), stage))
        mark_finished(tmp_path, stage, summary_chains=1)
    seen, built = {}, []
    monkeypatch.setattr(train_sft, "run_stage", lambda stage, cfg, *_: seen.setdefault(stage, cfg.data_file))
    monkeypatch.setattr(agents, "on_policy_summary_set",
                        lambda cfg, data_dir, device: built.append(device) or "summary_onpolicy_sft.jsonl")
    train_dpo.build_missing_stages(train_dpo.DPOConfig(out=str(tmp_path), summary_chains=1, device="cpu"))
    assert seen == {"summary-only": "summary_onpolicy_sft.jsonl"} and built == [torch.device("cpu")]
