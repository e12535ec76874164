"""Nothing stale, nothing mixed. Every cached product (the world, an SFT stage, a DPO round, a GRPO run) records the
options it was built with and the ids of the products it was built from: it is reused only while both hold, a changed
option is a one-line error naming it and the flag that rebuilds it, and a rebuilt input makes everything built from it
out of date. A resumed run checks the same record. One run per output directory. A write that fails names its file."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import agents
import checkpoint
import common
import data
import eval as E
import train_dpo
import train_grpo
import train_sft
from test_dpo import mark_finished, micro_run, teacher_sampler
from test_errors import DPO_ARGS, base_run, copy_run, one_line_exit  # noqa: F401 (base_run: a fixture)
from test_train_sft import built_world  # noqa: F401 (base_run's fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = dict(max_chain_tokens=8, precision="fp32")  # the options of DPO_ARGS that the SFT stages record


def weights(path):
    return train_dpo.VLM.from_pretrained(path).state_dict()


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A micro run directory with every SFT stage cached -> (its path, the main job's argv on it)."""
    out = str(tmp_path / "out")
    micro_run(out, **JOB)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    return out, ["--out", out, *DPO_ARGS]


# ----------------------------------------------------------------------------------------------
# Cached products are reused only with their options, and only while their inputs are the ones they were built from


def test_a_cached_dpo_round_with_other_options_is_refused_and_rebuilt_only_when_asked(job):
    out, argv = job
    train_dpo.main(argv)
    round1 = os.path.join(out, "reasoning_dpo1")
    before = weights(round1)
    assert one_line_exit(train_dpo.main, argv + ["--lr", "1e-3", "--beta", "0.5"]) == (
        f"error: {round1} was built with beta=0.1, not 0.5: pass the same option, or add --rebuild dpo")  # the first
    assert one_line_exit(train_dpo.main, argv + ["--seed", "7"]) == (  # the seed samples the summary set too
        f"error: {os.path.join(out, 'summary')} was built with summary_set.seed=0, not 7: pass the same option, or "
        f"add --rebuild summary")
    assert all(torch.equal(before[k], v) for k, v in weights(round1).items())  # nothing was touched
    train_dpo.main(argv + ["--lr", "1e-3", "--rebuild", "dpo"])
    assert checkpoint.marker(round1)["options"]["lr"] == 1e-3
    assert not all(torch.equal(before[k], v) for k, v in weights(round1).items())
    assert one_line_exit(train_dpo.main, argv).endswith("not 1e-05: pass the same option, or add --rebuild dpo")


def test_a_hard_pool_round_samples_larger_scenes_and_is_no_cached_world_pool_round(job):
    out, argv = job
    train_dpo.main(argv + ["--no-hard-pool"])
    assert one_line_exit(train_dpo.main, argv).endswith(  # the default pool is the hard one
        "was built with hard_pool=False, not True: pass the same option, or add --rebuild dpo")
    train_dpo.main(argv + ["--rebuild", "dpo"])
    pool = data.read_jsonl(os.path.join(out, "data", "dpo1-seed0-hard.jsonl"))
    assert len(pool) == 6 and all(len(r["objects"]) == 8 for r in pool)  # micro_run's world: 3-7 objects


def test_a_round_from_before_an_option_existed_counts_as_built_as_it_was_then(job):
    out, argv = job
    old = ["--no-hard-pool", "--no-pass-filter"]  # what every round did before these options existed
    train_dpo.main(argv + old)
    path = os.path.join(out, "reasoning_dpo1", checkpoint.ROUND_DONE)
    with open(path) as f:
        record = json.load(f)
    for key in ("hard_pool", "pass_filter"):
        del record["options"][key]
    with open(path, "w") as f:
        json.dump(record, f)
    assert "two_agent_dpo1" in train_dpo.main(argv + old)["arms"]  # reused: built as those options then were
    assert one_line_exit(train_dpo.main, argv).endswith(  # not as today's defaults, which differ
        "was built with hard_pool=(not recorded), not True: pass the same option, or add --rebuild dpo")


def test_a_rebuilt_reasoning_stage_makes_every_round_after_it_out_of_date(job, capsys):
    out, argv = job
    train_dpo.main(argv + ["--iters", "2"])
    assert list(checkpoint.dpo_rounds(out)) == [1, 2]
    mark_finished(out, "reasoning", **JOB)  # the reasoning stage trained again: a new id
    assert checkpoint.stale(os.path.join(out, "reasoning_dpo1")) == ["reasoning"]
    assert checkpoint.stale(os.path.join(out, "summary")) == ["reasoning"]  # its on-policy set came from it too
    assert checkpoint.dpo_rounds(out) == {} and "two_agent_dpo1" not in E.arm_checkpoints(out)
    with pytest.raises(SystemExit, match="is unfinished or out of date"):
        agents.main(["--out", out, "--image", "x.png", "--question", "q"])
    for stage in ("summary", "summary-only"):  # as if trained again too (their on-policy set is not sampled here)
        mark_finished(out, stage, **JOB)
    capsys.readouterr()
    results = train_dpo.main(argv + ["--iters", "1"])
    assert "[stage] DPO round 1: building it again (its reasoning was rebuilt)" in capsys.readouterr().out
    assert [a for a in results["arms"] if "dpo" in a] == ["two_agent_dpo1"]
    assert checkpoint.stale(os.path.join(out, "reasoning_dpo2")) == ["reasoning_dpo1"]  # built from the old round 1


def test_a_round_or_grpo_run_records_its_own_options_not_those_of_the_sft_stages(tmp_path):
    record = train_dpo.job_record(train_dpo.DPOConfig(out=str(tmp_path), summary_chains=2, sft_seed=3), ["reasoning"])
    assert record["options"]["lr"] == 1e-5 and not set(train_dpo.STAGE_OPTIONS) & set(record["options"])
    assert record["inputs"] == {"reasoning": None}  # the SFT stages' options reach it through this id


def test_a_product_built_before_options_were_recorded_is_refused_by_name(job, capsys):
    out, argv = job
    train_dpo.main(argv)
    round1 = os.path.join(out, "reasoning_dpo1", checkpoint.ROUND_DONE)
    done = json.load(open(round1))
    del done["options"]["beta"]  # as if --beta had been added after the round was built
    with open(round1, "w") as f:
        json.dump(done, f)
    capsys.readouterr()
    train_dpo.main(argv)  # the round was built as the default builds: reused
    assert "[stage] DPO round 1: cached" in capsys.readouterr().out
    assert one_line_exit(train_dpo.main, argv + ["--beta", "0.5"]).startswith(
        f"error: {os.path.dirname(round1)} was built with beta=(not recorded), not 0.5: ")
    with open(round1, "w") as f:
        f.write('{"round": "dpo1", "val/chain_correct": 0.5, "val/two_agent": 0.5}')  # as older runs left it
    assert one_line_exit(train_dpo.main, argv) == (f"error: {os.path.dirname(round1)} was built before its options "
                                                   f"were recorded: add --rebuild dpo")


def test_a_full_disk_inside_an_atomic_write_names_the_file_once():
    with pytest.raises(OSError) as e, common.writing("outer.jsonl"), common.writing("inner.jsonl"):
        raise OSError(28, "No space left on device")
    assert str(e.value).startswith("inner.jsonl could not be written (OSError: [Errno 28] No space left on device)")
    assert "outer" not in str(e.value)


def test_an_error_that_is_not_a_full_disk_is_raised_as_it_is(tmp_path):
    with pytest.raises(ValueError, match="^a bug$"):
        common.atomic_write(str(tmp_path / "x"), lambda f: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(OSError, match="could not be written .* the disk is full"):  # torch.save's own words
        common.atomic_write(str(tmp_path / "x"), lambda f: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))


def test_a_rebuilt_world_makes_the_stages_out_of_date_and_the_same_world_does_not(tmp_path):
    out = str(tmp_path / "out")
    micro_run(out)
    world = dict(train_scenes=24, val_scenes=3, test_scenes=3, hard_val_scenes=0, hard_test_scenes=0)  # micro_run's
    data.build_world(os.path.join(out, "data"), **world)  # the same world again: the same id
    sft = [s for s, spec in train_sft.STAGES.items() if not spec.get("after_rl")]  # micro_run's stages
    assert all(checkpoint.finished(os.path.join(out, s)) for s in sft)
    data.build_world(os.path.join(out, "data"), **world, seed=1)
    assert checkpoint.stale(os.path.join(out, "base")) == ["data"]
    assert not any(checkpoint.finished(os.path.join(out, s)) for s in sft)


def test_a_world_rebuilt_and_interrupted_is_unfinished(tmp_path, monkeypatch):
    out = str(tmp_path / "data")
    data.build_world(out, train_scenes=6, val_scenes=1, test_scenes=1)
    assert checkpoint.finished(out)
    monkeypatch.setattr(data, "assess_and_write", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        data.build_world(out, train_scenes=6, val_scenes=1, test_scenes=1, seed=3)
    assert not checkpoint.finished(out)  # the old card does not vouch for the half-written files


def test_a_summary_stage_interrupted_does_not_resume_on_another_data_set(job):
    out, _ = job
    summary = checkpoint.stage_dir(out, "summary")
    tcfg, extra, inputs = train_dpo.stage_plan(train_dpo.JobConfig(out=out, **JOB), "summary")  # --summary-chains 1
    model = train_dpo.VLM.from_pretrained(summary)
    optimizer = train_sft.make_optimizer(model, tcfg)
    checkpoint.save_train_state(os.path.join(summary, "train_state.pt"), model, optimizer,
                                common.make_scaler("cpu", "fp32"), 1, train_sft.stage_record(tcfg, extra, inputs))
    os.remove(os.path.join(summary, checkpoint.STAGE_DONE))  # interrupted after step 1
    with pytest.raises(ValueError, match="summary/train_state.pt was built with data_file=summary_onpolicy_sft.jsonl, "
                                         "not None: pass the same option, or start over"):
        train_dpo.build_missing_stages(train_dpo.DPOConfig(out=out, summary_chains=0, **JOB))


def test_a_finished_grpo_run_with_other_options_is_refused(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    micro_run(out, max_chain_tokens=8)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    monkeypatch.setattr(train_grpo.evaluation, "run_eval", lambda out_dir, **kw: "evaluated")
    args = ["--out", out, "--steps", "1", "--questions-per-step", "2", "--group-size", "2", "--max-chain-tokens", "8",
            "--val-size", "2"]
    train_grpo.main(args)
    assert one_line_exit(train_grpo.main, args + ["--reward", "additive"]) == (
        f"error: {os.path.join(out, 'reasoning_grpo')} was built with reward=gated, not additive: pass the same "
        f"option, or add --rebuild grpo")
    assert train_grpo.main(args + ["--lr", "1e-3", "--rebuild", "grpo"]) == "evaluated"
    assert checkpoint.marker(os.path.join(out, "reasoning_grpo"))["options"]["lr"] == 1e-3


@pytest.mark.parametrize("change", [["--lr", "0.01"], ["--max-len", "64"], ["--preset", "tiny"]],
                         ids=["lr", "max-len", "preset"])
def test_sft_resume_with_another_option_is_one_line(base_run, tmp_path, change):
    run, argv = copy_run(base_run, tmp_path)
    (run / "base" / checkpoint.STAGE_DONE).unlink()  # as if interrupted: --resume reads train_state.pt
    flag, value = change
    message = one_line_exit(train_sft.main, argv + ["--resume", *change])
    assert message.startswith(f"error: {run / 'base' / 'train_state.pt'} was built with {flag[2:].replace('-', '_')}=")
    assert message.endswith(f", not {value}: pass the same option, or start over (train_sft.py without --resume; the "
                            f"main job: add --rebuild base)")


# ----------------------------------------------------------------------------------------------
# One run per output directory


def hold_lock(path):
    """A process that holds path's run lock until killed -> the process (once it holds it)."""
    code = f"import common, time\nwith common.run_lock({path!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.skipif(os.name != "posix", reason="file locks are POSIX's fcntl")
def test_a_second_run_on_one_directory_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    out = str(tmp_path / "out")
    holder = hold_lock(out)
    try:
        message = one_line_exit(train_dpo.main, ["--out", out])
        assert message.startswith(f"error: {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}: ")
        assert message.endswith("-c): wait for it to end, or choose another --out")  # its command: python -c
        assert one_line_exit(data.main, ["--out", out]).startswith(f"error: {out} is in use by another run")
        with common.run_lock(str(tmp_path / "other")):  # another directory is free
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with common.run_lock(out), common.run_lock(out):  # a killed holder leaves nothing; the holder may take it again
        assert os.path.isfile(os.path.join(out, ".lock"))


# ----------------------------------------------------------------------------------------------
# A write that fails names its file


@pytest.mark.skipif(os.name != "posix", reason="a file-size limit is POSIX's setrlimit")
def test_a_full_disk_during_a_save_is_one_line_naming_the_file(built_world, tmp_path):  # noqa: F811
    os.symlink(built_world / "data", tmp_path / "data")
    code = textwrap.dedent(f"""
        import resource, signal, sys, train_sft
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        train_sft.main(["--stage", "base", "--out", {str(tmp_path)!r}, "--preset", "micro", "--device", "cpu",
                        "--max-steps", "1", "--batch-size", "4", "--eval-every", "0", "--vision-pretrain-steps", "0"])
    """)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.time() - started < 120
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'base' / 'model.safetensors'} could not be written (SafetensorError: ")
    assert last.endswith("the disk is full or a file-size limit was met; free space and run the same command again")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "base" / checkpoint.STAGE_DONE)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full: a file whose every write finds the disk full")
@pytest.mark.parametrize("write", [lambda path: common.log_record(path, {"step": 1}),
                                   lambda path: common.write_jsonl(path, [{"id": 1}])], ids=["log", "jsonl"])
def test_a_failed_write_names_its_file(write):
    with pytest.raises(OSError, match="^/dev/full could not be written \\(OSError: \\[Errno 28\\] No space left"):
        write("/dev/full")
