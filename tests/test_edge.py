"""RL at the edge: the pass-rate filter, the weight change, the compute-matched controls and the hard test split."""

import json
import os
import shutil

import pytest
import torch

import agents
import checkpoint
import data
import eval as E
import plots
import train_dpo
import train_grpo
from test_dpo import micro_run, teacher_sampler
from test_errors import DPO_ARGS as SMALL

DPO_ARGS = [a for a in SMALL if a != "--no-sft-more"]  # the job as it runs by default: with its control
WORLD = {"hard_val_scenes": 1, "hard_test_scenes": 2}  # a micro world with both hard splits


def sample(text, correct, score):
    return {"text": text, "correct": correct, "score": score, "key": (int(correct), score)}


# ----------------------------------------------------------------------------------------------
# The pass-rate filter: some, not all, of a question's samples are strict passes (right and sound)

def test_the_pass_rate_filter_keeps_exactly_the_questions_with_some_but_not_all_strict_passes():
    def group(passes, k=4):  # `passes` right and High; the rest split between right-but-unsound and wrong-but-High
        return [sample(f"s{i}", True, 95) if i < passes else sample(f"s{i}", i % 2 == 0, 50 if i % 2 == 0 else 100)
                for i in range(k)]
    assert [agents.at_the_edge(group(p), 90) for p in range(5)] == [False, True, True, True, False]
    assert not agents.at_the_edge([sample("a", True, 89), sample("b", False, 100)], 90)  # neither is a strict pass
    assert agents.at_the_edge([sample("a", True, 90), sample("b", True, 89)], 90)  # the threshold counts


def test_round_pairs_learn_only_from_the_questions_at_the_edge(monkeypatch):
    scripted = {"none": [sample("w1", False, 40), sample("w2", False, 60)],  # 0 strict passes of 2
                "all": [sample("r1", True, 95), sample("r2", True, 100)],  # 2 of 2
                "edge": [sample("r3", True, 95), sample("w3", False, 30)]}  # 1 of 2
    monkeypatch.setattr(agents, "sample_chains", lambda policy, rows, *a, **k: {r["id"]: [] for r in rows})
    monkeypatch.setattr(agents, "rank_samples", lambda row, texts, *a: scripted[row["id"]])
    pool = [{"id": name} for name in scripted]
    for edge in (False, True):
        cfg = train_dpo.DPOConfig(rejected="worst", samples_per_question=2, pass_filter=edge)
        pairs, stats = train_dpo.round_pairs(None, pool, ".", cfg, 0, None, None)
        assert sorted(r["id"] for r, _, _ in pairs) == (["edge"] if edge else ["all", "edge"])
        assert stats["kept_questions"] == (1 if edge else 3)
    assert [(c["text"], w["text"]) for _, c, w in pairs] == [("r3", "w3")]  # sound and right over its own wrong


# ----------------------------------------------------------------------------------------------
# How far a round moved the weights

def test_weight_change_by_hand():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))  # ||theta_0|| = 5
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert train_dpo.weight_change(layer, start) == 0.0
    with torch.no_grad():
        layer.weight += torch.tensor([[0.6, 0.8]])  # ||theta - theta_0|| = 1
    assert train_dpo.weight_change(layer, start) == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------
# The controls: as many SFT steps as the rounds' wall time buys; the teacher bound on flawless chains

def marker_update(path, **changes):
    with open(path) as f:
        record = json.load(f)
    with open(path, "w") as f:
        json.dump({**record, **changes}, f)


def test_the_controls_train_as_long_as_the_rounds_took_and_follow_them(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8, precision="fp32")
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    argv = ["--out", out, *DPO_ARGS, "--val-size", "2", "--eval-limit", "1"]
    assert "two_agent_sft_more" not in train_dpo.main(argv + ["--no-sft-more"])["arms"]  # the round alone
    # The reasoning stage made 10 steps in 100 s; the round took 30 s: each control gets 3 steps.
    marker_update(os.path.join(out, "reasoning", checkpoint.STAGE_DONE), steps=10, wall_s=100.0)
    marker_update(os.path.join(out, "reasoning_dpo1", checkpoint.ROUND_DONE), wall_s=30.0)
    results = train_dpo.main(argv + ["--teacher-bound"])  # and the compute-matched SFT, on by default
    for stage in ("reasoning-more", "reasoning-teacher-hard"):
        done = checkpoint.marker(os.path.join(out, stage))
        assert done["steps"] == 3 and done["options"]["max_steps"] == 3 and "reasoning_dpo1" in done["inputs"]
    assert {"two_agent_sft_more", "two_agent_teacher_hard"} <= set(results["arms"])
    assert "two_agent_dpo1 vs two_agent_sft_more (chain)" in results["paired"]
    teacher = data.read_jsonl(os.path.join(out, "data", "teacher-seed0-hard.jsonl"))
    rows = data.read_jsonl(os.path.join(out, "data", "reasoning_teacher_hard.jsonl"))
    assert len(rows) == len(teacher) == 6 and all(len(r["objects"]) == 8 for r in teacher)  # pool size x rounds
    scorer = data.SceneStepScorer()
    assert all(scorer.score(q, [r["chain"]]) == [100] for q, r in zip(teacher, rows))  # flawless chains
    capsys.readouterr()
    train_dpo.main(argv + ["--rebuild", "dpo"])  # a new round 1: its control is trained again
    assert "[stage] reasoning-more: building it again (its reasoning_dpo1 was rebuilt)" in capsys.readouterr().out
    assert "two_agent_sft_more" in E.arm_checkpoints(out, rounds=1)
    assert "two_agent_sft_more" not in E.arm_checkpoints(out, rounds=0)  # matched to round 1, not to none
    os.remove(os.path.join(out, "reasoning-more", checkpoint.STAGE_DONE))  # as if interrupted, with a train state
    with open(os.path.join(out, "reasoning-more", "train_state.pt"), "w") as f:
        f.write("not a train state")  # a control is not resumed: it starts over
    train_dpo.main(argv)
    assert checkpoint.finished(os.path.join(out, "reasoning-more"))
    with open(os.path.join(out, "reasoning_dpo1", checkpoint.ROUND_DONE)) as f:
        record = {k: v for k, v in json.load(f).items() if k != "wall_s"}  # a round from before wall times
    with open(os.path.join(out, "reasoning_dpo1", checkpoint.ROUND_DONE), "w") as f:
        json.dump(record, f)
    assert "two_agent_dpo1" in train_dpo.main(argv + ["--no-sft-more"])["arms"]  # no control: the round as it is
    with pytest.raises(SystemExit, match="built before their wall time was recorded: add --rebuild dpo$"):
        train_dpo.main(argv)  # the default job builds the control


# ----------------------------------------------------------------------------------------------
# The hard test split beside the standard one, in results.json and pooled over runs

def test_a_micro_job_at_the_edge_and_the_hard_split_beside_the_standard_one(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out, WORLD, max_chain_tokens=8, precision="fp32")
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    # The defaults: the hard pool, the filter (the teacher sampler's sound chain: 1 strict pass of 4), the worst
    # sample as rejected, the compute-matched SFT
    results = train_dpo.main(["--out", out, *DPO_ARGS, "--val-size", "2", "--eval-limit", "2"])
    done = checkpoint.marker(os.path.join(out, "reasoning_dpo1"))
    assert done["options"]["pass_filter"] and done["options"]["hard_pool"] and done["options"]["rejected"] == "worst"
    assert done["pairs"] > 0 and done["weight_change"] > 0
    assert 0 < done["kept_questions"] <= 6
    hard = results["hard"]
    assert list(hard["arms"]) == ["two_agent", "two_agent_sft_more", "two_agent_dpo1"]  # the two agents' arms only
    for m in hard["arms"].values():
        assert {"overall", "reasoning", "perception", "chain_correct", "n"} <= m.keys() and m["n"] == 2  # --eval-limit
    assert "two_agent_dpo1 vs two_agent_sft_more" in hard["paired"]
    assert "two_agent_dpo1 vs two_agent_sft_more" in results["paired"]  # and on the standard split
    with open(E.results_stem(out, limit=2) + ".md") as f:  # --eval-limit 2
        assert "The hard test split" in f.read()
    other = str(tmp_path / "other")
    shutil.copytree(out, other)
    summary = E.summarize([E.results_stem(run, limit=2) + ".json" for run in (out, other)])
    pooled = summary["hard"]["pooled"]["two_agent_dpo1 vs two_agent_sft_more"]
    test = hard["paired"]["two_agent_dpo1 vs two_agent_sft_more"]
    assert (pooled["b"], pooled["c"], pooled["runs"]) == (2 * test["b"], 2 * test["c"], 2)
    assert "| hard: chains right |" in plots.summary_markdown(summary)
    results = train_grpo.main(["--out", out, "--steps", "1", "--questions-per-step", "3", "--group-size", "3",
                               "--micro-batch", "8", "--max-chain-tokens", "8", "--precision", "fp32",
                               "--eval-limit", "2", "--val-size", "2"])  # its defaults: at the edge, gated
    grpo = checkpoint.marker(os.path.join(out, "reasoning_grpo"))
    assert grpo["options"]["pass_filter"] and grpo["options"]["reward"] == "gated" and grpo["weight_change"] > 0
    assert "two_agent_grpo" in results["arms"] and "two_agent_grpo vs two_agent_sft_more" in results["hard"]["paired"]


# ----------------------------------------------------------------------------------------------
# GRPO: only the groups at the edge train

def test_grpo_trains_only_the_groups_at_the_edge(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8, precision="fp32")
    rows = data.read_jsonl(os.path.join(out, "data", "train.jsonl"))[:3]
    scripted = {rows[0]["id"]: [sample("a", True, 95), sample("b", False, 20)],  # at the edge
                rows[1]["id"]: [sample("c", True, 95), sample("d", True, 92)],  # both strict passes: rewards differ
                rows[2]["id"]: [sample("e", False, 10), sample("f", False, 80)]}  # never right
    monkeypatch.setattr(agents, "sample_chains", lambda policy, rs, *a, **k: {r["id"]: ["x"] * 2 for r in rs})
    monkeypatch.setattr(agents, "rank_samples", lambda row, texts, *a: scripted[row["id"]])
    policy = train_dpo.VLM.from_pretrained(os.path.join(out, "reasoning"))
    for edge, trained in ((False, 2), (True, 1)):  # the last group ties at 0 under the gated reward anyway
        cfg = train_grpo.GRPOConfig(out=out, group_size=2, reward="gated", pass_filter=edge)
        examples, stats = train_grpo.rollout(policy, rows, os.path.join(out, "data"), cfg, 0, (None, None))
        assert len(examples) == 2 * trained and stats["skipped_groups"] == 3 - trained
