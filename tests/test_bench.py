"""bench.py: every measurement runs on the micro preset and gives finite numbers and a full table.

A smoke test, not a timing: one timed run of each figure, no warm-up, small shapes.
"""

import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
import bench  # noqa: E402

CFG = bench.BenchConfig(preset="micro", device="cpu", warmup=0, repeats=1, train_batch=2, seq_len=24,
                        decode_batches="1,2", prompt_text=6, new_tokens=4, dpo_pairs=1)
DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bench.build_models("micro", DEVICE, str(tmp_path_factory.mktemp("bench")))


def finite(values):
    return len(values) > 0 and all(math.isfinite(v) and v > 0 for v in values)


def test_both_implementations_share_the_weights(models):
    ours, ref, _ = models
    assert bench.logits_max_diff(ours, ref, ours.config, DEVICE) < 1e-4


def test_measurements_are_finite_and_the_table_has_every_row(models, tmp_path):
    ours, ref, ckpt = models
    train = bench.bench_training(ours, ref, CFG, DEVICE)
    assert finite(train["ours"]) and finite(train["ref"])
    decoding = {b: bench.bench_decoding(ours, ref, CFG, DEVICE, b) for b in (1, 2)}
    for d in decoding.values():
        assert all(finite(d[impl][kind]) for impl in ("ours", "ref") for kind in ("call", "decode"))
    dpo = bench.bench_dpo(ours, ckpt, CFG, DEVICE, str(tmp_path))
    for kind in ("sft", "dpo"):
        assert finite(dpo[kind]["seconds"])
        assert dpo[kind]["peak"] is None or finite(dpo[kind]["peak"])

    table = bench.report(CFG, DEVICE, ours, 0.0, (1.0, 1.0), train, decoding, dpo, stages=[("base", 90.0), ("dpo", None)])
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert sum(r.startswith("training step, tokens/s") for r in rows) == 1
    for b in (1, 2):
        assert sum(r.startswith(f"decode batch {b},") for r in rows) == 2  # decode phase and whole call
    assert {"SFT (targets on chosen and rejected rows)", "DPO (chosen + rejected in one forward)", "DPO / SFT",
            "base", "dpo"} <= set(rows)
    assert not re.search(r"\b(nan|inf)\b", table)
    assert "1.5 min" in table and "not recorded in its log" in table


def test_preference_batch_layout():
    cfg = bench.get_config("micro")
    batch = bench.preference_batch(cfg, n_pairs=2, seq_len=24)
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (4, 24) and batch["pixel_values"].shape[0] == 4
    chosen, rejected = ids.chunk(2)
    prompt = (targets[0] == -100).sum()
    assert torch.equal(chosen[:, :prompt], rejected[:, :prompt])  # the same prompt and image slots
    assert not torch.equal(chosen[:, prompt:], rejected[:, prompt:])  # different completions
    assert ((ids == cfg.image_token_id).sum(1) == cfg.tokens_per_image).all()


def test_pipeline_times_reads_whatever_logs_exist(tmp_path):
    assert bench.pipeline_times(str(tmp_path / "missing")) == []
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "base.jsonl").write_text("\n".join(json.dumps({"step": s, "elapsed_s": 10.0 * s}) for s in (1, 2, 3)) + "\n")
    (logs / "dpo.jsonl").write_text(json.dumps({"time": 1000.0}) + "\nnot json\n" + json.dumps({"time": 1060.5}) + "\n")
    (logs / "eval.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert dict(bench.pipeline_times(str(logs))) == {"base": 30.0, "dpo": 60.5, "eval": None}


def test_ratio_cell_pairs_the_runs_of_each_round():
    # Rounds 1-3: ours 2, 4, 6 against the reference's 1, 1, 4: medians 4 / 1, per round 2, 4, 1.5.
    assert bench.ratio_cell([2.0, 4.0, 6.0], [1.0, 1.0, 4.0]) == "4.00x (1.50-4.00)"
