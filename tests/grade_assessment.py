"""Graded tests of the assignment assessment (data.py: is_correct, SceneStepScorer.score, bucket).

The coarse answer filter on answers written by hand; the fine step score on chains from the scripted teacher (world.py)
and on chains cut by hand, whose precision and recall are counted here step by step; the High / Mid / Low buckets at
their edges. Questions come from world.make_split, so no image is drawn.
"""

import dataclasses
import random

import pytest

import data
import world

NO_ERRORS = {f.name: 0.0 for f in dataclasses.fields(world.ErrorRates)}


@pytest.fixture(scope="module")
def rows():
    return world.make_split("train", 60, data.DataConfig(), set())[0]  # 180 questions, every family


def teacher(**rates):
    return world.ScriptedTeacher(world.ErrorRates(**{**NO_ERRORS, **rates}))


def test_answers_match_after_normalisation():
    for pred, gold in [("Three.", "3"), ("The answer is Blue", "blue"), ("  yes!", "Yes"), ("a circle", "circle"),
                       ("Final answer: 7", "seven")]:
        assert data.is_correct(pred, gold), (pred, gold)
    for pred, gold in [("4", "3"), ("blues", "blue"), ("no", "yes")]:
        assert not data.is_correct(pred, gold), (pred, gold)


def test_an_empty_answer_is_never_right():
    assert not data.is_correct("", "") and not data.is_correct(None, "") and not data.is_correct(" . ", "")


def test_an_option_letter_and_its_text_are_the_same_answer():
    choices = ["red", "blue", "green"]
    for pred, gold in [("B", "blue"), ("b. blue", "B"), ("Blue", "b"), ("(c)", "green")]:
        assert data.is_correct(pred, gold, choices), (pred, gold)
    for pred, gold in [("a", "blue"), ("c. green", "b"), ("red", "c")]:
        assert not data.is_correct(pred, gold, choices), (pred, gold)


def test_the_filter_passes_the_teachers_right_answers_only(rows):
    for r in rows:
        assert data.AnswerFilter().judge(r, r["answer"])
        assert not data.AnswerFilter().judge(r, r["answer"] + "0")


def test_a_flawless_chain_scores_100_as_a_dict_or_as_text(rows):
    scorer = data.SceneStepScorer()
    for r in rows:
        path = teacher().path(r, random.Random(r["id"]))
        assert scorer.score(r, [path, data.render_chain(path["steps"])]) == [100, 100], r["id"]


def test_right_steps_and_a_wrong_answer_score_51(rows):
    # precision 1, recall 1, answer wrong: 1 + round(99 x 0.5) = 51, Mid
    for r in rows:
        path = teacher(wrong_conclusion=1.0).path(r, random.Random(r["id"]))
        assert data.SceneStepScorer().score(r, [path]) == [51], r["id"]


def test_scores_counted_by_hand(rows):
    r = next(r for r in rows if r["family"] == "sum")  # three facts: count a, count b, add
    path = teacher().path(r, random.Random(0))
    count_a, count_b, add = path["steps"]
    unreadable = {"title": "Step", "content": "I think so"}
    paths = [
        {"steps": [count_a, add], "final_answer": path["final_answer"]},  # a skipped step: recall 2/3 -> 67
        {"steps": [count_a, count_b, unreadable], "final_answer": ""},  # precision 2/3, recall 2/3, wrong -> 23
        {"steps": [count_a, count_b, unreadable, add], "final_answer": path["final_answer"]},  # precision 3/4 -> 75
        "<thoughts>\nStep: I think so\n</thoughts>", "",  # nothing readable, no answer -> 1
    ]
    assert data.SceneStepScorer().score(r, paths) == [67, 23, 75, 1, 1]


@pytest.mark.parametrize("mistake", [f.name for f in dataclasses.fields(world.ErrorRates)])
def test_every_kind_of_mistake_scores_below_high(rows, mistake):
    scorer, hit = data.SceneStepScorer(), 0
    for r in rows:
        path = teacher(**{mistake: 1.0}).path(r, random.Random(r["id"]))
        if path["errors"]:
            hit += 1
            assert scorer.score(r, [path])[0] < 90, (mistake, r["id"])
    assert hit > 20


def test_buckets_at_their_edges():
    assert [data.bucket(s) for s in (100, 90, 89, 50, 49, 1)] == ["high", "high", "mid", "mid", "low", "low"]
    assert [data.bucket(s, high=70, mid=30) for s in (70, 69, 30, 29)] == ["high", "mid", "mid", "low"]
