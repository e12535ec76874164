"""Tests for data.py: the world, the teacher, the assessment, the SFT sets, chat rendering,
real-data loading and the command line. Hermetic: every world is built small in a temporary
directory. The model-backed generator and judge for real data are tested in test_agents.py."""
import ast
import json
import os
import random
import re
from dataclasses import asdict, fields

import pytest
import torch
from PIL import Image

import data
import world

SMALL = dict(train_scenes=40, val_scenes=6, test_scenes=10)
NO_ERRORS = {f.name: 0.0 for f in fields(world.ErrorRates)}


@pytest.fixture(scope="module")
def built_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    card = data.build_world(str(out), **SMALL)
    return str(out), card


def rows(out, name):
    return data.read_jsonl(os.path.join(out, f"{name}.jsonl"))


def all_bytes(root):
    found = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                found[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return found


# ---------------------------------------------------------------------------- the world

def test_same_seed_same_bytes(built_world, tmp_path):
    out, _ = built_world
    data.build_world(str(tmp_path / "again"), **SMALL)
    data.build_world(str(tmp_path / "other"), **{**SMALL, "seed": 1})
    first, again, other = all_bytes(out), all_bytes(tmp_path / "again"), all_bytes(
        tmp_path / "other")
    assert first.keys() == again.keys() and "tokenizer.json" in first
    assert all(first[k] == again[k] for k in first), [k for k in first if first[k] != again[k]]
    assert first["train.jsonl"] != other["train.jsonl"]


def test_splits_disjoint_and_test_size(built_world):
    out, _ = built_world
    split = {s: rows(out, s) for s in ("train", "val", "test")}
    scenes = {s: {r["scene"] for r in rs} for s, rs in split.items()}
    graphs = {s: {json.dumps([(o["cell"], o["shape"], o["color"], o["size"])
                              for o in r["objects"]]) for r in rs} for s, rs in split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not scenes[a] & scenes[b] and not graphs[a] & graphs[b]
    ids = [r["id"] for rs in split.values() for r in rs]
    assert len(ids) == len(set(ids))
    for r in split["train"]:
        assert {"id", "image", "question", "answer", "family", "kind", "scene"} <= r.keys()
    cfg = data.DataConfig()  # the default test split alone: >= 1000 questions, fixed seed
    test, _ = world.make_split("test", cfg.test_scenes, cfg, set())
    assert len(test) >= 1000
    assert set(r["family"] for r in test) == set(world.FAMILIES)


def rederive(question, objects):
    """An independent answer from the question text and the objects' pixel positions."""
    at = {(o["y"] // 16, o["x"] // 16): o for o in objects}

    def group(phrase):
        words = phrase.split()
        color = words[0] if words[0] in world.COLORS else None
        head = words[-1]
        shape = None if head == "objects" else head.rstrip("s")
        return [o for o in objects if (color is None or o["color"] == color)
                and (shape is None or o["shape"] == shape)]

    rows_, cols_ = {"top": 0, "middle": 1, "bottom": 2}, {"left": 0, "right": 2}
    if m := re.fullmatch(r"What (color|shape) is the object at (.+)\?", question):
        place = m[2].split()
        rc = (1, 1) if place == ["center"] else (rows_[place[0]], cols_.get(place[1], 1))
        return at[rc][m[1]]
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"Are there more (.+) than (.+)\?", question):
        return "yes" if len(group(m[1])) > len(group(m[2])) else "no"
    if m := re.fullmatch(r"How many more (.+) than (.+) are there\?", question):
        return str(len(group(m[1])) - len(group(m[2])))
    if m := re.fullmatch(r"How many (.+) and (.+) are there in total\?", question):
        return str(len(group(m[1])) + len(group(m[2])))
    if m := re.fullmatch(r"How many objects are (left of|right of|above|below) the (\w+) (\w+)\?",
                         question):
        ref = next(o for o in objects if o["color"] == m[2] and o["shape"] == m[3])
        rx, ry = ref["x"] // 16, ref["y"] // 16
        test = {"left of": lambda o: o["x"] // 16 < rx, "right of": lambda o: o["x"] // 16 > rx,
                "above": lambda o: o["y"] // 16 < ry, "below": lambda o: o["y"] // 16 > ry}
        return str(sum(map(test[m[1]], objects)))
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        return str(len(group(m[1])))
    assert question == "Which color has the most objects?", question
    counts = sorted(((sum(o["color"] == c for o in objects), c) for c in world.COLORS),
                    reverse=True)
    assert counts[0][0] > counts[1][0]
    return counts[0][1]


def test_answers_agree_with_independent_rederivation(built_world):
    out, _ = built_world
    for split in ("train", "val", "test"):
        for r in rows(out, split):
            assert rederive(r["question"], r["objects"]) == r["answer"], r
            assert r["kind"] == world.FAMILIES[r["family"]]


def test_rendering_shows_each_object_at_its_place_in_its_colour(built_world):
    out, _ = built_world
    for r in rows(out, "train")[:60]:
        img = Image.open(os.path.join(out, r["image"])).convert("RGB")
        assert img.size == (48, 48)
        px = img.load()
        by_cell = {o["cell"]: o for o in r["objects"]}
        for i, cell in enumerate(world.CELLS):
            y0, x0 = divmod(i, 3)
            block = [px[x, y] for y in range(y0 * 16, y0 * 16 + 16)
                     for x in range(x0 * 16, x0 * 16 + 16)]
            lit = [p for p in block if p != world.BACKGROUND]
            if cell not in by_cell:
                assert not lit, f"{r['image']}: {cell} should be empty"
                continue
            o = by_cell[cell]
            rgb = world.COLORS[o["color"]]
            assert px[o["x"], o["y"]] == rgb  # the recorded centre has the recorded colour
            assert set(lit) == {rgb} and len(lit) >= 20  # visible, inside its cell, one colour
            assert (len(lit) > 70) == (o["size"] == "large")


def test_load_image_normalises_and_rejects_corrupt(built_world, tmp_path):
    out, _ = built_world
    x = data.load_image(os.path.join(out, rows(out, "test")[0]["image"]), 48)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert data.load_image(os.path.join(out, rows(out, "test")[0]["image"]), 32).shape[-1] == 32
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        data.load_image(str(bad), 48)
    with pytest.raises(FileNotFoundError):
        data.load_image(str(tmp_path / "missing.png"), 48)


def test_a_decompression_bomb_is_a_one_line_error(built_world, tmp_path, monkeypatch):
    out, _ = built_world
    path = os.path.join(out, rows(out, "test")[0]["image"])
    (tmp_path / "bench.jsonl").write_text(json.dumps({"image": path, "question": "q?", "answer": "a"}) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 48 x 48 picture is then a bomb (> 2 x the limit)
    with pytest.raises(ValueError, match=f"^cannot read image {re.escape(path)}: .*decompression bomb"):
        data.load_image(path, 48)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'bench.jsonl'))}:1: corrupt image"):
        data.read_jsonl(str(tmp_path / "bench.jsonl"), check_images=True)


def test_load_image_turns_photos_upright_and_keeps_16_bit_grey(tmp_path):
    # A phone photo stored sideways: left half red, right half blue, EXIF orientation 6 (turn 90 degrees clockwise).
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "sideways.jpg", exif=exif)
    x = data.load_image(str(tmp_path / "sideways.jpg"), 16)
    assert x[0, 2, 8] > 0.9 and x[2, 2, 8] < -0.9  # red on top
    assert x[2, 13, 8] > 0.9 and x[0, 13, 8] < -0.9  # blue below
    # 16-bit grey: a ramp to 3/4 of the 16-bit range, not clipped to white.
    ramp = (torch.arange(64).view(1, 64).expand(8, 64) * 768).numpy().astype("uint16")  # 0 .. 48384
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    y = data.load_image(str(tmp_path / "grey16.png"), 64)
    assert y[0, 0, 0] == -1 and abs((y[0, 0, -1] + 1) / 2 - 48384 / 65535) < 0.01 and (y[0] == y[1]).all()


# ---------------------------------------------------------------- teacher and assessment

def teacher_paths(out, rates, n=4):
    cfg = data.DataConfig(**{**NO_ERRORS, **rates})
    teacher, scorer, filt = world.ScriptedTeacher(cfg), data.SceneStepScorer(), data.AnswerFilter()
    results = []
    for r in rows(out, "train") + rows(out, "val"):
        paths = teacher.generate(r, n, random.Random(r["id"]))
        for p, s in zip(paths, scorer.score(r, paths)):
            results.append((r, p, s, filt.judge(r, p["final_answer"])))
    return results


def test_error_free_teacher_passes_with_top_score(built_world):
    out, _ = built_world
    results = teacher_paths(out, {})
    assert {r["family"] for r, *_ in results} == set(world.FAMILIES)
    for r, p, score, correct in results:
        assert correct and score == 100 and data.bucket(score) == "high", (r, p)
        assert p["steps"][-1]["next_action"] == "final_answer"
        assert all(s["next_action"] == "continue" for s in p["steps"][:-1])
        assert 1 <= len(p["steps"]) <= 6 and not p["errors"]


@pytest.mark.parametrize("mistake", [f.name for f in fields(world.ErrorRates)])
def test_each_mistake_lowers_the_score(built_world, mistake):
    out, _ = built_world
    hit = [(p, s) for r, p, s, c in teacher_paths(out, {mistake: 1.0}) if p["errors"]]
    assert len(hit) > 20
    for p, score in hit:
        assert p["errors"] == [mistake] and score < 100 and data.bucket(score) != "high"


def test_wrong_conclusion_keeps_the_steps_and_changes_the_answer(built_world):
    # The mistake the summary agent must learn to see through: every step is the flawless
    # chain's, only the stated answer differs, and what the last step implies is the truth.
    out, _ = built_world
    teacher = world.ScriptedTeacher(data.DataConfig(**NO_ERRORS))
    for r, p, score, correct in teacher_paths(out, {"wrong_conclusion": 1.0}):
        flawless = teacher.path(r, random.Random(0))
        implied = world.answer_of(world.parse_claim(p["steps"][-1]), r["spec"])
        assert [world.parse_claim(s) for s in p["steps"]] == [world.parse_claim(s) for s in flawless["steps"]]
        assert implied == r["answer"] and p["final_answer"] != r["answer"] and not correct
        assert score == 51 and data.bucket(score) == "mid"


def test_scorer_reads_text_and_penalises_garbage(built_world):
    out, _ = built_world
    r = next(x for x in rows(out, "train") if x["family"] == "compare")
    path = world.ScriptedTeacher(data.DataConfig(**NO_ERRORS)).path(r, random.Random(0))
    chain = data.render_chain(path["steps"])
    scorer = data.SceneStepScorer()
    garbage = "<thoughts>\nStep: I think so\n</thoughts>"
    assert scorer.score(r, [path, chain, garbage, ""]) == [100, 100, 1, 1]


def test_sft_sets_buckets_and_summary_ratio(built_world):
    out, card = built_world
    cfg = data.DataConfig(**SMALL)
    paths = rows(out, "paths")
    questions = {r["id"]: r for r in rows(out, "train")}
    assert len(paths) == len(questions) * cfg.paths_per_question
    for p in paths:
        assert p["bucket"] == data.bucket(p["score"], cfg.high, cfg.mid)
        assert p["correct"] == data.is_correct(p["final_answer"], questions[p["id"]]["answer"])
    assert {p["bucket"] for p in paths} == {"high", "mid", "low"}
    # reasoning set: only High paths with the right answer, up to the configured number each
    best = {}
    for p in paths:
        if p["bucket"] == "high" and p["correct"]:
            best.setdefault(p["id"], data.render_chain(p["steps"]))
    reasoning = rows(out, "reasoning_sft")
    assert {r["id"]: r["chain"] for r in reasoning} == best
    for r in reasoning:
        assert r["task"] == "reasoning" and data.chain_answer(r["chain"]) == r["answer"]
    # summary set: sound and flawed chains at the configured ratio, target = the gold answer
    summary = rows(out, "summary_sft")
    sound = [r for r in summary if r["task"] == "summary" and r["bucket"] == "high"
             and r["chain_correct"]]
    flawed = [r for r in summary if r["task"] == "summary" and r not in sound]
    direct = [r for r in summary if r["task"] == "direct"]
    assert len(sound) == len(reasoning) and len(flawed) == round(len(sound) *
                                                                  cfg.flawed_per_sound)
    assert any(not r["chain_correct"] for r in flawed)  # wrong-answer chains are in it
    pool = sum(q["kind"] == "perception" for q in questions.values())
    assert len(direct) == min(pool, round(cfg.summary_perception * (len(sound) + len(flawed))))
    assert all(r["kind"] == "perception" for r in direct)
    for r in summary:
        assert r["answer"] == questions[r["id"]]["answer"]
    assert card["summary_sft"]["correct:flawed"] == f"{len(sound)}:{len(flawed)}"
    base = rows(out, "base")
    assert {r["task"] for r in base} == {"describe", "direct"}
    assert card["sets"] == {"base": len(base), "reasoning_sft": len(reasoning),
                            "summary_sft": len(summary)}
    with open(os.path.join(out, "card.json")) as f:
        assert json.load(f)["paths"]["chain_tokens_max"] > 0


def test_bucket_thresholds():
    assert [data.bucket(s) for s in (100, 90, 89, 50, 49, 1)] == [
        "high", "high", "mid", "mid", "low", "low"]
    assert data.bucket(70, high=70, mid=30) == "high"


# ---------------------------------------------------------------- chains and answers

def test_chain_round_trip_and_tolerant_parsing():
    steps = [{"title": "Count", "content": "red objects at top left, total 1.",
              "next_action": "continue"},
             {"title": "Add", "content": "1 + 2 = 3, so the answer is 3.",
              "next_action": "final_answer"}]
    text = data.render_chain(steps)
    assert text.startswith("<thoughts>\n") and text.endswith("\n</thoughts>")
    assert data.parse_chain(text) == [{k: s[k] for k in ("title", "content")} for s in steps]
    assert data.chain_answer(text) == data.chain_answer(steps) == "3"
    truncated = "<thoughts>\nCount: red objects at top left, total 1.\nAdd: 1 + 2 ="
    assert len(data.parse_chain(truncated)) == 2 and data.chain_answer(truncated) is None
    assert data.parse_chain("") == data.parse_chain("<thoughts>\n</thoughts>") == []
    assert data.parse_chain("no tags here")[0]["content"] == "no tags here"
    assert world.parse_claim(steps[1]) == {"kind": "add", "a": 1, "b": 2, "n": 3}


def test_normalised_match():
    assert data.is_correct("Three.", "3") and data.is_correct("The answer is yes", "yes")
    assert data.is_correct(" Red ", "red") and not data.is_correct("", "")
    assert not data.is_correct("4", "3") and not data.is_correct(None, "3")
    choices = ["a cat", "a dog"]
    assert data.is_correct("(B)", "B", choices) and data.is_correct("dog", "B", choices)
    assert data.is_correct("B. a dog", "a dog", choices) and not data.is_correct("A", "B", choices)


# ---------------------------------------------------------------- tokenizer and chat

def test_tokenizer_round_trip_numbers_and_specials(built_world):
    out, _ = built_world
    tok = data.load_tokenizer(out)
    ids = data.special_ids(tok)
    assert ids["pad"] == 0 and len(set(ids.values())) == 6
    text = "Count: red objects at top left, total 12.\n\n  Add: 3 + 4 = 7 ünïcode <image>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    for d in range(10):  # each small number is one token after a space
        assert len(tok.encode(f" {d}").ids) == 1
    for word in ("red", "triangle", "center", "objects"):
        assert len(tok.encode(f" {word}").ids) == 1
    with pytest.raises(FileNotFoundError, match="python data.py"):
        data.load_tokenizer(os.path.join(out, "nowhere"))


def test_chat_mask_covers_exactly_the_assistant_tokens(built_world):
    out, _ = built_world
    tok = data.load_tokenizer(out)
    sp = data.special_ids(tok)
    msgs = data.task_messages("summary", "How many circles are there?",
                              data.render_chain([]), "2")
    ids, mask = data.render_conversation(tok, msgs, image_seq_len=9)
    assert len(ids) == len(mask) and ids.count(sp["image"]) == 9
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        " 2<end_of_utterance>"
    expected = ("<|im_start|>User:<fake_token_around_image><global-img>" + "<image>" * 9 +
                "<fake_token_around_image>" + msgs[0]["content"] +
                "<end_of_utterance>\nAssistant: 2<end_of_utterance>\n")
    assert tok.decode(ids, skip_special_tokens=False) == expected
    prompt, pmask = data.render_conversation(tok, msgs[:1], 9, add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and not any(pmask)
    assert tok.decode(prompt, skip_special_tokens=False).endswith("\nAssistant:")
    # two assistant turns, a system turn, a text-only user turn
    turns = [{"role": "system", "content": "Be brief."}] + msgs + [
        {"role": "user", "content": "And squares?"}, {"role": "assistant", "content": "1"}]
    ids, mask = data.render_conversation(tok, turns, 9)
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == " 2<end_of_utterance> 1<end_of_utterance>"
    assert "System: Be brief.<end_of_utterance>\n" in tok.decode(ids, skip_special_tokens=False)


def test_task_messages():
    for task in ("direct", "describe", "summary", "summary_only"):
        assert data.task_messages(task, "Q?", "<thoughts>\n</thoughts>", "3")[-1] == {
            "role": "assistant", "content": "3"}
        assert len(data.task_messages(task, "Q?", "<thoughts>\n</thoughts>")) == 1
    reasoning = data.task_messages("reasoning", "Q?", "CHAIN", "3")
    assert reasoning[-1]["content"] == "CHAIN" and data.REASONING_PROMPT in reasoning[0]["content"]
    assert data.task_messages("vanilla", "Q?", "CHAIN", "3")[-1]["content"] == "CHAIN\n3"
    assert "CHAIN" in data.task_messages("summary", "Q?", "CHAIN")[0]["content"]
    assert data.task_messages("reasoning", "Q?")[0]["image"] is True
    with pytest.raises(ValueError, match="unknown task"):
        data.task_messages("nope", "Q?")


# ---------------------------------------------------------------- real data

def test_bad_real_lines_are_named_and_skipped(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    good = {"image": "ok.png", "question": "Q?", "answer": "A"}
    lines = [json.dumps(good),
             "{not json",
             json.dumps({"image": "ok.png", "question": "Q?"}),
             json.dumps({**good, "image": "missing.png"}),
             json.dumps({**good, "image": "corrupt.png"}),
             json.dumps({**good, "choices": ["x", "y"], "answer": "B"})]
    path = tmp_path / "real.jsonl"
    path.write_text("\n".join(lines) + "\n")
    required = ("image", "question", "answer")
    for line, reason in ((2, "Expecting|JSON"), (3, "missing field 'answer'"),
                         (4, "image not found"), (5, "corrupt image")):
        bad = tmp_path / f"bad{line}.jsonl"
        bad.write_text(lines[0] + "\n" + lines[line - 1] + "\n")
        with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:2: ({reason})"):
            data.read_jsonl(str(bad), required=required, check_images=True)
    kept = data.read_jsonl(str(path), skip_bad=True, required=required, check_images=True)
    assert len(kept) == 2 and kept[1]["choices"] == ["x", "y"]
    assert "skipped 4 bad lines" in capsys.readouterr().err
    data.main(["--real", str(path), "--skip-bad"])
    assert "2 usable examples" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=rf"error: .*real.jsonl:2:"):
        data.main(["--real", str(path)])
    with pytest.raises(FileNotFoundError):
        data.read_jsonl(str(tmp_path / "none.jsonl"))


# ---------------------------------------------------------------- command line and imports

def test_cli_defaults_are_data_config_defaults(monkeypatch, capsys):
    built = []
    monkeypatch.setattr(data, "build_world", lambda out, **options: built.append((out, options)) or {})
    data.main([])
    assert built == [("out/data", asdict(data.DataConfig()))]
    data.main(["--out", "elsewhere", "--train-scenes", "5", "--wrong-conclusion", "0.15"])
    assert built[-1] == ("elsewhere", {**asdict(data.DataConfig()), "train_scenes": 5,
                                       "wrong_conclusion": 0.15})
    assert "wrote elsewhere" in capsys.readouterr().out


def test_data_imports_nothing_above_it():
    """Imports go one way (model <- data <- generate <- train_sft <- agents <- ...): not even a
    function of data.py may import a file above it."""
    with open(data.__file__) as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    above = {"generate", "train_sft", "agents", "eval", "train_dpo", "train_grpo", "bench"}
    assert not imported & above and "torch" in imported  # the walk did find the imports


# ---------------------------------------------------------------- the first wrong step

def sound_steps(rec, answer=None):
    """The question's reference chain as steps, its last step stating `answer` (default: the true one)."""
    claims = world.solve(rec["objects"], rec["spec"])
    return [world.to_step(c) for c in claims[:-1]] + [world.to_step(claims[-1], answer or rec["answer"])]


def wrong_answer(answer):
    """An answer that is not `answer`, of the same kind."""
    if answer.isdigit():
        return str(int(answer) + 1)
    if answer in ("yes", "no"):
        return {"yes": "no", "no": "yes"}[answer]
    pool = list(world.COLORS) if answer in world.COLORS else list(world.SHAPES) + ["none"]
    return next(a for a in pool if a != answer)


def false_look(rec):
    """A readable but false step: the first object's colour misread."""
    o = rec["objects"][0]
    other = next(c for c in world.COLORS if c != o["color"])
    return {"title": "Look", "content": f"{o['cell']} has a {o['size']} {other} {o['shape']}."}


def test_first_error_is_none_for_a_right_chain(built_world):
    out, _ = built_world
    scorer = data.SceneStepScorer()
    for r in rows(out, "train"):
        steps = sound_steps(r)
        assert scorer.first_error(r, data.render_chain(steps)) is None
        assert scorer.first_error(r, {"steps": steps}) is None  # a path dict reads the same
        assert scorer.first_error(r, data.render_chain([false_look(r)] + steps)) is None  # the answer decides


def test_first_error_finds_the_first_false_or_unreadable_step(built_world):
    out, _ = built_world
    scorer = data.SceneStepScorer()
    multi = [r for r in rows(out, "train") if len(world.solve(r["objects"], r["spec"])) >= 2]
    assert {r["family"] for r in multi} >= {"sum", "difference", "spatial_count", "most_color"}
    for r in multi:
        wrong = wrong_answer(r["answer"])
        steps = sound_steps(r, wrong)
        last = len(steps) - 1
        for i in range(len(steps)):
            for bad in (false_look(r), {"title": "Count", "content": "I think there are some."}):
                corrupted = [dict(s) for s in steps]
                corrupted[i] = dict(bad, content=bad["content"].rstrip(".") + (
                    f", so the answer is {wrong}." if i == last else "."))
                assert scorer.first_error(r, data.render_chain(corrupted)) == i, (r["question"], i, bad)
            # two wrong steps: the first one counts
            if i < last:
                corrupted = [dict(s) for s in steps]
                corrupted[i] = false_look(r)
                corrupted[last] = dict(false_look(r), content=f"x, so the answer is {wrong}.")
                assert scorer.first_error(r, data.render_chain(corrupted)) == i


def test_first_error_of_right_steps_and_a_wrong_answer_is_the_last_step(built_world):
    out, _ = built_world
    scorer = data.SceneStepScorer()
    for r in rows(out, "train"):
        steps = sound_steps(r, wrong_answer(r["answer"]))
        assert scorer.first_error(r, data.render_chain(steps)) == len(steps) - 1
        assert scorer.first_error(r, data.render_chain(steps[:-1])) == max(0, len(steps) - 2)  # stops, no answer


def test_first_error_of_an_empty_chain_is_zero(built_world):
    out, _ = built_world
    scorer = data.SceneStepScorer()
    r = rows(out, "train")[0]
    assert scorer.first_error(r, "") == 0
    assert scorer.first_error(r, data.render_chain([])) == 0
    assert scorer.first_error(r, {"steps": [], "final_answer": wrong_answer(r["answer"])}) == 0


# ---------------------------------------------------------------- extra splits and split-free tokenizer

def test_val_split_default_is_400_scenes():
    assert data.DataConfig().val_scenes == 400


def test_tokenizer_train_and_test_do_not_depend_on_the_val_split(tmp_path):
    tiny = dict(train_scenes=6, test_scenes=2)
    data.build_world(str(tmp_path / "a"), val_scenes=1, **tiny)
    data.build_world(str(tmp_path / "b"), val_scenes=3, **tiny)
    a, b = all_bytes(tmp_path / "a"), all_bytes(tmp_path / "b")
    assert a["val.jsonl"] != b["val.jsonl"]  # the val splits do differ
    for name in ("tokenizer.json", "train.jsonl", "test.jsonl"):
        assert a[name] == b[name], name


@pytest.fixture
def small_world(tmp_path):
    """A tiny world of 4-object scenes (the default draws 3 to 7)."""
    out = str(tmp_path / "world")
    data.build_world(out, train_scenes=6, val_scenes=2, test_scenes=2, min_objects=4, max_objects=4)
    return out


def test_extra_split_has_new_scenes_images_and_rows(small_world):
    out = small_world
    taken = {world.scene_graph(r["objects"]) for s in ("train", "val", "test") for r in rows(out, s)}
    before = set(os.listdir(os.path.join(out, "images")))
    extra = data.extra_split(out, "dpo1-seed0", 7)  # 3 questions a scene: 3 scenes, 9 questions, 7 returned
    assert len(extra) == 7
    assert len({r["id"] for r in extra}) == 7 and all(r["id"].startswith("dpo1-seed0-") for r in extra)
    assert rows(out, "dpo1-seed0")[:7] == extra  # written to out/<split>.jsonl
    assert all(world.scene_graph(r["objects"]) not in taken for r in extra)
    assert all(len(r["objects"]) == 4 for r in extra)  # the world's own config (4 objects), not the default
    assert rows(out, "train")[0].keys() == extra[0].keys()
    added = set(os.listdir(os.path.join(out, "images"))) - before
    assert {os.path.basename(r["image"]) for r in extra} <= added
    for r in extra:
        with Image.open(os.path.join(out, r["image"])) as im:
            assert im.size == (48, 48)
        assert rederive(r["question"], r["objects"]) == r["answer"]


def test_extra_split_is_deterministic(small_world):
    first = data.extra_split(small_world, "pool", 5)
    written = all_bytes(small_world)
    assert data.extra_split(small_world, "pool", 5) == first
    assert all_bytes(small_world) == written  # the same file and images, byte for byte
    other = data.extra_split(small_world, "pool2", 5)  # another name: other scenes
    assert [r["objects"] for r in other] != [r["objects"] for r in first]


# ----------------------------------------------------------------------------------------------
# The hard splits: larger scenes than any SFT set has, where RL is tried at the edge of the agent's competence


def test_hard_splits_have_larger_scenes_no_sft_set_sees_and_leave_the_world_as_it_was(tmp_path):
    sizes = dict(train_scenes=6, val_scenes=2, test_scenes=2)
    plain, hard = str(tmp_path / "plain"), str(tmp_path / "hard")
    data.build_world(plain, **sizes, hard_val_scenes=0, hard_test_scenes=0)
    data.build_world(hard, **sizes, hard_val_scenes=3, hard_test_scenes=4)
    assert not os.path.exists(os.path.join(plain, "hard_test.jsonl"))
    default = data.DataConfig(val_scenes=3, test_scenes=5)  # unless given, they scale with val and test
    assert (default.hard_val_scenes, default.hard_test_scenes) == (3, 10)
    assert (data.DataConfig().hard_val_scenes, data.DataConfig().hard_test_scenes) == (400, 800)  # 1200, 2400 questions
    for split in ("train", "val", "test", "base", "reasoning_sft", "summary_sft", "paths"):  # unchanged by them
        assert open(os.path.join(plain, f"{split}.jsonl"), "rb").read() == open(os.path.join(hard, f"{split}.jsonl"),
                                                                                   "rb").read()
    graphs = {s: {world.scene_graph(r["objects"]) for r in rows(hard, s)} for s in ("train", "val", "test")}
    for split, n in (("hard_val", 3), ("hard_test", 4)):
        got = rows(hard, split)
        assert len({r["scene"] for r in got}) == n and all(len(r["objects"]) == 8 for r in got)
        assert all(r["id"].startswith(f"{split}-") for r in got)
        assert not {world.scene_graph(r["objects"]) for r in got} & set().union(*graphs.values())
        seen = {r["image"] for s in ("base", "reasoning_sft", "summary_sft") for r in rows(hard, s)}
        assert not {r["image"] for r in got} & seen  # no SFT set has a hard scene's picture
        assert all(rederive(r["question"], r["objects"]) == r["answer"] for r in got)
    card = json.load(open(os.path.join(hard, "card.json")))
    assert card["questions"]["hard_test"] == len(rows(hard, "hard_test")) and "hard_val" in card["families"]
    assert card["id"] != json.load(open(os.path.join(plain, "card.json")))["id"]
    again = str(tmp_path / "again")
    data.build_world(again, **sizes, hard_val_scenes=3, hard_test_scenes=4)
    assert all_bytes(again) == all_bytes(hard)  # deterministic given the seed
    pool = data.extra_split(hard, "pool", 12, min_objects=8, max_objects=8)  # a hard DPO pool: fresh scenes
    held_out = {world.scene_graph(r["objects"]) for s in ("hard_val", "hard_test") for r in rows(hard, s)}
    assert not {world.scene_graph(r["objects"]) for r in pool} & held_out
    with pytest.raises(ValueError, match="--hard-min-objects 9 is more than --hard-max-objects 8"):
        data.build_world(str(tmp_path / "bad"), **sizes, hard_min_objects=9, hard_max_objects=8)
