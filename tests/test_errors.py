"""Nothing lost, nothing silent: what a user can get wrong ends in one line that names the file, line or flag, before
any work is done, and leaves every file as it was. Divergence halts training before the bad update and saves nothing
from it. Micro models and tiny worlds, as in the tests of each script (their fixtures are reused from there)."""

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import agents
import bench
import common
import data
import eval as E
import generate
import train_dpo
import train_grpo
import train_sft
from checkpoint import STAGE_DONE
from model import VLM, get_config
from test_dpo import micro_run, teacher_sampler
from test_eval import BENCHMARK, REPLIES, fake_models, question_of, write_set
from test_generate import checkpoint  # noqa: F401 (a fixture: a micro model saved with a tokenizer, and an image)
from test_train_sft import built_world, loop_config, micro_model, synthetic_examples  # noqa: F401 (a fixture)
from train_sft import train_loop

# The job's smallest round: 6 questions, 2 pairs per step, so a round has several steps; no control (test_edge.py).
DPO_ARGS = ["--iters", "1", "--pool-size", "6", "--samples-per-question", "2", "--max-chain-tokens", "8",
            "--batch-size", "2", "--val-size", "4", "--eval-limit", "4", "--precision", "fp32", "--no-sft-more"]


@pytest.fixture(scope="module")
def dpo_out(tmp_path_factory):
    """A run directory with the world and every SFT stage cached; tests work on copies."""
    out = tmp_path_factory.mktemp("dpo") / "out"
    micro_run(str(out), max_chain_tokens=8, precision="fp32")
    return out


@pytest.fixture(scope="module")
def base_run(built_world, tmp_path_factory):
    """A run directory whose base stage finished (2 micro steps) -> (directory, the argv that trained it)."""
    out = tmp_path_factory.mktemp("sft")
    os.symlink(built_world / "data", out / "data")
    argv = ["--stage", "base", "--out", str(out), "--preset", "micro", "--device", "cpu", "--precision", "fp32",
            "--max-steps", "2", "--batch-size", "4", "--eval-every", "0", "--save-every", "0"]
    train_sft.main(argv)
    return out, argv


def copy_run(run, tmp_path):
    """A copy of a run directory, its argv pointing at the copy."""
    out, argv = run
    copy = shutil.copytree(out, tmp_path / "run", symlinks=True)
    return copy, [str(copy) if a == str(out) else a for a in argv]


def one_line_exit(main, argv):
    """main(argv) must exit with a one-line `error: ...` message -> the message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def parse_error(main, argv, capsys):
    """main(argv) must end at parse time with argparse's error (exit code 2) -> its last stderr line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# 1. DPO has SFT's divergence guard, and a checkpoint with NaN weights is refused


def test_dpo_divergence_halts_before_the_update_and_saves_no_round(dpo_out, tmp_path, monkeypatch):
    out = shutil.copytree(dpo_out, tmp_path / "out")
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    # The per-round val report decodes 256-token chains: not what this test is about, so it is skipped.
    monkeypatch.setattr(E, "evaluate_two_agent", lambda *args, **kwargs: {"chain_correct": 0.0, "overall": 0.0})
    real, training_forwards = train_dpo.sequence_logps, []

    def nan_at_the_second_step(model, batch, return_counts=False):  # the reference pass runs without gradients
        result = real(model, batch, return_counts)
        if torch.is_grad_enabled():
            training_forwards.append(batch)
            if len(training_forwards) == 2:
                return result[0] * float("nan"), result[1]
        return result

    monkeypatch.setattr(train_dpo, "sequence_logps", nan_at_the_second_step)
    message = one_line_exit(train_dpo.main, ["--out", str(out), *DPO_ARGS])
    assert message == ("error: loss nan, grad norm nan at DPO round 1 step 2: training halted; nothing of round 1 "
                       "was saved; try a lower --lr")  # fp32 already: no advice to switch to it
    assert not (out / "reasoning_dpo1").exists()


def test_non_finite_weights_are_refused_on_load(tmp_path):
    vlm = VLM(get_config("micro"))
    with torch.no_grad():
        vlm.text_model.norm.weight[0] = float("nan")
    vlm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError) as e:
        VLM.from_pretrained(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: NaN or inf in text_model.norm.weight: the run that saved this checkpoint "
                            f"diverged; train it again with a lower --lr")


# ----------------------------------------------------------------------------------------------
# 2, 4, 8, 11. Every numeric option is checked at parse time, naming the flag


@pytest.mark.parametrize("script,argv,message", [
    (train_sft, ["--lr", "0"], "--lr: must be > 0, got 0.0"),
    (train_sft, ["--lr", "-1"], "--lr: must be > 0, got -1.0"),
    (train_sft, ["--epochs", "0"], "--epochs: must be > 0, got 0.0"),
    (train_sft, ["--batch-size", "-1"], "--batch-size: must be >= 1, got -1"),
    (train_sft, ["--max-steps", "-5"], "--max-steps: must be >= 0, got -5"),
    (train_dpo, ["--batch-size", "-1"], "--batch-size: must be >= 1, got -1"),
    (train_dpo, ["--iters", "-1"], "--iters: must be >= 0, got -1"),
    (E, ["--batch-size", "-1"], "--batch-size: must be >= 1, got -1"),
    (E, ["--limit", "-1"], "--limit: must be >= 1, got -1"),
    (data, ["--train-scenes", "0"], "--train-scenes: must be >= 1, got 0"),  # 4: an empty training set
    (data, ["--max-objects", "10"], "--max-objects: must be <= 9, got 10"),  # 11: 9 cells
    (bench, ["--new-tokens", "1"], "--new-tokens: must be >= 2, got 1"),
    # 8: decoding options, checked here rather than inside generate()
    (generate, ["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 1, got -1"),
    (generate, ["--temperature", "-1"], "--temperature: must be >= 0, got -1.0"),
    (generate, ["--top-p", "0"], "--top-p: must be > 0, got 0.0"),
    (generate, ["--top-k", "0"], "--top-k: must be >= 1, got 0"),
    (train_dpo, ["--top-p", "0"], "--top-p: must be > 0, got 0.0"),
    (train_dpo, ["--temperature", "-0.5"], "--temperature: must be >= 0, got -0.5"),
    (train_dpo, ["--max-chain-tokens", "0"], "--max-chain-tokens: must be >= 1, got 0"),
    (agents, ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (agents, ["--paths-per-question", "0"], "--paths-per-question: must be >= 1, got 0"),  # DataConfig's range
])
def test_numeric_options_are_checked_at_parse_time(script, argv, message, capsys):
    assert parse_error(script.main, argv, capsys).endswith(f"error: argument {message}")


def test_bounds_admit_their_edges_and_none():
    cfg = common.parse_config(train_sft.TrainConfig, ["--max-steps", "0", "--min-lr-ratio", "1"])
    assert (cfg.max_steps, cfg.min_lr_ratio, cfg.lr, cfg.epochs) == (0, 1.0, None, None)  # None: the stage's


def test_min_objects_above_max_objects_is_named(tmp_path):
    out = tmp_path / "world"
    assert one_line_exit(data.main, ["--min-objects", "8", "--max-objects", "3", "--out", str(out)]) == \
        "error: --min-objects 8 is more than --max-objects 3: pass a range with min <= max"
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 3. --resume on a finished stage changes nothing; stage.json is never written without a step trained


def test_resume_of_a_finished_stage_leaves_it_untouched(base_run, tmp_path):
    run, argv = copy_run(base_run, tmp_path)
    marker = run / "base" / STAGE_DONE
    before = marker.read_bytes()
    assert one_line_exit(train_sft.main, argv + ["--resume"]) == (
        f"error: {run / 'base'} is already finished ({STAGE_DONE} is there): nothing to resume; run without "
        f"--resume to train it again")
    assert marker.read_bytes() == before
    marker.unlink()  # killed after its last checkpoint, before the marker: nothing is left to train either
    assert one_line_exit(train_sft.main, argv + ["--resume"]).startswith(
        f"error: {run / 'base'}/train_state.pt is at step 2 of 2: nothing to resume")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 4. No training rows, no questions: a named error, not a ZeroDivisionError or a table of n=0


def test_no_training_rows_names_the_cause(base_run, tmp_path):
    run, argv = copy_run(base_run, tmp_path)
    rows = len(data.read_jsonl(str(run / "data" / "base.jsonl")))
    assert one_line_exit(train_sft.main, argv + ["--max-len", "5"]) == \
        f"error: {run / 'data' / 'base.jsonl'}: no training rows: {rows} dropped by --max-len 5"


def test_an_empty_benchmark_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert one_line_exit(E.main, ["--data", str(empty), "--model", str(tmp_path), "--out", str(tmp_path)]) == \
        f"error: {empty}: no questions to evaluate"


# ----------------------------------------------------------------------------------------------
# 5, 9. Output directories are created or refused before any work


def test_eval_out_is_created_or_refused_before_a_question_is_asked(tmp_path, monkeypatch):
    path = write_set(str(tmp_path / "bench"), "bench.jsonl", BENCHMARK)
    os.makedirs(tmp_path / "model")
    prompts = fake_models(monkeypatch, {"model": lambda p: REPLIES[question_of(p)]})
    argv = ["--data", path, "--model", str(tmp_path / "model")]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert one_line_exit(E.main, argv + ["--out", str(blocker)]) == \
        f"error: {blocker} is not a writable directory (File exists): choose another --out"
    assert prompts == []
    E.main(argv + ["--out", str(tmp_path / "new" / "dir")])
    assert (tmp_path / "new" / "dir" / "results_bench.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_eval_refuses_a_read_only_out(tmp_path, monkeypatch):
    path = write_set(str(tmp_path / "bench"), "bench.jsonl", BENCHMARK)
    prompts = fake_models(monkeypatch, {"model": lambda p: REPLIES[question_of(p)]})
    (tmp_path / "model").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    message = one_line_exit(E.main, ["--data", path, "--model", str(tmp_path / "model"), "--out", str(locked)])
    assert message == f"error: {locked} is not a writable directory (Permission denied): choose another --out"
    assert prompts == []


def test_every_script_checks_its_output_directory_first(base_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused = f"error: {blocker} is not a writable directory (File exists): choose another"
    assert one_line_exit(data.main, ["--out", str(blocker)]) == refused + " --out"
    assert one_line_exit(train_dpo.main, ["--out", str(blocker)]) == refused + " --out"
    assert one_line_exit(bench.main, ["--quick", "--out", str(blocker)]) == refused + " --out"
    real = write_set(str(tmp_path / "real"), "real.jsonl", BENCHMARK)
    assert one_line_exit(agents.main, ["--real", real, "--generator", "unused", "--data-out", str(blocker)]) == \
        refused + " --data-out"
    run, argv = copy_run(base_run, tmp_path)
    shutil.rmtree(run / "base")
    (run / "base").write_text("")  # where the stage's checkpoints go
    (run / "logs" / "base.jsonl").unlink()
    assert one_line_exit(train_sft.main, argv) == \
        f"error: {run / 'base'} is not a writable directory (File exists): choose another --out"
    assert not (run / "logs" / "base.jsonl").exists()  # no step was trained


def test_train_dpo_prints_its_errors_as_one_line(dpo_out, tmp_path):
    out = shutil.copytree(dpo_out, tmp_path / "out")
    (out / "reasoning" / "config.json").write_text("{not json")
    assert one_line_exit(train_dpo.main, ["--out", str(out), *DPO_ARGS]).startswith(
        f"error: {out / 'reasoning' / 'config.json'}: corrupt or truncated checkpoint (JSONDecodeError: ")


# ----------------------------------------------------------------------------------------------
# 6. An unreadable checkpoint names its file, the same from every script


def without_text_section(raw):
    return json.dumps({k: v for k, v in json.loads(raw).items() if k != "text"}).encode()


CORRUPT = {"truncated-weights": ("model.safetensors", lambda raw: raw[:len(raw) // 2]),
           "empty-weights": ("model.safetensors", lambda raw: b""),
           "random-weights": ("model.safetensors", lambda raw: random.Random(0).randbytes(len(raw))),
           "config-not-json": ("config.json", lambda raw: b"{not json"),
           "config-without-text": ("config.json", without_text_section),
           "truncated-tokenizer": ("tokenizer.json", lambda raw: raw[:len(raw) // 2])}


@pytest.mark.parametrize("name,corrupt", CORRUPT.values(), ids=list(CORRUPT))
def test_unreadable_checkpoint_is_named(checkpoint, tmp_path, name, corrupt):  # noqa: F811 (the fixture)
    _, path, image = checkpoint
    ckpt = shutil.copytree(path, tmp_path / "ckpt")
    file = ckpt / name
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(ValueError) as e:
        VLM.from_pretrained(str(ckpt))
    line = str(e.value)
    assert line.startswith(f"{file}: corrupt or truncated checkpoint (") and "\n" not in line, line
    assert one_line_exit(generate.main, ["--model", str(ckpt), "--image", str(image), "--prompt", "hi"]) == \
        f"error: {line}"
    assert one_line_exit(agents.main, ["--image", str(image), "--question", "hi", "--reasoning", str(ckpt),
                                       "--summary", str(ckpt)]) == f"error: {line}"


@pytest.mark.parametrize("corrupt", [lambda raw: raw[:len(raw) // 2], lambda raw: b"", lambda raw: b"not a zip"],
                         ids=["truncated", "empty", "garbage"])
def test_unreadable_train_state_is_named(base_run, tmp_path, corrupt):
    run, argv = copy_run(base_run, tmp_path)
    (run / "base" / STAGE_DONE).unlink()  # as if interrupted: --resume reads train_state.pt
    state = run / "base" / "train_state.pt"
    state.write_bytes(corrupt(state.read_bytes()))
    assert one_line_exit(train_sft.main, argv + ["--resume"]).startswith(
        f"error: {state}: corrupt or truncated checkpoint (")


# ----------------------------------------------------------------------------------------------
# 7. eval.py --data checks rows as data.py --real does, file:line on each, and --skip-bad skips them


def test_benchmark_rows_are_checked_named_and_skippable(tmp_path, monkeypatch, capsys):
    good = Path(write_set(str(tmp_path), "bench.jsonl", BENCHMARK)).read_bytes().splitlines()
    bad = {json.dumps({"image": "images/0.png", "answer": "cat"}): "missing field 'question'",
           json.dumps({"image": "images/0.png", "question": None, "answer": "cat"}): "missing field 'question'",
           json.dumps({"image": "images/0.png", "question": 5, "answer": "cat"}):
               "field 'question' must be a string, not int",
           json.dumps({"image": "images/gone.png", "question": "Q?", "answer": "cat"}):
               f"image not found: {tmp_path / 'images' / 'gone.png'}",
           '{"image": "images/0.png", "question": "caf\xe9?", "answer": "cat"}':
               "'utf-8' codec can't decode byte 0xe9"}
    lines = {line.encode("latin-1"): reason for line, reason in bad.items()}
    (tmp_path / "model").mkdir()
    prompts = fake_models(monkeypatch, {"model": lambda p: REPLIES[question_of(p)]})
    argv = ["--model", str(tmp_path / "model"), "--out", str(tmp_path)]
    one = tmp_path / "one.jsonl"
    for line, reason in lines.items():
        one.write_bytes(good[0] + b"\n" + line + b"\n")
        assert one_line_exit(E.main, ["--data", str(one), *argv]).startswith(f"error: {one}:2: {reason}")
    assert prompts == []  # every bad line was found before any question was asked
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join(good[:2] + list(lines) + good[2:]) + b"\n")
    E.main(["--data", str(mixed), *argv, "--skip-bad"])
    assert f"skipped 5 bad lines in {mixed} (first: {mixed}:3: missing field 'question')" in capsys.readouterr().err
    with open(tmp_path / "results_mixed.json") as f:
        assert json.load(f)["arms"]["direct"]["n"] == len(BENCHMARK)


# ----------------------------------------------------------------------------------------------
# 10. Saved files get the umask's permissions, and a temp file a kill left behind is removed


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_follow_the_umask_and_stale_temp_files_go(tmp_path, umask):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-model.safetensors-{socket.gethostname()}-{int(dead.stdout)}"
    stale.write_bytes(b"half a tensor")  # a save killed mid-write: its writer is gone
    stale.chmod(0o600)
    old = os.umask(umask)
    try:
        VLM(get_config("micro")).save_pretrained(str(tmp_path))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o666 & ~umask}


def test_two_writers_of_one_path_keep_their_own_temp_files(tmp_path):
    # Other processes are writing the same file: this host's live one (this test's parent) and one on another host
    # sharing the folder, whose pid means nothing here. Their temp files are left alone.
    host = socket.gethostname()
    others = [tmp_path / f".tmp-results.json-{host}-{os.getppid()}", tmp_path / ".tmp-results.json-elsewhere-999999999"]
    for other in others:
        other.write_text("{half")
    seen = []
    common.atomic_write(str(tmp_path / "results.json"), lambda tmp: seen.append(tmp) or open(tmp, "w").write("{}"))
    assert seen == [str(tmp_path / f".tmp-results.json-{host}-{os.getpid()}")]
    assert all(other.read_text() == "{half" for other in others) and (tmp_path / "results.json").read_text() == "{}"


# ----------------------------------------------------------------------------------------------
# 12. SFT's divergence message says what was saved, and suggests fp32 only when it is not in use


def nan_loss_at_call(model, n):
    """The model's n-th forward returns a NaN loss."""
    forward, calls = model.forward, [0]

    def forward_with_nan(*args, **kwargs):
        calls[0] += 1
        logits, loss = forward(*args, **kwargs)
        return logits, loss * float("nan") if calls[0] == n else loss
    model.forward = forward_with_nan
    return model


def test_sft_divergence_message_is_accurate(tmp_path):
    model = nan_loss_at_call(micro_model(), 1)
    examples = synthetic_examples(model, 4)
    with pytest.raises(FloatingPointError) as e:
        train_loop(model, examples, [], loop_config(max_steps=3), str(tmp_path / "a"), str(tmp_path / "a.jsonl"), "a")
    assert str(e.value) == ("loss nan, grad norm nan at step 1: training halted; no checkpoint was saved before it; "
                            "try a lower --lr")
    assert not (tmp_path / "a" / "train_state.pt").exists()
    model = nan_loss_at_call(micro_model(), 3)
    with pytest.raises(FloatingPointError) as e:
        train_loop(model, examples, [], loop_config(max_steps=4, save_every=2, precision="bf16"), str(tmp_path / "b"),
                   str(tmp_path / "b.jsonl"), "b")
    assert str(e.value) == (f"loss nan, grad norm nan at step 3: training halted; the last good checkpoint (step 2) "
                            f"is in {tmp_path / 'b'}; try a lower --lr or --precision fp32")


# ----------------------------------------------------------------------------------------------
# Ctrl-C ends every script with one line: what was saved and how to continue


def interrupt(message=None):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt(*([message] if message else []))
    return stop


def test_ctrl_c_is_one_line_saying_what_was_saved_and_how_to_continue(tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "ckpt")
    cases = [
        (train_sft, "run_stage", interrupt("saved step 3/10 to out/base"), train_sft.main, ["--stage", "base"],
         "interrupted: saved step 3/10 to out/base; continue: the same command with --resume"),
        (train_dpo, "run", interrupt(), train_dpo.main, [],
         "interrupted: finished stages and rounds are kept; continue: the same command again"),
        (train_grpo, "run", interrupt("saved step 2/60 to out/reasoning_grpo/train_state.pt"), train_grpo.main, [],
         "interrupted: saved step 2/60 to out/reasoning_grpo/train_state.pt; continue: the same command again"),
        (E, "run_eval", interrupt(), E.main, [], "interrupted: no results were written; run the command again"),
        (data, "build_world", interrupt(), data.main, ["--out", folder],
         f"interrupted: {folder} is incomplete; run the command again"),
        (agents, "load_vlm", interrupt(), agents.main, ["--image", "x.png", "--question", "q?", "--reasoning", folder,
                                                        "--summary", folder], "interrupted: nothing was written"),
    ]
    for module, name, stop, main, argv, expected in cases:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, stop)
            with pytest.raises(SystemExit) as e:
                main(argv)
        assert e.value.code == 130 and capsys.readouterr().out.splitlines()[-1:] == [expected]


def test_an_interrupted_stage_raises_what_it_saved(tmp_path):
    model = micro_model()
    calls = {"n": 0}

    def log_then_stop(path, record):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "log_record", log_then_stop)
        with pytest.raises(KeyboardInterrupt, match=f"^saved step 2/4 to {tmp_path}$"):
            train_loop(model, synthetic_examples(model, 8), [], loop_config(max_steps=4), str(tmp_path),
                       str(tmp_path / "log.jsonl"), "t")
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 2
