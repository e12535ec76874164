"""train_sft.py: the loop learns, resumes exactly, accumulates exactly, masks the loss, and its
stages fail with the named command when something is missing. Micro model, tiny data, CPU."""

import json
import math
import os

import pytest
import torch

import checkpoint
import common
import data
import train_sft
import world
from model import VLM, get_config
from common import lr_scale
from train_sft import TrainConfig, collate, encode_row, make_optimizer, run_stage, train_loop


def micro_model(seed=0):
    torch.manual_seed(seed)
    return VLM(get_config("micro"))


def synthetic_examples(model, n, seed=0):
    """[image placeholders][prompt][answer], the loss on the answer only; lengths vary by row."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        prompt, answer = 3 + i % 3, 2 + i % 4
        ids = torch.cat([torch.full((cfg.tokens_per_image,), cfg.image_token_id),
                         torch.randint(10, cfg.text.vocab_size, (prompt + answer,), generator=g)])
        targets = ids.clone()
        targets[:cfg.tokens_per_image + prompt] = -100
        image = torch.randn(3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        examples.append({"ids": ids, "targets": targets, "image": image})
    return examples


def loop_config(**overrides):
    base = dict(device="cpu", precision="fp32", lr=3e-3, weight_decay=0.0, warmup_steps=0, eval_every=0,
                save_every=0, batch_size=4, max_steps=4, seed=0, freeze_vision=False)  # every part trains
    return TrainConfig(**{**base, **overrides})


def logged(path, key="loss"):
    with open(path) as f:
        return [json.loads(line)[key] for line in f]


# ----------------------------------------------------------------------------------------------
# The loop


def test_collate_right_pads_to_the_longest_example():
    model = micro_model()
    examples = synthetic_examples(model, 3)
    batch = collate(examples, pad_id=7)
    lengths = [len(ex["ids"]) for ex in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == 7).all() and (batch["targets"][i, n:] == -100).all()
        assert torch.equal(batch["targets"][i, :n], examples[i]["targets"])


def test_tiny_model_overfits_one_fixed_batch(tmp_path):
    model = micro_model()
    examples = synthetic_examples(model, 4)
    cfg = loop_config(max_steps=60, lr=1e-2)
    summary = train_loop(model, examples, examples, cfg, str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl"), "overfit")
    losses = logged(tmp_path / "log.jsonl")
    assert losses[0] > 4.0  # ~ln(256) at the start
    assert summary["train_loss"] < 0.05 and summary["val_loss"] < 0.05
    assert os.path.isfile(tmp_path / "ckpt" / "model.safetensors") and os.path.isfile(tmp_path / "ckpt" / "train_state.pt")
    reloaded = VLM.from_pretrained(str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_resume_after_ctrl_c_gives_the_same_losses(tmp_path):
    k, accum = 2, 2  # interrupted in step 3 of an epoch's 3: mid-epoch and mid-step
    # split_cost: a micro-batch costs more than any padding, so every step of 4 rows is 2 micro-batches of 2
    cfg = loop_config(max_steps=2 * k, batch_size=2, grad_accum=accum, precision="bf16", warmup_steps=2,
                      split_cost=10**6)
    examples = synthetic_examples(micro_model(), 12)  # 3 full steps of 4 rows an epoch

    straight = micro_model()
    train_loop(straight, examples, examples[:2], cfg, str(tmp_path / "a"), str(tmp_path / "a.jsonl"), "straight")

    interrupted = micro_model()
    forward, calls = interrupted.forward, [0]

    def ctrl_c_mid_step(*args, **kwargs):  # the second micro-batch of step k+1: half a step is done
        calls[0] += 1
        if calls[0] == k * accum + 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    interrupted.forward = ctrl_c_mid_step
    with pytest.raises(KeyboardInterrupt):
        train_loop(interrupted, examples, examples[:2], cfg, str(tmp_path / "b"), str(tmp_path / "b.jsonl"), "first half")
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["step"] == k
    assert len(logged(tmp_path / "b.jsonl")) == k

    resumed = micro_model(seed=1)  # different initial weights: everything must come from train_state.pt
    train_loop(resumed, examples, examples[:2], TrainConfig(**{**vars(cfg), "resume": True}),
               str(tmp_path / "b"), str(tmp_path / "b.jsonl"), "second half")
    assert logged(tmp_path / "b.jsonl", "step") == list(range(1, 2 * k + 1))
    assert logged(tmp_path / "b.jsonl") == pytest.approx(logged(tmp_path / "a.jsonl"), rel=1e-5)
    assert logged(tmp_path / "b.jsonl", "lr") == pytest.approx(logged(tmp_path / "a.jsonl", "lr"))
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    # Rows of different lengths: micro-batches hold different token counts, and it still matches.
    examples = synthetic_examples(micro_model(), 12)
    big, small = micro_model(), micro_model()
    train_loop(big, examples, [], loop_config(batch_size=6, grad_accum=1, max_steps=3),
               str(tmp_path / "big"), str(tmp_path / "big.jsonl"), "one batch")
    train_loop(small, examples, [], loop_config(batch_size=2, grad_accum=3, max_steps=3),
               str(tmp_path / "small"), str(tmp_path / "small.jsonl"), "accumulated")
    assert logged(tmp_path / "small.jsonl") == pytest.approx(logged(tmp_path / "big.jsonl"), rel=1e-5)
    for record in map(json.loads, (tmp_path / "big.jsonl").read_text().splitlines()):  # what each step reports
        assert record["tok_s"] > 0 and 0 <= record["pad_share"] < 1 and 0 < record["peak_share"] < 1
    for a, b in zip(big.state_dict().values(), small.state_dict().values()):
        # Adam divides by |grad|, so float noise on a near-zero gradient moves a weight by a little
        # of the lr (3e-3): the tolerance is 1% of one step.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)


def test_param_groups_get_their_lr_and_decay():
    model = micro_model()
    cfg = loop_config(lr=1e-3, lr_vision=1e-4, lr_projector=5e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in make_optimizer(model, cfg).param_groups}
    assert set(groups) == {f"{part}/{d}" for part in ("vision", "projector", "text") for d in ("decay", "no_decay")} - {"projector/no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {"vision": 1e-4, "projector": 5e-3, "text": 1e-3}
    for name, group in groups.items():
        part, decay = name.split("/")
        assert group["lr"] == lrs[part] and group["weight_decay"] == (0.1 if decay == "decay" else 0.0)
        for p in group["params"]:
            assert (p.dim() >= 2) == (decay == "decay"), names[id(p)]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))  # tied head counted once
    frozen_model = micro_model()
    frozen = make_optimizer(frozen_model, loop_config(freeze_vision=True))
    assert not any(g["name"].startswith("vision") for g in frozen.param_groups)
    assert not any(p.requires_grad for p in frozen_model.vision_model.parameters())


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    assert [lr_scale(s, 4, 20, 0.1) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_scale(4, 4, 20, 0.1) == pytest.approx(1.0) and lr_scale(20, 4, 20, 0.1) == pytest.approx(0.1)
    values = [lr_scale(s, 4, 20, 0.1) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    model = micro_model()
    cfg = loop_config(max_steps=6, warmup_steps=2, lr=1e-3, min_lr_ratio=0.1)
    train_loop(model, synthetic_examples(model, 8), [], cfg, str(tmp_path / "c"), str(tmp_path / "log.jsonl"), "lr")
    assert logged(tmp_path / "log.jsonl", "lr") == pytest.approx([1e-3 * lr_scale(s, 2, 6, 0.1) for s in range(6)])


def test_non_finite_loss_halts_and_keeps_the_last_checkpoint(tmp_path):
    model = micro_model()
    examples = synthetic_examples(model, 4)
    forward, calls = model.forward, [0]

    def blow_up_at_step_3(*args, **kwargs):
        calls[0] += 1
        logits, loss = forward(*args, **kwargs)
        return logits, loss * float("nan") if calls[0] == 3 else loss

    model.forward = blow_up_at_step_3
    cfg = loop_config(max_steps=5, save_every=2)
    with pytest.raises(FloatingPointError, match=r"at step 3: training halted; the last good checkpoint \(step 2\)"):
        train_loop(model, examples, [], cfg, str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl"), "nan")
    assert torch.load(tmp_path / "ckpt" / "train_state.pt", weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------------------------
# Rows and stages, on a very small world


@pytest.fixture(scope="module")
def built_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data.build_world(str(out / "data"), train_scenes=12, val_scenes=2, test_scenes=2, paths_per_question=2)
    return out


def stage_config(out, **overrides):
    base = dict(out=str(out), preset="micro", device="cpu", max_steps=2, batch_size=4, eval_every=0, save_every=0)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("file,task", [("base.jsonl", None), ("reasoning_sft.jsonl", None), ("summary_sft.jsonl", None),
                                       ("reasoning_sft.jsonl", "vanilla"), ("summary_sft.jsonl", "summary_only")])
def test_loss_counts_only_the_assistant_tokens(built_world, file, task):
    tok = data.load_tokenizer(str(built_world / "data" / "tokenizer.json"))
    model = VLM(get_config("micro", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"]))
    rows = data.read_jsonl(str(built_world / "data" / file))[:4]
    examples = [encode_row(r, tok, model.config, str(built_world / "data"), task) for r in rows]
    for row, ex in zip(rows, examples):
        messages = data.task_messages(task or row["task"], row["question"], row["chain"], row["answer"])
        ids, mask = data.render_conversation(tok, messages, model.config.tokens_per_image)
        assert ex["ids"].tolist() == ids
        assert (ex["targets"] != -100).tolist() == [bool(m) for m in mask]
        learned = tok.decode(ex["ids"][ex["targets"] != -100].tolist(), skip_special_tokens=False)
        assert learned == f" {messages[-1]['content']}<end_of_utterance>"
        assert ex["image"].shape == (3, 32, 32)
    batch = collate(examples, pad_id=data.special_ids(tok)["pad"])
    logits, loss = model(batch["input_ids"], batch["pixel_values"], targets=batch["targets"])
    # By hand: the mean cross-entropy over exactly the positions whose next token is an assistant token.
    counted = batch["targets"][:, 1:] != -100
    logp = logits[:, :-1].float().log_softmax(-1)
    by_hand = -logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0][counted].mean()
    torch.testing.assert_close(loss, by_hand)


def test_stages_run_in_order_and_write_checkpoint_state_and_log(built_world):
    base_dir = run_stage("base", stage_config(built_world))
    assert base_dir == str(built_world / "base")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_state.pt", checkpoint.STAGE_DONE):
        assert os.path.isfile(os.path.join(base_dir, name)), name
    assert logged(built_world / "logs" / "base.jsonl", "step") == [1, 2]
    assert math.isfinite(json.loads((built_world / "logs" / "base.jsonl").read_text().splitlines()[-1])["val_loss"])
    # every record carries the stage's wall time so far
    records = [json.loads(line) for line in (built_world / "logs" / "base.jsonl").read_text().splitlines()]
    assert 0 < records[0]["elapsed_s"] <= records[-1]["elapsed_s"]
    agent_dir = run_stage("summary-only", stage_config(built_world, max_steps=1))
    agent = VLM.from_pretrained(agent_dir)
    assert agent.tokenizer is not None and agent.config.text.vocab_size == VLM.from_pretrained(base_dir).config.text.vocab_size


def test_missing_data_or_previous_stage_names_the_command_to_run(built_world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"base.jsonl not found: run `python data.py --out .*/data` first"):
        run_stage("base", stage_config(tmp_path))
    os.symlink(built_world / "data", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"base not found: run `python train_sft.py --stage base --out .*` first"):
        run_stage("reasoning", stage_config(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: .*base not found: run `python train_sft.py --stage base"):
        train_sft.main(["--stage", "vanilla", "--out", str(tmp_path)])


def test_bad_data_line_names_file_and_line(built_world, tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("images", "tokenizer.json"):
        os.symlink(built_world / "data" / name, tmp_path / "data" / name)
    lines = (built_world / "data" / "base.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # a truncated JSON line
    (tmp_path / "data" / "base.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"^error: .*base.jsonl:3: "):
        train_sft.main(["--stage", "base", "--out", str(tmp_path), "--preset", "micro"])
    lines[2] = json.dumps({k: v for k, v in json.loads(lines[3]).items() if k != "answer"})  # a missing field
    (tmp_path / "data" / "base.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"base.jsonl:3: missing field 'answer'"):
        run_stage("base", stage_config(tmp_path))


def test_cell_labels_read_a_scene_description():
    objects = [{"cell": "top left", "size": "small", "color": "red", "shape": "circle"},
               {"cell": "center", "size": "large", "color": "blue", "shape": "triangle"}]
    labels = torch.tensor(world.cell_labels(world.describe(objects)))
    assert labels.shape == (9, 3)
    values = world.VISION_LABELS
    assert labels[0].tolist() == [1 + values["shape"].index("circle"), 1 + values["color"].index("red"),
                                  1 + values["size"].index("small")]
    assert labels[4].tolist() == [1 + values["shape"].index("triangle"), 1 + values["color"].index("blue"),
                                  1 + values["size"].index("large")]
    assert labels[[1, 2, 3, 5, 6, 7, 8]].eq(0).all()  # empty cells


def test_vision_pretraining_trains_only_the_tower_and_reports_held_out_accuracy(built_world):
    tok = data.load_tokenizer(str(built_world / "data" / "tokenizer.json"))
    torch.manual_seed(0)
    model = VLM(get_config("tiny", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [r for r in data.read_jsonl(str(built_world / "data" / "base.jsonl")) if r["task"] == "describe"]
    accuracy = train_sft.pretrain_vision(model, rows[:-2], rows[-2:], str(built_world / "data"),
                                         TrainConfig(device="cpu", precision="fp32"), steps=40, batch_size=8)
    assert set(accuracy) == {"shape", "color", "size"} and all(0 <= a <= 1 for a in accuracy.values())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("vision_model.") for k in changed)
    # no gradient is left on the tower, which is frozen next: it would join every later step's clip norm
    assert all(p.grad is None for p in model.parameters())
    # 40 steps on 10 scenes already read shape, colour and size of the 18 cells of 2 unseen scenes
    assert min(accuracy.values()) >= 0.8, accuracy
    # a model with other than one image token per grid cell skips it
    micro = VLM(get_config("micro"))
    assert train_sft.pretrain_vision(micro, rows, [], str(built_world / "data"), TrainConfig(device="cpu"), steps=1) is None


# ----------------------------------------------------------------------------------------------
# Steps cut into micro-batches by length, and the CPU precision choice

def padding_share(batches, lengths):
    computed = sum(len(b) * max(lengths[j] for j in b) for b in batches)
    return 1 - sum(lengths) / computed


def brute_force_split(rows, lengths, max_rows, cost):
    """The cheapest cut of sorted rows by trying every set of cut points (for a handful of rows)."""
    rows, best = sorted(rows, key=lengths.__getitem__), None
    for mask in range(2 ** (len(rows) - 1)):
        cuts = [0] + [i + 1 for i in range(len(rows) - 1) if mask >> i & 1] + [len(rows)]
        parts = [rows[a:b] for a, b in zip(cuts, cuts[1:])]
        if all(len(p) <= max_rows for p in parts):
            c = sum(len(p) * lengths[p[-1]] + cost for p in parts)
            best = min(best or (c, parts), (c, parts))
    return best


def test_split_by_length_finds_the_cheapest_cut():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(5, 100, (9,), generator=g).tolist()
        rows, max_rows, cost = list(range(9)), 1 + trial % 5, [0, 10, 64, 1000][trial % 4]
        parts = train_sft.split_by_length(rows, lengths, max_rows, cost)
        assert sorted(j for p in parts for j in p) == rows and all(len(p) <= max_rows for p in parts)
        assert sum(len(p) * max(lengths[j] for j in p) + cost for p in parts) == brute_force_split(
            rows, lengths, max_rows, cost)[0]
    # Two lengths (the base set: answers and descriptions): no padding at all, in two micro-batches.
    lengths = [45] * 24 + [90] * 8
    parts = train_sft.split_by_length(list(range(32)), lengths, 32, 64)
    assert [len(p) for p in parts] == [24, 8] and padding_share(parts, lengths) == 0


def test_steps_split_by_length_have_little_padding():
    # Lengths like the reasoning set's: a long-tailed spread of 40-140 tokens, in random steps of 32 rows.
    g = torch.manual_seed(0)  # the Gamma draw uses the global generator (the guard in conftest.py restores it)
    lengths = (40 + torch.distributions.Gamma(2.0, 0.05).sample((3200,)).clamp(max=100)).long().tolist()
    order = torch.randperm(3200, generator=g).tolist()
    steps = [order[i:i + 32] for i in range(0, 3200, 32)]
    split = [p for s in steps for p in train_sft.split_by_length(s, lengths, 32, cost=64)]
    assert padding_share(steps, lengths) > 0.25 and padding_share(split, lengths) < 0.08
    assert len(split) < 5 * len(steps)  # a few micro-batches a step, not one per row
    # A dearer pass (the default, a CPU's): fewer, longer micro-batches, still far less padding than whole steps
    dear = [p for s in steps for p in train_sft.split_by_length(s, lengths, 32)]
    assert len(dear) < len(split) and padding_share(dear, lengths) < padding_share(steps, lengths) / 1.5


def test_step_batches_are_the_shuffled_steps_of_each_epoch_cut_by_length():
    examples = synthetic_examples(micro_model(), 22)
    ids = {id(ex): i for i, ex in enumerate(examples)}
    rows = lambda step, bs, accum: [[ids[id(ex)] for ex in mb] for mb in train_sft.step_batches(examples, step, bs,
                                                                                                accum, 7)]
    for batch_size, accum in ((4, 1), (2, 3)):
        steps = math.ceil(22 / (batch_size * accum))  # 6 or 4 steps an epoch, the last one short
        epoch = [rows(s, batch_size, accum) for s in range(steps)]
        assert sorted(i for step in epoch for mb in step for i in mb) == list(range(22))  # each row once an epoch
        assert epoch == [rows(s, batch_size, accum) for s in range(steps)]  # from (seed, step) alone, as --resume
        assert all(len(mb) <= batch_size for step in epoch for mb in step)
        order = torch.randperm(22, generator=torch.Generator().manual_seed(7)).tolist()
        n = batch_size * accum
        assert [sorted(i for mb in step for i in mb) for step in epoch] == [sorted(order[k:k + n])
                                                                            for k in range(0, 22, n)]  # the shuffle's
        assert rows(steps, batch_size, accum) != epoch[0]  # the next epoch is another shuffle
    # The same rows make a step whichever way it is cut into micro-batches (grad accumulation, torchrun)
    assert sorted(sum(rows(2, 6, 1), [])) == sorted(sum(rows(2, 2, 3), []))
    # Under torchrun, --grad-accum 1: a step of 8 rows in micro-batches of at most 4, so each of 2 processes has one
    shared = train_sft.step_batches(examples, 0, 8, 1, 7, cost=10**6, processes=2)
    assert [len(mb) for mb in shared] == [4, 4] and sorted(map(id, sum(shared, []))) == sorted(
        map(id, sum(train_sft.step_batches(examples, 0, 8, 1, 7), [])))


@pytest.mark.parametrize("flags, capability, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "bf16"),  # AMD Zen 4, Intel Cooper Lake
    ({"avx2", "avx512f", "amx_bf16"}, "AVX512", "bf16"),  # Intel Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", "fp32"),  # torch told to use AVX2 kernels (ATEN_CPU_CAPABILITY)
    ({"avx2", "avx512f"}, "AVX512", "fp32"),  # Skylake-X: AVX512 without bf16 arithmetic
    ({"avx2", "fma"}, "AVX2", "fp32"),  # AVX2 only: bf16 would be emulated
    ({"fp", "asimd", "bf16"}, "DEFAULT", "bf16"),  # Arm with the BF16 extension
    (set(), "DEFAULT", "fp32"),  # nothing reported (no /proc/cpuinfo)
])
def test_auto_precision_on_the_cpu_follows_what_the_cpu_reports(monkeypatch, capsys, flags, capability, expected):
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    common.announce.cache_clear()
    assert {common.resolve_precision("cpu", "auto") for _ in range(5)} == {expected}  # no timing race
    assert capsys.readouterr().out.count(f"[precision] auto on cpu: {expected}") == 1  # printed once
    assert common.resolve_precision("cpu", "fp32") == "fp32"  # an explicit choice is followed
    common.announce.cache_clear()


def test_cpu_flags_read_the_flags_line(tmp_path):
    x86, arm, other = tmp_path / "x86", tmp_path / "arm", tmp_path / "riscv"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    other.write_text("processor\t: 0\nisa\t\t: rv64imafdc\n")
    assert common.cpu_flags(str(x86)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert common.cpu_flags(str(arm)) == {"fp", "asimd", "bf16", "i8mm"}
    assert common.cpu_flags(str(other)) == common.cpu_flags(str(tmp_path / "missing")) == frozenset()
