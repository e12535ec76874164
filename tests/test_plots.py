"""eval.py's pictures: results.png drawn from hand-written results (a bar's height follows its value, read back from
the pixels), --plot redrawing it from results.json, --plot-logs drawing one panel per stage from small hand-written
logs, and the one-line errors of a missing logs directory or a --plot-out without a picture to name."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import eval as E
import plots
from test_eval import shares, write_results


def interval(p, n=10):
    return list(E.wilson_interval(round(p * n), n))


def arm(overall, reasoning, perception, chain=None):
    """A results.json arm with its shares and their Wilson intervals, as eval.score writes them."""
    m = shares(overall, reasoning, perception, chain)
    return {**m, **{f"{k}_ci": interval(m[k]) for k in ("overall", "reasoning", "perception", "chain_correct")
                    if k in m}}


def bars(image, colour):
    """The bars of one colour, left to right -> [height in px]: runs of that colour in the lowest row that has it
    (the axis, where every bar stands), each measured up its second column (the interval's caps sit mid-bar)."""
    mask = (np.asarray(image) == colour).all(axis=-1)  # (H, W)
    bottom = max(np.nonzero(mask.any(axis=1))[0])
    columns = np.nonzero(mask[bottom])[0]
    starts = [c for c in columns if c - 1 not in columns]
    return [int(np.argmin(mask[bottom::-1, c + 1])) for c in starts]  # pixels of the colour from the axis up


def test_results_png_bars_follow_their_values(tmp_path, capsys):
    results = {"arms": {"direct": arm(0.25, 0.5, 0.25), "two_agent": arm(0.75, 0.5, 0.8, chain=0.6),
                        "two_agent_dpo1": arm(0.75, 0.75, 0.75, chain=0.7)},
               "meta": {"split": "test"}}
    path = plots.save_png(plots.results_chart(results), str(tmp_path / "pictures" / "results.png"))
    assert capsys.readouterr().out == f"[eval] wrote {path}\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 750)
        overall, reasoning, perception = (bars(image.convert("RGB"), c) for c in plots.GROUPS.values())
    plot_height = 390 - 90  # bar_panel's box: 0% at row 390, 100% at row 90
    assert abs(overall[0] - 1 - 0.25 * plot_height) <= 1 and abs(overall[1] - 1 - 0.75 * plot_height) <= 1
    assert abs((overall[1] - 1) / (overall[0] - 1) - 3) < 0.05  # 75% stands three times as high as 25%
    assert reasoning[0] == reasoning[1] and len(perception) == 3 and perception[2] < perception[1]
    assert bytes(plots.results_chart(results).tobytes()) == bytes(plots.results_chart(results).tobytes())  # deterministic
    grpo = {**results, "arms": {**results["arms"], "two_agent_grpo": arm(0.5, 0.5, 0.5, chain=0.9)}}
    has_grpo = [(np.asarray(plots.results_chart(r)) == plots.GRPO).all(axis=-1).any() for r in (results, grpo)]
    assert has_grpo == [False, True]  # GRPO's point (and legend) only when the arm ran


def test_plot_redraws_from_results_json(tmp_path):
    run = write_results(str(tmp_path / "out"), {"direct": arm(0.5, 0.5, 0.5), "two_agent": arm(0.7, 0.6, 0.8, 0.6)})
    assert E.main(["--plot", run]) is None
    with Image.open(os.path.join(run, "results.png")) as image:
        assert image.size == (1000, 750)
    E.main(["--plot", os.path.join(run, "results.json"), "--plot-out", str(tmp_path / "docs" / "chart.png")])
    assert (tmp_path / "docs" / "chart.png").read_bytes() == (tmp_path / "out" / "results.png").read_bytes()
    with pytest.raises(SystemExit, match=f"^error: no {tmp_path / 'none' / 'results.json'}: evaluate the run first"):
        E.main(["--plot", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="^error: --plot-out names the PNG of either --plot or --plot-logs"):
        E.main(["--plot-out", str(tmp_path / "x.png")])


def write_log(folder, name, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_plot_logs_one_panel_per_stage(tmp_path, capsys):
    logs = str(tmp_path / "out" / "logs")
    sft = [{"step": s, "loss": 10 / s, "lr": 1e-3, **({"val_loss": 12 / s} if s % 5 == 0 else {})} for s in range(1, 11)]
    write_log(logs, "reasoning.jsonl", sft)
    write_log(logs, "base.jsonl", sft[:4])
    # DPO restarts its steps every round, between events; GRPO logs no loss on a step where every group tied.
    write_log(logs, "dpo.jsonl", [{"event": "round", "round": "sft", "val/two_agent": 0.5}]
              + [{"round": t, "step": s, "loss": 0.69 + 0.01 * s} for t in (1, 2) for s in range(3)])
    write_log(logs, "grpo.jsonl", [{"event": "eval", "step": 0, "val/two_agent": 0.5}, {"step": 1, "reward": 0.5},
                                   {"step": 2, "loss": -0.01, "reward": 0.6}, {"step": 3, "loss": 0.02}])
    write_log(logs, "vanilla.jsonl", [])  # an empty log: no panel

    assert plots.read_log(os.path.join(logs, "dpo.jsonl")) == ([(i + 1, 0.69 + 0.01 * (i % 3)) for i in range(6)], [], [4])
    assert plots.read_log(os.path.join(logs, "grpo.jsonl"))[0] == [(2, -0.01), (3, 0.02)]
    assert plots.plot_logs(logs) == ["base", "reasoning", "dpo", "grpo"]  # in training order
    assert capsys.readouterr().out == f"[eval] wrote {tmp_path / 'out' / 'training.png'}\n"
    with Image.open(tmp_path / "out" / "training.png") as image:
        assert image.size == (3 * plots.PANEL[0], 50 + 2 * plots.PANEL[1])  # four panels, three to a row
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == plots.VAL).all(axis=-1).any() and (pixels == plots.TRAIN).all(axis=-1).any()

    E.main(["--plot-logs", logs, "--plot-out", str(tmp_path / "docs" / "training.png")])
    assert (tmp_path / "docs" / "training.png").read_bytes() == (tmp_path / "out" / "training.png").read_bytes()


def test_plot_logs_missing_or_empty(tmp_path):
    missing = tmp_path / "out" / "logs"
    with pytest.raises(SystemExit) as e:
        E.main(["--plot-logs", str(missing)])
    message = str(e.value)
    assert message == f"error: no training logs in {missing}: train first (python train_dpo.py --iters 3 writes " \
                      "them to out/logs)" and "\n" not in message
    write_log(str(missing), "base.jsonl", [])
    with pytest.raises(SystemExit, match="^error: no training logs in"):
        E.main(["--plot-logs", str(missing)])


def test_valid_json_of_the_wrong_shape_or_nan_losses_are_one_line_errors_or_left_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for arms in ({"direct": "not an object"}, {"two_agent": {"overall": "high"}}):
        (run / "results.json").write_text(json.dumps({"arms": arms}))
        for argv in (["--plot", str(run)], ["--summarize", str(run)]):
            with pytest.raises(SystemExit) as e:
                E.main(argv)
            assert str(e.value).startswith(f"error: {run / 'results.json'}: not a results.json of eval.py")
            assert "\n" not in str(e.value)
    (run / "results.json").write_text(json.dumps({"arms": {"direct": {"overall": 0.5}}, "paired": {"x": [1, 2]}}))
    with pytest.raises(SystemExit, match=f"^error: {run / 'results.json'}: not a results.json of eval.py"):
        E.main(["--summarize", str(run)])
    logs = str(tmp_path / "out" / "logs")
    write_log(logs, "base.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan"), "val_loss": 1.0},
                                   {"step": 3, "loss": float("inf")}, {"step": 4, "loss": 1.0}])
    assert plots.read_log(os.path.join(logs, "base.jsonl")) == ([(1, 2.0), (4, 1.0)], [(2, 1.0)], [])
    assert plots.plot_logs(logs) == ["base"]  # the diverged steps are left out of the picture
    write_log(logs, "reasoning.jsonl", [{"step": 1, "loss": {"mean": 2.0}}, "a line that is no object"])
    with pytest.raises(SystemExit, match=f"^error: {os.path.join(logs, 'reasoning.jsonl')}:"):
        E.main(["--plot-logs", logs])


def test_the_dpo_rounds_table():
    rows = [{"round": "sft", "val/chain_correct": 0.5, "val/two_agent": 0.625},
            {"round": "dpo1", "pairs": 12, "rewards/accuracies": 0.75, "rewards/margins": 0.1, "sample_correct": 0.25,
             "val/chain_correct": 0.5, "val/two_agent": 0.6, "weight_change": 0.000123}]
    assert plots.rounds_table(rows) == [
        "| round | pairs | reward acc | margin | weight change | samples correct | chain correct | two-agent acc |",
        "|---|---|---|---|---|---|---|---|",
        "| sft | - | - | - | - | - | 0.500 | 0.625 |",
        "| dpo1 | 12 | 0.750 | 0.100 | 1.2e-04 | 0.250 | 0.500 | 0.600 |"]


def test_the_grpo_table_puts_each_val_report_beside_its_step():
    steps = [{"step": 1, "reward": 0.5, "solved": 0.25, "skipped_groups": 3}]
    evals = [{"step": 0, "val/chain_correct": 0.5, "val/two_agent": 0.5},
             {"step": 1, "val/chain_correct": 0.75, "val/two_agent": 0.625}]
    assert plots.grpo_table(steps, evals)[2:] == ["| 0 | - | - | - | 0.500 | 0.500 |",
                                                  "| 1 | 0.500 | 0.250 | 3 | 0.750 | 0.625 |"]
