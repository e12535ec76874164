"""eval.py: Wilson intervals, McNemar's exact test and the metrics on hand-made predictions (values
computed by hand), the 2x2 chain-vs-final table, the paired comparisons, the whole run writing
results.json / results.md, the JSONL benchmark path with open and multiple-choice items, and
--summarize over several runs.

Model outputs are mocked by replacing the one generation helper, agents.complete, and checkpoint
loading by a stand-in model, so no test trains or decodes anything.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import agents
import checkpoint
import common
import data
import eval as E
import plots


def test_wilson_interval_hand_values():
    # Wilson (1927): centre (p + z^2/2n) / (1 + z^2/n), half width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    for (k, n), (low, high) in {(8, 10): (0.4902, 0.9433), (3, 5): (0.2307, 0.8824), (50, 100): (0.4038, 0.5962),
                                (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0)}.items():
        got = E.wilson_interval(k, n)
        assert got == pytest.approx((low, high), abs=1e-4), (k, n)
    assert E.wilson_interval(0, 0) == (0.0, 1.0)
    assert E.rate([]) == (None, None)
    share, ci = E.rate([True, True, False, True, False])
    assert share == 0.6 and ci == pytest.approx([0.2307, 0.8824], abs=1e-4)


def test_mcnemar_hand_values():
    # Exact two-sided: 2 * P(Binomial(b + c, 1/2) <= min(b, c)), at most 1.
    assert E.mcnemar(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.03857...
    assert E.mcnemar(2, 10) == E.mcnemar(10, 2)
    assert E.mcnemar(5, 0) == 2 / 32 and E.mcnemar(0, 5) == 2 / 32
    assert E.mcnemar(7, 7) == E.mcnemar(1, 1) == E.mcnemar(0, 0) == 1.0
    assert E.mcnemar(600, 400) == pytest.approx(2.7284641560e-10, rel=1e-9)  # big n, no overflow (= scipy binomtest)


ROWS = [
    {"answer": "3", "family": "sum", "kind": "reasoning"},
    {"answer": "5", "family": "sum", "kind": "reasoning"},
    {"answer": "red", "family": "most_color", "kind": "reasoning"},
    {"answer": "blue", "family": "color_at", "kind": "perception"},
    {"answer": "green", "family": "color_at", "kind": "perception"},
]
# (chain's own answer, final answer): right/right (normalised), wrong/right (recovered),
# right/wrong (spoiled), no answer/right, wrong/wrong.
PREDICTIONS = [("3", "three"), ("4", "5"), ("red", "blue"), (None, "Blue."), ("red", "red")]


def predictions(with_chain=True):
    return [{"chain": "<thoughts>\n</thoughts>" if with_chain else None, "steps": [],
             "chain_answer": c if with_chain else None, "answer": a} for c, a in PREDICTIONS]


def test_metrics_on_hand_made_predictions():
    m = E.score(ROWS, predictions())
    assert m["n"] == 5
    assert (m["overall"], m["reasoning"], m["perception"]) == (3 / 5, 2 / 3, 1 / 2)
    assert m["overall_ci"] == pytest.approx(list(E.wilson_interval(3, 5)))
    assert m["reasoning_ci"] == pytest.approx(list(E.wilson_interval(2, 3)))
    # Per family, where the final answer overrides a right chain or repairs a wrong one (rows 1-2 of sum: right/right,
    # wrong/right; most_color: right/wrong; color_at: no answer/right, wrong/wrong).
    table = lambda rr, rw, wr, ww: {"chain_right_final_right": rr, "chain_right_final_wrong": rw,
                                    "chain_wrong_final_right": wr, "chain_wrong_final_wrong": ww}
    assert m["families"] == {
        "color_at": {"kind": "perception", "accuracy": 0.5, "ci": list(E.wilson_interval(1, 2)), "n": 2,
                     "chain_vs_final": table(0, 0, 1, 1)},
        "most_color": {"kind": "reasoning", "accuracy": 0.0, "ci": list(E.wilson_interval(0, 1)), "n": 1,
                       "chain_vs_final": table(0, 1, 0, 0)},
        "sum": {"kind": "reasoning", "accuracy": 1.0, "ci": list(E.wilson_interval(2, 2)), "n": 2,
                "chain_vs_final": table(1, 0, 1, 0)}}
    assert [plots.override_repair(m["families"][f]) for f in ("color_at", "most_color", "sum")] == [
        "0.0 / 50.0", "100.0 / 0.0", "0.0 / 50.0"]
    assert m["chain_correct"] == 2 / 5
    assert m["chain_vs_final"] == {"chain_right_final_right": 1, "chain_right_final_wrong": 1,
                                   "chain_wrong_final_right": 2, "chain_wrong_final_wrong": 1}
    assert (m["correct"], m["chain_right"]) == ("11010", "10100")  # per question, in row order
    # A single model without a chain has no chain metrics.
    direct = E.score(ROWS, predictions(with_chain=False))
    assert direct["overall"] == 3 / 5 and "chain_correct" not in direct and "chain_vs_final" not in direct
    assert plots.override_repair(direct["families"]["sum"]) == "-"
    assert "chain_right" not in direct


def test_paired_comparisons_hand_made():
    rows = [{"kind": "reasoning"}] * 3 + [{"kind": "perception"}] * 3
    arms = {"direct": {"correct": "000111"}, "vanilla": {"correct": "100000"}, "summary_only": {"correct": "111111"},
            "two_agent": {"correct": "110100", "chain_right": "100100"},
            "two_agent_dpo1": {"correct": "111000", "chain_right": "111000"},
            "two_agent_dpo2": {"correct": "011111"},  # no chain: no chain comparison
            "two_agent_dpo10": {"correct": "111110", "chain_right": "110110"}}  # the last round: 10, not 2
    tests = E.paired_comparisons(arms, rows)
    counts = {key: (t["b"], t["c"], t["n"]) for key, t in tests.items()}
    assert counts == {
        "two_agent_dpo1 vs two_agent": (1, 1, 6), "two_agent_dpo1 vs two_agent (chain)": (2, 1, 6),
        "two_agent_dpo2 vs two_agent": (3, 1, 6),
        "two_agent_dpo10 vs two_agent": (2, 0, 6), "two_agent_dpo10 vs two_agent (chain)": (2, 0, 6),
        "two_agent vs vanilla": (2, 0, 6), "two_agent vs direct (reasoning)": (2, 0, 3),
        "two_agent vs direct (perception)": (0, 2, 3),
        "two_agent_dpo10 vs vanilla": (4, 0, 6), "two_agent_dpo10 vs direct (reasoning)": (3, 0, 3),
        "two_agent_dpo10 vs direct (perception)": (0, 1, 3)}
    assert tests["two_agent_dpo2 vs two_agent"] == {"arms": ["two_agent_dpo2", "two_agent"], "metric": "overall",
                                                    "n": 6, "b": 3, "c": 1, "diff": 2 / 6, "p": 2 * 5 / 16}
    assert tests["two_agent vs direct (perception)"]["diff"] == -2 / 3
    assert tests["two_agent_dpo10 vs two_agent (chain)"]["metric"] == "chain"
    assert tests["two_agent_dpo10 vs direct (reasoning)"]["metric"] == "reasoning"
    assert tests["two_agent_dpo10 vs vanilla"]["p"] == 2 / 16
    # Only where both arms ran, and only on questions of the kind compared.
    assert E.paired_comparisons({k: arms[k] for k in ("two_agent_dpo10", "summary_only")}, rows) == {}
    assert list(E.paired_comparisons({k: arms[k] for k in ("two_agent_dpo1", "vanilla")}, rows)) == [
        "two_agent_dpo1 vs vanilla"]  # the last round present
    assert list(E.paired_comparisons({k: arms[k] for k in ("two_agent", "direct")}, rows[:3])) == [
        "two_agent vs direct (reasoning)"]


def test_chain_vs_final_table():
    assert E.chain_vs_final([True, True, False, False, False], [True, False, True, True, False]) == {
        "chain_right_final_right": 1, "chain_right_final_wrong": 1,
        "chain_wrong_final_right": 2, "chain_wrong_final_wrong": 1}


# ----------------------------------------------------------------------------------------------
# Whole runs with mocked models: each fake checkpoint answers from a script keyed by question.


def write_set(folder, name, items):
    """items: dicts with question, answer (+ choices, family, kind) -> a JSONL with one image each."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i, item in enumerate(items):
        Image.new("RGB", (48, 48), (i * 40, 0, 0)).save(os.path.join(folder, "images", f"{i}.png"))
        rows.append({"id": str(i), "image": f"images/{i}.png", **item})
    path = os.path.join(folder, name)
    common.write_jsonl(path, rows)
    return path


def finished_stage(out, stage):
    """A stage directory as a run leaves it finished: a checkpoint and the marker written last."""
    os.makedirs(os.path.join(out, stage))
    open(os.path.join(out, stage, "config.json"), "w").close()
    marker = checkpoint.ROUND_DONE if stage.startswith("reasoning_dpo") else checkpoint.STAGE_DONE
    with open(os.path.join(out, stage, marker), "w") as f:
        f.write("{}")


def fake_models(monkeypatch, replies):
    """agents.load_vlm -> a stand-in named by its directory; agents.complete -> replies[name](prompt)."""
    prompts = []

    def load_vlm(path, device=None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        return SimpleNamespace(name=os.path.basename(path), config=SimpleNamespace(vision=SimpleNamespace(image_size=48)))

    def complete(vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1, seed=0,
                 precision="auto"):
        assert images.shape == (len(conversations), 3, 48, 48)
        prompts.extend(c[0]["content"] for c in conversations)
        return [replies[vlm.name](c[0]["content"]) for c in conversations]

    monkeypatch.setattr(agents, "load_vlm", load_vlm)
    monkeypatch.setattr(agents, "complete", complete)
    return prompts


WORLD = [{"question": "How many red objects?", "answer": "2", "family": "count", "kind": "reasoning"},
         {"question": "How many blue objects?", "answer": "1", "family": "count", "kind": "reasoning"},
         {"question": "What color is the center object?", "answer": "green", "family": "color_at", "kind": "perception"},
         {"question": "Is there a square?", "answer": "yes", "family": "exists", "kind": "perception"}]
GOLD = {r["question"]: r["answer"] for r in WORLD}


def question_of(prompt):
    return prompt.split("\n")[0]


def test_run_eval_writes_results(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    write_set(os.path.join(out, "data"), "test.jsonl", WORLD)
    for stage in ("base", "reasoning", "summary", "reasoning_dpo1"):  # no vanilla, no summary-only
        finished_stage(out, stage)

    def chain(answer):
        return f"<thoughts>\nCount: objects, so the answer is {answer}.\n</thoughts>"

    fake_models(monkeypatch, {
        "base": lambda p: GOLD[question_of(p)] if "color" in p else "0",  # right on 1 of 4
        "reasoning": lambda p: chain("2"),  # the chain is right on question 1 only
        "reasoning_dpo1": lambda p: chain(GOLD[question_of(p)]),  # always right
        "summary": lambda p: p.split("so the answer is ")[1].split(".")[0] if "answer is" in p else "?",
    })
    results = E.run_eval(out)

    arms = results["arms"]
    assert list(arms) == ["direct", "two_agent", "two_agent_dpo1"]
    assert (arms["direct"]["overall"], arms["direct"]["reasoning"], arms["direct"]["perception"]) == (0.25, 0.0, 0.5)
    assert (arms["two_agent"]["overall"], arms["two_agent"]["chain_correct"]) == (0.25, 0.25)
    assert arms["two_agent"]["chain_vs_final"]["chain_wrong_final_wrong"] == 3
    assert (arms["two_agent_dpo1"]["overall"], arms["two_agent_dpo1"]["chain_correct"]) == (1.0, 1.0)
    assert arms["two_agent_dpo1"]["checkpoints"] == [os.path.join(out, "reasoning_dpo1"), os.path.join(out, "summary")]
    assert arms["direct"]["families"]["color_at"]["accuracy"] == 1.0
    assert "chain_correct" not in arms["direct"]
    meta = results["meta"]
    assert meta["n_questions"] == 4 and meta["split"] == "test" and meta["wall_s"] >= 0
    assert {"platform", "cpus", "torch", "accelerator"} <= set(meta["machine"]) and meta["command"].startswith("python ")

    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    with open(os.path.join(out, "results.md")) as f:
        markdown = f.read()
    assert markdown == plots.results_markdown(results)
    assert "| two_agent_dpo1 | 100.0 [51.0, 100.0] |" in markdown  # Wilson 4/4 = [0.510, 1]
    assert "| color_at | perception | 100.0 | 0.0 | 100.0 |" in markdown

    # Paired tests: the per-question flags, the ids and kinds they follow, and McNemar's p on the same questions.
    assert (arms["direct"]["correct"], arms["two_agent"]["correct"], arms["two_agent_dpo1"]["correct"]) == (
        "0010", "1000", "1111")
    assert meta["ids"] == ["0", "1", "2", "3"] and meta["kinds"] == ["reasoning"] * 2 + ["perception"] * 2
    paired = {key: (t["b"], t["c"], t["p"]) for key, t in results["paired"].items()}
    assert paired == {"two_agent_dpo1 vs two_agent": (3, 0, 0.25), "two_agent_dpo1 vs two_agent (chain)": (3, 0, 0.25),
                      "two_agent vs direct (reasoning)": (1, 0, 1.0), "two_agent vs direct (perception)": (0, 1, 1.0),
                      "two_agent_dpo1 vs direct (reasoning)": (2, 0, 0.5),
                      "two_agent_dpo1 vs direct (perception)": (1, 0, 1.0)}
    assert "Paired comparisons (exact McNemar test on the same questions)" in markdown
    assert "| two_agent_dpo1 vs two_agent | overall | +75.0 | 3 | 0 | 0.250 |" in markdown
    assert "| two_agent vs direct (perception) | perception | -50.0 | 0 | 1 | 1.000 |" in markdown

    one = E.run_eval(out, arms=["two_agent"], limit=2)
    assert list(one["arms"]) == ["two_agent"] and one["paired"] == {}
    assert "Paired comparisons" not in plots.results_markdown(one)
    with pytest.raises(FileNotFoundError, match="vanilla"):
        E.run_eval(out, arms=["vanilla"])
    with pytest.raises(FileNotFoundError, match="build the data first"):
        E.run_eval(out, split="nope")


def test_a_partial_evaluation_never_replaces_the_jobs_results(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    write_set(os.path.join(out, "data"), "test.jsonl", WORLD)
    write_set(os.path.join(out, "data"), "val.jsonl", WORLD[:2])
    for stage in ("base", "reasoning", "summary"):
        finished_stage(out, stage)
    fake_models(monkeypatch, {"base": lambda p: "2", "summary": lambda p: "2",
                              "reasoning": lambda p: "<thoughts>\nCount: objects, so the answer is 2.\n</thoughts>"})
    E.main(["--out", out])
    with open(os.path.join(out, "results.json")) as f:
        whole = f.read()
    for flags, stem in ((["--split", "val", "--limit", "2", "--arms", "direct"], "results_val_limit2_direct"),
                        (["--limit", "3"], "results_test_limit3"), (["--arms", "direct,two_agent"],
                                                                     "results_test_direct+two_agent")):
        part = E.main(["--out", out, *flags])
        with open(os.path.join(out, stem + ".json")) as f:
            assert json.load(f)["arms"].keys() == part["arms"].keys()
        assert os.path.isfile(os.path.join(out, stem + ".md")) and os.path.isfile(os.path.join(out, stem + ".png"))
        with open(os.path.join(out, "results.json")) as f:
            assert f.read() == whole  # the whole job's table is untouched


def test_override_margin_flag_reaches_the_summary_agent_and_the_results(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    write_set(os.path.join(out, "data"), "test.jsonl", WORLD)
    for stage in ("reasoning", "summary"):
        finished_stage(out, stage)
    fake_models(monkeypatch, {"reasoning": lambda p: "<thoughts>\nCount: objects, so the answer is 2.\n</thoughts>",
                              "summary": lambda p: "2"})
    margins, init = [], agents.SummaryAgent.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        margins.append(self.override_margin)

    monkeypatch.setattr(agents.SummaryAgent, "__init__", recording)
    results = E.main(["--out", out, "--arms", "two_agent", "--override-margin", "2.5"])
    assert margins == [2.5] and results["meta"]["override_margin"] == 2.5
    assert "override margin 2.5 nats" in results["meta"]["decoding"]
    assert E.main(["--out", out, "--arms", "two_agent"])["meta"]["override_margin"] == agents.OVERRIDE_MARGIN
    off = E.main(["--out", out, "--arms", "two_agent", "--override-margin=-inf"])
    assert margins[-1] is None and "override margin off" in off["meta"]["decoding"]
    with open(os.path.join(out, "results_test_two_agent.json")) as f:
        assert json.load(f)["meta"]["override_margin"] is None  # valid JSON


def test_evaluate_two_agent(tmp_path, monkeypatch):
    path = write_set(str(tmp_path), "val.jsonl", WORLD)
    fake_models(monkeypatch, {"r": lambda p: "<thoughts>\nCount: objects, so the answer is 1.\n", "s": lambda p: "1"})
    reasoner = SimpleNamespace(name="r", config=SimpleNamespace(vision=SimpleNamespace(image_size=48)))
    summarizer = SimpleNamespace(name="s", config=SimpleNamespace(vision=SimpleNamespace(image_size=48)))
    m = E.evaluate_two_agent(reasoner, summarizer, data.read_jsonl(path), str(tmp_path))
    assert (m["overall"], m["chain_correct"], m["reasoning"]) == (0.25, 0.25, 0.5)


BENCHMARK = [{"question": "What animal is shown?", "answer": "cat"},  # open, answered "A cat."
             {"question": "Which is a bird?", "choices": ["cat", "sparrow", "dog"], "answer": "B"},  # answered "b"
             {"question": "Which barks?", "choices": ["cat", "sparrow", "dog"], "answer": "dog"},  # answered "C. dog"
             {"question": "Which meows?", "choices": ["cat", "sparrow", "dog"], "answer": "A"}]  # answered "C"
REPLIES = {"What animal is shown?": "A cat.", "Which is a bird?": "b", "Which barks?": "C. dog", "Which meows?": "C"}


def test_benchmark_open_and_multiple_choice(tmp_path, monkeypatch, capsys):
    path = write_set(str(tmp_path / "bench"), "bench.jsonl", BENCHMARK)
    for name in ("model", "reasoner", "summarizer"):
        os.makedirs(tmp_path / name)
    prompts = fake_models(monkeypatch, {
        "model": lambda p: REPLIES[question_of(p)],
        "reasoner": lambda p: "<thoughts>\nLook: an animal, so the answer is cat.\n</thoughts>",
        "summarizer": lambda p: REPLIES[question_of(p)]})

    E.main(["--data", path, "--model", str(tmp_path / "model"), "--out", str(tmp_path)])
    with open(tmp_path / "results_bench.json") as f:
        direct = json.load(f)["arms"]["direct"]
    assert direct["overall"] == 3 / 4 and direct["reasoning"] is None and direct["families"] == {}
    assert prompts[1] == "Which is a bird?\nA. cat\nB. sparrow\nC. dog\n" + data.DIRECT_PROMPT  # options shown
    assert "| direct | 75.0 [30.1, 95.4] | - | - | - |" in capsys.readouterr().out  # Wilson 3/4

    # The summary agent is 10 nats surer of its own answers than of the chain's "cat": past the margin, they stand.
    monkeypatch.setattr(agents, "reply_logps", lambda vlm, conversations, replies, images: torch.tensor(
        [-10.0 if r == "cat" else 0.0 for r in replies]))
    E.main(["--data", path, "--reasoning", str(tmp_path / "reasoner"), "--summary", str(tmp_path / "summarizer"),
            "--out", str(tmp_path)])
    with open(tmp_path / "results_bench.json") as f:
        two = json.load(f)["arms"]["two_agent"]
    assert two["overall"] == 3 / 4 and two["chain_correct"] == 2 / 4  # "cat" = option A for the MC items

    with pytest.raises(SystemExit, match="^error: pass --reasoning and --summary"):
        E.main(["--data", path, "--reasoning", str(tmp_path / "reasoner")])
    with pytest.raises(SystemExit, match="^error: no such file"):
        E.main(["--data", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path / "model")])


# ----------------------------------------------------------------------------------------------
# --summarize: several runs' results.json (hand-written) side by side


def write_results(folder, arms, paired=None, ids=None, kinds=None):
    os.makedirs(folder)
    results = {"arms": arms, "meta": {"ids": ids or [str(i) for i in range(10)], **({"kinds": kinds} if kinds else {})}}
    if paired is not None:
        results["paired"] = paired
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)
    return folder


def shares(overall, reasoning, perception, chain=None, **flags):
    return {"overall": overall, "reasoning": reasoning, "perception": perception, "n": 10, "families": {},
            **({"chain_correct": chain} if chain is not None else {}), **flags}


def test_summarize_runs(tmp_path, capsys):
    key = "two_agent vs direct (reasoning)"

    def paired(b, c, n=10):
        return {"arms": ["two_agent", "direct"], "metric": "reasoning", "n": n, "b": b, "c": c, "diff": (b - c) / n,
                "p": E.mcnemar(b, c)}

    run1 = write_results(str(tmp_path / "seed0"), {"direct": shares(0.25, 0.5, 0.0),
                                                   "two_agent": shares(0.5, 0.75, 0.25, 0.5)},
                         {key: paired(4, 1), "two_agent_dpo1 vs two_agent": paired(1, 0)})  # only in this run: not pooled
    run2 = write_results(str(tmp_path / "seed1"), {"direct": shares(0.5, 0.5, 0.5),
                                                   "two_agent": shares(0.75, 1.0, 0.5, 0.25)},
                         {key: paired(2, 3)})
    # A results.json without "paired" but with per-question flags: the tests are computed from them.
    run3 = write_results(str(tmp_path / "seed2"), {"direct": shares(0.25, 0.5, 0.0, correct="0100"),
                                                   "two_agent": shares(0.5, 1.0, 0.0, 0.75, correct="1100")},
                         ids=["a", "b", "c", "d"], kinds=["reasoning"] * 2 + ["perception"] * 2)
    summary = E.summarize([run1, run2, run3])

    assert summary["runs"][run2]["two_agent"] == {"overall": 0.75, "reasoning": 1.0, "perception": 0.5,
                                                  "chain_correct": 0.25}
    mean = summary["mean"]["two_agent"]
    assert mean["runs"] == 3 and mean["overall"] == pytest.approx({"mean": 7 / 12, "min": 0.5, "max": 0.75})
    assert mean["chain_correct"] == pytest.approx({"mean": 0.5, "min": 0.25, "max": 0.75})
    assert summary["mean"]["direct"]["chain_correct"] is None
    # Pooled: b = 4 + 2 + 1, c = 1 + 3 + 0; p = 2 * sum_{i <= 4} C(11, i) / 2^11 = 2 * 562 / 2048.
    assert list(summary["pooled"]) == [key]
    pooled = summary["pooled"][key]
    assert (pooled["b"], pooled["c"], pooled["ahead"], pooled["runs"]) == (7, 4, 2, 3)
    assert pooled["p"] == pytest.approx(2 * 562 / 2048) and pooled["diff"] == pytest.approx((0.3 - 0.1 + 0.5) / 3)
    assert summary["notes"] == ["The runs were evaluated on different questions."]

    E.main(["--summarize", run1, run2, run3])
    out = capsys.readouterr().out
    assert f"| {run2} | two_agent | 75.0 | 100.0 | 50.0 | 25.0 |" in out
    assert f"| {run1} | direct | 25.0 | 50.0 | 0.0 | - |" in out
    assert "| two_agent | 3 | 58.3 (50.0..75.0) | 91.7 (75.0..100.0) | 25.0 (0.0..50.0) | 50.0 (25.0..75.0) |" in out
    assert f"| {key} | reasoning | +23.3 | 7 | 4 | 0.549 | 2 of 3 |" in out

    # An older results.json without per-question results is left out of the pooled tests, with a note.
    old = write_results(str(tmp_path / "old"), {"direct": shares(0.5, 0.5, 0.5), "two_agent": shares(0.5, 0.5, 0.5)})
    summary = E.summarize([run1, old])
    assert summary["pooled"][key]["runs"] == 1 and summary["mean"]["two_agent"]["runs"] == 2
    assert f"{old}/results.json: no paired tests; left out of the pooled ones" in summary["notes"]

    missing = tmp_path / "seed9"
    with pytest.raises(FileNotFoundError, match="seed9/results.json"):
        E.summarize([run1, str(missing)])
    with pytest.raises(SystemExit, match=f"^error: .*{missing}/results.json"):
        E.main(["--summarize", run1, str(missing)])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match=f"^error: {tmp_path / 'bad' / 'results.json'}: unreadable"):
        E.main(["--summarize", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="no run directories given"):
        E.summarize([])
