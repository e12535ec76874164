"""bench.py: every measurement runs on the micro preset and gives finite numbers and a full table.

A smoke test, not a timing: one timed run of each figure, no warm-up, small shapes.
"""

import math
import re
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
import bench  # noqa: E402

CFG = bench.BenchConfig(preset="micro", device="cpu", warmup=0, repeats=1, train_batch=2, seq_len=24,
                        decode_batches="1,2", prompt_text=6, new_tokens=4)
DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bench"))
    return (*bench.build_models("micro", DEVICE, workdir), workdir)  # ours, ref, max |logits diff|, checkpoint


def finite(values):
    return len(values) > 0 and all(math.isfinite(v) and v > 0 for v in values)


def test_both_implementations_share_the_weights(models):
    _, _, max_diff, _ = models
    assert max_diff < 1e-4


def test_measurements_are_finite_and_the_table_has_every_row(models):
    ours, ref, _, ckpt = models
    train = bench.bench_training(ours, ref, CFG, DEVICE)
    assert all(finite(train[kind]) for kind in ("sft", "transformers", "dpo"))
    decoding = {b: bench.bench_decoding(ours, ref, CFG, DEVICE, b) for b in (1, 2)}
    for d in decoding.values():
        assert list(d) == ["decode phase", "whole call"]
        assert all(finite(times[impl]) for times in d.values() for impl in ("ours", "transformers"))
    peaks = bench.peak_memory(ckpt, CFG, DEVICE)
    assert peaks is None or (finite(peaks["sft"]) and finite(peaks["dpo"]))

    table = bench.report(CFG, DEVICE, 0.0, train, decoding, peaks)
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert sum(r.startswith("training step") for r in rows) == 1
    for b in (1, 2):
        assert sum(r.startswith(f"decoding at batch {b},") for r in rows) == 2  # decode phase and whole call
    assert "seconds" in rows and ("peak memory added, MiB" in rows) == (peaks is not None)
    assert not re.search(r"\b(nan|inf)\b", table)


def test_preference_pairs_layout(models):
    ours, cfg = models[0], models[0].config
    batch, ref_logps = bench.training_inputs(ours, replace(CFG, train_batch=4), DEVICE)
    assert all(r.shape == (2,) and torch.isfinite(r).all() for r in ref_logps)  # (chosen, rejected), one per pair
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (4, 24) and batch["pixel_values"].shape[0] == 4
    chosen, rejected = ids.chunk(2)
    prompt = (targets[0] == -100).sum()
    assert torch.equal(chosen[:, :prompt], rejected[:, :prompt])  # the same prompt and image slots
    assert torch.equal(*batch["pixel_values"].chunk(2))  # and the same image
    assert not torch.equal(chosen[:, prompt:], rejected[:, prompt:])  # different completions
    assert ((ids == cfg.image_token_id).sum(1) == cfg.tokens_per_image).all()


def test_ratio_cell_pairs_the_runs_of_each_round():
    # Rounds 1-3: ours 2, 4, 6 against the reference's 1, 1, 4: medians 4 / 1, per round 2, 4, 1.5.
    assert bench.ratio_cell([2.0, 4.0, 6.0], [1.0, 1.0, 4.0]) == "4.00x (1.50-4.00)"
    assert bench.ratio_cell([2.0], [1.0]) == "2.00x"  # one round: no range
