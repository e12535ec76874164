"""Data parallelism on the CPU: 2 processes (gloo, in the environment torchrun gives them) reproduce the numbers of one
process for SFT steps with a resume, a DPO round, GRPO updates and sampling. Each job runs once in this process and
once in each of 2 spawned ones, and the tests compare what they return. Slow: the scripts themselves, under torchrun
(train_sft.py) and in 2 spawned processes (the DPO job, then GRPO)."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import agents
import checkpoint
import common
import data
import train_dpo
import train_grpo
import train_sft
from model import get_config
from test_dpo import micro_run, teacher_sampler
from test_train_sft import loop_config, logged, micro_model, synthetic_examples

WORLD = 2
CPU = torch.device("cpu")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, limit_s=120):
    """fn(rank, *args) in 2 processes; a hang fails the test instead of waiting out the process group's timeout."""
    context, deadline = mp.start_processes(fn, args=args, nprocs=WORLD, join=False), time.monotonic() + limit_s
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):  # raises if a process failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {limit_s}s")


def as_torchrun(rank, port):
    """A spawned process's environment, as torchrun --standalone sets it; one thread each, as 2 share 2 cores."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# The jobs: each (out_dir, patch) -> what to compare; patch.setattr stands in for a test double.


def sft_job(out, patch):
    """3 steps of 8 rows, a val loss at every step, then a resume to step 5. --grad-accum 1: each step's rows are cut
    into micro-batches of at most 4, shared by the 2 processes (an epoch's last step of 2 rows may leave one none)."""
    model = micro_model()
    examples, val = synthetic_examples(model, 10), synthetic_examples(model, 5, seed=1)  # val: 1 batch of 8
    cfg = loop_config(batch_size=8, grad_accum=1, max_steps=3, eval_every=1)
    train_sft.train_loop(model, examples, val, cfg, str(out / "sft"), str(out / "sft.jsonl"), "sft")
    resumed = micro_model(seed=1)  # other initial weights: everything comes from train_state.pt, on every process
    train_sft.train_loop(resumed, examples, val, train_sft.TrainConfig(**{**vars(cfg), "max_steps": 5, "resume": True}),
                         str(out / "sft"), str(out / "sft.jsonl"), "sft")
    return {"state": resumed.state_dict()}


def host_side_pairs(patch, policy, n):
    """n (chosen, rejected) pairs of encoded examples, as dpo_round's encode_pairs would give (test_gpu_path's)."""
    patch.setattr(train_dpo, "encode_pairs", lambda pairs, *a: pairs)
    patch.setattr(train_dpo.data, "special_ids", lambda tok: {"pad": 0})
    return [[c, r] for c, r in zip(synthetic_examples(policy, n, seed=1), synthetic_examples(policy, n, seed=2))]


def dpo_job(out, patch):
    """5 pairs in batches of 4: the last batch has 1 pair, so process 1 runs a stand-in counted as 0; 2 epochs."""
    policy = micro_model()
    pairs = host_side_pairs(patch, policy, 5)
    cfg = train_dpo.DPOConfig(batch_size=4, precision="fp32", lr=1e-3, warmup_steps=0, epochs=2)
    records = []
    stats = train_dpo.dpo_round(policy, pairs, cfg, CPU, records.append, 1, ".")
    return {"log": records, "stats": stats, "state": policy.state_dict()}


def grpo_job(out, patch):
    """Two GRPO steps: 3 chains (2 and 1 per process, in micro-batches of 1), then 1 chain (process 1: a stand-in)."""
    policy, ref = micro_model(), micro_model().train().requires_grad_(False)
    cfg = train_grpo.GRPOConfig(precision="fp32", lr=1e-3, warmup_steps=0, steps=2, micro_batch=1, ppo_epochs=2,
                                kl_coef=0.1)
    opt = policy.configure_optimizers(0.0, cfg.lr, 0.0, cfg.lr, freeze_vision=True)
    model, scaler = common.data_parallel(policy), common.make_scaler(CPU, "fp32")
    chains = synthetic_examples(policy, 3, seed=3)
    metrics = [train_grpo.grpo_step(model.train(), ref, opt, scaler, examples, step, cfg, CPU, 0, "nothing saved")
               for step, examples in enumerate([list(zip(chains, [1.0, -0.5, 0.25])), [(chains[1], -1.0)]])]
    return {"metrics": metrics, "state": policy.state_dict()}


def sample_job(out, patch):
    """7 questions, 2 per decoding batch: process 0 decodes batches 0 and 2, process 1 batches 1 and 3."""
    def complete(vlm, conversations, images, max_new_tokens, temperature, top_p, num_samples, seed, **kw):
        return [f"{c[0]['content'].split()[0]} seed {seed} sample {s}" for c in conversations
                for s in range(num_samples)]
    patch.setattr(agents, "complete", complete)
    patch.setattr(agents.data, "load_image", lambda path, size: torch.zeros(3, size, size))
    policy = SimpleNamespace(config=get_config("micro"))
    rows = [{"id": f"q{i}", "question": f"q{i}?", "image": "none.png"} for i in range(7)]
    cfg = train_dpo.DPOConfig(sample_batch=4, samples_per_question=2)
    return {"sampled": agents.sample_chains(policy, rows, ".", cfg, seed=10),
            "greedy": agents.sample_chains(policy, rows, ".", cfg, seed=20, k=1, temperature=0.0)}


def stages_job(out, patch):
    """The SFT stages train_dpo.py builds (train_sft.run_stage stubbed): their batch and accumulation."""
    os.makedirs(out / "stages" / "data", exist_ok=True)
    (out / "stages" / "data" / "card.json").write_text("{}")  # the world exists: only the stages are built
    seen = {}
    patch.setattr(train_sft, "run_stage", lambda stage, cfg, *_: seen.setdefault(stage, (cfg.batch_size, cfg.grad_accum)))
    train_dpo.build_missing_stages(train_dpo.DPOConfig(out=str(out / "stages"), summary_chains=0))
    return seen


JOBS = {"sft": sft_job, "dpo": dpo_job, "grpo": grpo_job, "sample": sample_job, "stages": stages_job}


# ----------------------------------------------------------------------------------------------
# Running them in one process and in two


def worker(rank, port, out):
    """One of the 2 processes: every job, then the helpers; its results go to out/rank{rank}.pt."""
    as_torchrun(rank, port)
    place, results = common.setup_distributed("cpu"), {}
    results.update({name: job(out / "ddp", SimpleNamespace(setattr=setattr)) for name, job in JOBS.items()})
    results["helpers"] = {"place": place, "rank0": common.on_rank0(lambda: rank),
                          "gathered": common.all_gather(rank),
                          "summed": common.all_reduce_sum(torch.tensor([1.0, rank])).tolist()}
    torch.save(results, out / f"rank{rank}.pt")
    common.cleanup_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(worker, free_port(), out)
    with pytest.MonkeyPatch.context() as patch:
        one = {name: job(out / "one", patch) for name, job in JOBS.items()}
    return out, one, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_same_weights(a, b):
    # Adam divides by |grad|: float noise on a near-zero gradient moves a weight by a little of the lr (test_train_sft)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=3e-5)


# ----------------------------------------------------------------------------------------------
# The tests


def test_helpers_and_the_process_group(runs):
    _, _, ranks = runs
    for rank, r in enumerate(ranks):
        assert r["helpers"] == {"place": (rank, WORLD, CPU), "rank0": 0, "gathered": [0, 1], "summed": [2.0, 1.0]}
    assert common.setup_distributed("cpu") == (0, 1, CPU) and common.distributed() == (0, 1)  # no torchrun
    assert not dist.is_initialized()


def test_sft_steps_val_loss_and_resume_match_one_process(runs):
    out, one, ranks = runs
    for key in ("loss", "val_loss", "grad_norm", "lr"):
        assert logged(out / "ddp" / "sft.jsonl", key) == pytest.approx(logged(out / "one" / "sft.jsonl", key), rel=1e-5)
    assert logged(out / "ddp" / "sft.jsonl", "step") == [1, 2, 3, 4, 5]  # rank 0 alone writes the log
    for r in ranks:  # every process resumed from train_state.pt, and ends with the one-process weights
        assert_same_weights(r["sft"]["state"], one["sft"]["state"])


def test_dpo_round_matches_one_process(runs):
    _, one, ranks = runs
    assert sorted(e["pairs"] for e in one["dpo"]["log"] if "step" in e) == [1, 1, 4, 4]  # 2 epochs of 2 batches
    for r in ranks:
        log = r["dpo"]["log"]
        assert log[0]["event"] == "start_check" and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # its part
        assert len(log) == len(one["dpo"]["log"])
        for a, b in zip(log[1:], one["dpo"]["log"][1:]):
            assert a.keys() == b.keys() and a["pairs"] == b["pairs"]
            assert [a[k] for k in a] == pytest.approx([b[k] for k in a], rel=1e-5, abs=1e-7)
        assert r["dpo"]["stats"] == pytest.approx(one["dpo"]["stats"], rel=1e-5, abs=1e-7)
        assert_same_weights(r["dpo"]["state"], one["dpo"]["state"])


def test_grpo_updates_match_one_process(runs):
    _, one, ranks = runs
    assert all(math.isfinite(m["loss"]) and m["kl"] >= 0 for m in one["grpo"]["metrics"])
    for r in ranks:
        for a, b in zip(r["grpo"]["metrics"], one["grpo"]["metrics"]):
            assert a.keys() == b.keys()
            assert [a[k] for k in a] == pytest.approx([b[k] for k in a], rel=1e-5, abs=1e-7)
        assert_same_weights(r["grpo"]["state"], one["grpo"]["state"])


def test_sampling_is_shared_and_gathered_as_one_process_draws_it(runs):
    _, one, ranks = runs
    assert list(one["sample"]["sampled"]) == [f"q{i}" for i in range(7)]
    assert one["sample"]["sampled"]["q4"] == ["q4? seed 12 sample 0", "q4? seed 12 sample 1"]  # batch 2: seed + 2
    for r in ranks:  # the same chains, with the same seeds, in the rows' order, on every process
        assert r["sample"] == one["sample"]
        assert list(r["sample"]["sampled"]) == list(one["sample"]["sampled"])


def test_train_dpo_builds_the_sft_stages_with_32_rows_a_step(runs):
    _, one, ranks = runs
    for r in [one, *ranks]:  # the processes share each step's micro-batches (train_sft.step_batches)
        assert r["stages"] == {s: (32, 1) for s, spec in train_sft.STAGES.items() if not spec.get("after_rl")}


# ----------------------------------------------------------------------------------------------
# The scripts themselves


@pytest.mark.slow
def test_torchrun_trains_a_stage_as_one_process(tmp_path):
    """The command itself: torchrun starts 2 processes of train_sft.py, and they log the one-process losses."""
    data.build_world(str(tmp_path / "data"), train_scenes=12, val_scenes=2, test_scenes=2, paths_per_question=2)
    args = ["--stage", "base", "--preset", "micro", "--device", "cpu", "--precision", "fp32", "--max-steps", "3",
            "--batch-size", "4", "--grad-accum", "2", "--eval-every", "1"]
    for out in ("one", "two"):
        (tmp_path / out).mkdir()
        os.symlink(tmp_path / "data", tmp_path / out / "data")
    train_sft.main(args + ["--out", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(ROOT / "train_sft.py"), *args, "--out", str(tmp_path / "two")]
    subprocess.run(command, check=True, env=env, timeout=120)
    for key in ("loss", "val_loss", "grad_norm"):
        assert logged(tmp_path / "two" / "logs" / "base.jsonl", key) == pytest.approx(
            logged(tmp_path / "one" / "logs" / "base.jsonl", key), rel=1e-5)
    assert os.path.isfile(tmp_path / "two" / "base" / checkpoint.STAGE_DONE)


# The main jobs on a micro world, as tests/test_dpo.py and tests/test_grpo.py run them; in fp32, as bf16 rounds the
# gradient of each process's part on its own.
MAIN_JOBS = [(train_dpo, ["--iters", "1", "--pool-size", "6", "--samples-per-question", "2", "--max-chain-tokens", "8",
                          "--batch-size", "4", "--val-size", "4", "--eval-limit", "4", "--precision", "fp32",
                          "--sft-more"]),  # the control reads the round's marker that rank 0 writes
             (train_grpo, ["--steps", "2", "--questions-per-step", "3", "--group-size", "2", "--max-chain-tokens", "8",
                           "--micro-batch", "2", "--eval-every", "1", "--val-size", "4", "--eval-limit", "4",
                           "--precision", "fp32"])]


def main_jobs_worker(rank, port, out):
    """The DPO job, then GRPO, in one of 2 processes, on the micro world of out/two."""
    as_torchrun(rank, port)
    agents.sample_chains = teacher_sampler(agents.sample_chains)  # this process's own copy of the module
    # Each main sets up the process group and leaves it at the end; a process joins one group once, so here the
    # group is left after both.
    cleanup, common.cleanup_distributed = common.cleanup_distributed, lambda: None
    for script, args in MAIN_JOBS:
        script.main(["--out", str(out / "two"), *args])
    cleanup()


@pytest.mark.slow
def test_the_dpo_and_grpo_jobs_in_two_processes_log_the_one_process_steps(tmp_path, monkeypatch):
    for out in ("one", "two"):
        micro_run(str(tmp_path / out), max_chain_tokens=8, precision="fp32")
    spawn(main_jobs_worker, free_port(), tmp_path)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    for script, args in MAIN_JOBS:
        script.main(["--out", str(tmp_path / "one"), *args])
    for log in ("dpo.jsonl", "grpo.jsonl"):
        one, two = ([json.loads(line) for line in (tmp_path / out / "logs" / log).read_text().splitlines()]
                    for out in ("one", "two"))
        assert [r.get("event") for r in two] == [r.get("event") for r in one]  # rank 0 alone logs
        for a, b in zip(two, one):
            keys = [k for k in b if isinstance(b[k], float) and k not in ("elapsed_s", "wall_s")  # timings
                    and not k.startswith("val/") and k != "weight_change"]
            # abs: a DPO reward is beta x a difference of summed log-probs near -20, each good to about 1e-6 in fp32
            assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5, abs=1e-5), log
            # a difference of nearly equal weights, divided by their norm: the two rounding orders show in it
            assert a.get("weight_change") == pytest.approx(b.get("weight_change"), rel=1e-2), log
    for out in ("one", "two"):
        for arm in ("reasoning_dpo1", "reasoning_grpo", "reasoning-more"):
            assert os.path.isfile(tmp_path / out / arm / "model.safetensors")
        assert os.path.isfile(tmp_path / out / "results_test_limit4.md")  # --eval-limit: its own file
