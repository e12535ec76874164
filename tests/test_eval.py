"""eval.py: Wilson intervals and the metrics on hand-made predictions (values computed by hand),
the 2x2 chain-vs-final table, the whole run writing results.json / results.md, and the JSONL
benchmark path with open and multiple-choice items.

Model outputs are mocked by replacing the one generation helper, agents.complete, and checkpoint
loading by a stand-in model, so no test trains or decodes anything.
"""

import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image

import agents
import data
import eval as E


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
    assert m["families"] == {
        "color_at": {"kind": "perception", "accuracy": 0.5, "ci": list(E.wilson_interval(1, 2)), "n": 2},
        "most_color": {"kind": "reasoning", "accuracy": 0.0, "ci": list(E.wilson_interval(0, 1)), "n": 1},
        "sum": {"kind": "reasoning", "accuracy": 1.0, "ci": list(E.wilson_interval(2, 2)), "n": 2}}
    assert m["chain_correct"] == 2 / 5
    assert m["chain_vs_final"] == {"chain_right_final_right": 1, "chain_right_final_wrong": 1,
                                   "chain_wrong_final_right": 2, "chain_wrong_final_wrong": 1}
    # A single model without a chain has no chain metrics.
    direct = E.score(ROWS, predictions(with_chain=False))
    assert direct["overall"] == 3 / 5 and "chain_correct" not in direct and "chain_vs_final" not in direct


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
    data.write_jsonl(path, rows)
    return path


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
        os.makedirs(os.path.join(out, stage))
        open(os.path.join(out, stage, "config.json"), "w").close()

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
    assert markdown == E.results_markdown(results)
    assert "| two_agent_dpo1 | 100.0 [51.0, 100.0] |" in markdown  # Wilson 4/4 = [0.510, 1]
    assert "| color_at | perception | 100.0 | 0.0 | 100.0 |" in markdown

    assert list(E.run_eval(out, arms=["two_agent"], limit=2)["arms"]) == ["two_agent"]
    with pytest.raises(FileNotFoundError, match="vanilla"):
        E.run_eval(out, arms=["vanilla"])
    with pytest.raises(FileNotFoundError, match="build the data first"):
        E.run_eval(out, split="nope")


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

    E.main(["--data", path, "--reasoning", str(tmp_path / "reasoner"), "--summary", str(tmp_path / "summarizer"),
            "--out", str(tmp_path)])
    with open(tmp_path / "results_bench.json") as f:
        two = json.load(f)["arms"]["two_agent"]
    assert two["overall"] == 3 / 4 and two["chain_correct"] == 2 / 4  # "cat" = option A for the MC items

    with pytest.raises(SystemExit, match="^error: pass --reasoning and --summary"):
        E.main(["--data", path, "--reasoning", str(tmp_path / "reasoner")])
    with pytest.raises(SystemExit, match="^error: no such file"):
        E.main(["--data", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path / "model")])
