"""data.py: the synthetic visual reasoning world and the whole Insight-V data pipeline.

Insight-V (Dong et al., arXiv 2411.14432, Sec. 3.1) builds its training data in three moves, and this file makes
all three, plus the tokenizer and the chat format every other file reads:

1. progressive long-chain generation: a generator writes a reasoning path one structured step at a time,
   {"title", "content", "next_action": "continue" | "final_answer"}, N paths per question;
2. multi-granularity assessment: a coarse answer filter, then a fine step score 1-100 (High / Mid / Low);
3. two SFT sets: High correct paths for the reasoning agent; paths from every bucket plus wrong-answer paths
   (target = the correct answer) for the summary agent.

The default is a synthetic world: 48x48 scenes on a 3x3 grid of 16 px cells, at most one object per cell, which the
tiny ViT (patch 8, pixel shuffle 2) sees as one image token per cell. Every answer and step can be checked exactly
against the scene graph, so the paper's LLM teacher and scoring agent become a scripted teacher with injected mistakes
and an exact step checker. For real data a loaded VLM plays both (agents.ModelGenerator, ModelJudge; agents.py --real).

    python data.py --out out/data                     # the world, defaults below
    python data.py --real bench.jsonl --skip-bad      # check a real JSONL
"""
import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
from PIL import Image, ImageDraw, ImageOps
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from model import SPECIAL_TOKENS  # the chat format's special tokens, which the model's loader also needs

# ----------------------------------------------------------------------------------------------
# Configuration: dataclasses whose fields are also command-line flags (--train-scenes 500).

# The metadata keys that bound a numeric option: key -> (how the error states it, the test a value must pass).
BOUNDS = {"min": (">=", lambda v, b: v >= b), "above": (">", lambda v, b: v > b), "max": ("<=", lambda v, b: v <= b)}


def parse_config(cls, argv=None, description=None):
    """The one configuration mechanism of every script: a dataclass whose fields become --flags. A field's default is
    the flag's default and its type; its metadata's "help" documents it (see option). Booleans get --flag / --no-flag.
    Fields defaulting to None take strings unless their metadata names a "type" (lists: "nargs": "+"). Numbers get
    their valid range from the metadata keys of BOUNDS ({"min": 1}, {"above": 0, "max": 1}), checked here: a bad value
    never starts work."""
    parser = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = f.metadata.get("type", type(default) if default is not None else str)
            parser.add_argument(flag, type=kind, default=default, help=help_text, choices=f.metadata.get("choices"),
                                nargs=f.metadata.get("nargs"))
    args = parser.parse_args(argv)
    for f in fields(cls):
        value = getattr(args, f.name)
        for key, (sign, ok) in BOUNDS.items():
            if key in f.metadata and value is not None and not ok(value, f.metadata[key]):
                parser.error(f"argument --{f.name.replace('_', '-')}: must be {sign} {f.metadata[key]}, got {value}")
    return cls(**vars(args))


def option(default, text, **metadata):
    """A field for parse_config: default, --flag help, metadata (a range in BOUNDS keys, a None default's "type")."""
    return field(default=default, metadata={"help": text, **metadata})


def option_of(cls, name, text):
    """Field `name` of config class cls, for another config: the same default and range, its own help text."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(default=f.default, metadata={**f.metadata, "help": text})


@dataclass
class ErrorRates:
    """How often the scripted teacher slips, per path (each mistake at most once, where it fits). Defaults leave ~70%
    of paths flawless, so a question's N paths mix sound and flawed reasoning, as sampled LLM paths do. wrong_conclusion
    (right steps, another answer), our agents' main mistake, is off: it did not help them (docs/experiments.md)."""
    miscount: float = option(0.15, "rate: a Count step drops or adds one object", min=0, max=1)
    wrong_attribute: float = option(0.10, "rate: a step misreads a colour, shape or place", min=0, max=1)
    arithmetic_slip: float = option(0.10, "rate: a Compare / Add / Subtract result is off", min=0, max=1)
    skip_step: float = option(0.10, "rate: a step is left out (its fact used silently)", min=0, max=1)
    premature_answer: float = option(0.05, "rate: the chain stops early and guesses", min=0, max=1)
    wrong_conclusion: float = option(0.0, "rate: the answer does not follow from the last step", min=0, max=1)


@dataclass
class DataConfig(ErrorRates):
    seed: int = option(0, "seed of the scenes, questions and paths")
    train_scenes: int = option(2000, "training scenes", min=1)
    val_scenes: int = option(400, "validation scenes (1200 questions: enough to see 3-point differences)", min=1)
    test_scenes: int = option(400, "test scenes (x questions per scene >= 1000 questions)", min=1)
    questions_per_scene: int = option(3, "distinct question families per scene", min=1)
    min_objects: int = option(3, "fewest objects in a scene", min=1, max=9)
    max_objects: int = option(7, "most objects in a scene (9 cells)", min=1, max=9)
    paths_per_question: int = option(4, "N reasoning paths per question (the paper: unstated)", min=1)
    max_steps: int = option(16, "step cap of a path, as in the paper", min=1)
    high: int = option(90, "score >= high is High (only flawless world paths)", min=1, max=100)
    mid: int = option(50, "mid <= score < high is Mid; below is Low", min=1, max=100)
    reasoning_per_question: int = option(1, "distinct High correct chains per question kept", min=1)
    flawed_per_sound: float = option(0.5, "summary set: flawed paths per sound one (2:1)", min=0)
    summary_perception: float = option(0.25, "perception QA in the summary set, per chain row", min=0)
    vocab_size: int = option(512, "tiny BPE: 256 bytes + specials + merges for world words", min=1)


# ----------------------------------------------------------------------------------------------
# The world: scenes, their pictures, and questions with exact answers.

COLORS = {"red": (230, 50, 50), "green": (40, 190, 70), "blue": (50, 100, 240),
          "yellow": (240, 220, 40), "purple": (170, 60, 210)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4, "large": 6}  # half-extent in pixels: the object never leaves its cell
CELLS = ("top left", "top center", "top right", "middle left", "center", "middle right", "bottom left",
         "bottom center", "bottom right")  # row-major, 16 px each
RELATIONS = ("left of", "right of", "above", "below")
IMAGE_PX, CELL_PX, BACKGROUND = 48, 16, (30, 30, 30)
FAMILIES = {**dict.fromkeys(("color_at", "shape_at", "exists"), "perception"),
            **dict.fromkeys(("count", "compare", "sum", "difference", "most_color", "spatial_count"), "reasoning")}
DESCRIBE_QUESTION = "Describe the scene."


def make_scene(rng, cfg):
    """A scene graph: one object per chosen cell, its centre jittered by a pixel."""
    objects = []
    for i in sorted(rng.sample(range(9), rng.randint(cfg.min_objects, cfg.max_objects))):
        row, col = divmod(i, 3)
        objects.append({"cell": CELLS[i], "shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                        "size": rng.choice(list(SIZES)), "x": col * CELL_PX + 8 + rng.randint(-1, 1),
                        "y": row * CELL_PX + 8 + rng.randint(-1, 1)})
    return objects


def render_scene(objects):
    """Flat colours, no anti-aliasing: every object pixel has exactly its recorded colour."""
    img = Image.new("RGB", (IMAGE_PX, IMAGE_PX), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x, y, h, rgb = o["x"], o["y"], SIZES[o["size"]], COLORS[o["color"]]
        box = (x - h, y - h, x + h - 1, y + h - 1)
        if o["shape"] == "circle":
            draw.ellipse(box, fill=rgb)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(x, y - h), (x - h, y + h - 1), (x + h - 1, y + h - 1)], fill=rgb)
    return img


def describe(objects):
    """The scene in words, in reading order; the same phrase as a Look step, so it transfers."""
    return ". ".join(f"{o['cell']} has a {o['size']} {o['color']} {o['shape']}" for o in objects) + "."


def read_description(text):
    """describe's text -> its objects [{cell, size, color, shape}], the labels of train_sft.pretrain_vision."""
    claims = (parse_claim({"content": sentence}) for sentence in text.split(". "))
    return [{k: c[k] for k in ("cell", "size", "color", "shape")} for c in claims if c is not None and
            c["kind"] == "look" and c["shape"]]


def matches(o, f):
    """Does object o pass filter f ({color?, shape?, rel?, cell?})?"""
    if any(k in f and o[k] != f[k] for k in ("color", "shape")):
        return False
    if "rel" not in f:
        return True
    (r, c), (rr, cc) = divmod(CELLS.index(o["cell"]), 3), divmod(CELLS.index(f["cell"]), 3)
    return {"left of": c < cc, "right of": c > cc, "above": r < rr, "below": r > rr}[f["rel"]]


def select(objects, f):
    return [o["cell"] for o in objects if matches(o, f)]


def noun(f):
    """Filter -> noun phrase: 'red objects', 'circles', 'red circles', 'objects left of center'."""
    words = [f.get("color"), f["shape"] + "s" if "shape" in f else "objects"]
    return " ".join(w for w in words + [f.get("rel"), f.get("cell")] if w)


QUESTIONS = {"color_at": "What color is the object at {cell}?", "shape_at": "What shape is the object at {cell}?",
             "exists": "Is there a {color} {shape}?", "count": "How many {filter} are there?",
             "compare": "Are there more {a} than {b}?", "sum": "How many {a} and {b} are there in total?",
             "difference": "How many more {a} than {b} are there?", "most_color": "Which color has the most objects?",
             "spatial_count": "How many objects are {rel} the {color} {shape}?"}


def candidates(family, objects):
    """Every question of a family this scene can host, as specs."""
    groups = [{"color": c} for c in COLORS] + [{"shape": s} for s in SHAPES]
    n = {json.dumps(g): len(select(objects, g)) for g in groups}
    if family in ("color_at", "shape_at"):
        return [{"cell": o["cell"]} for o in objects]
    if family == "exists":
        return [{"color": c, "shape": s} for c in COLORS for s in SHAPES]
    if family == "count":
        return [{"filter": g} for g in groups] + [{"filter": {"color": c, "shape": s}} for c in COLORS for s in SHAPES]
    if family in ("compare", "sum", "difference"):
        return [{"a": a, "b": b} for a in groups for b in groups if a != b and (family == "compare" or
                family == "sum" and a.keys() == b.keys() or  # same attribute: the two groups never overlap
                family == "difference" and n[json.dumps(a)] >= n[json.dumps(b)])]
    if family == "most_color":
        top = Counter(o["color"] for o in objects).most_common(2)
        return [{}] if len(top) == 1 or top[0][1] > top[1][1] else []  # one clear winner
    once = [k for k, m in Counter((o["color"], o["shape"]) for o in objects).items() if m == 1]
    return [{"color": c, "shape": s, "rel": r} for c, s in once for r in RELATIONS]


def make_question(family, objects, rng):
    """(question, spec, answer) or None; the answer is uniform over those the scene allows, so none is a safe guess."""
    by_answer = {}
    for spec in candidates(family, objects):
        spec = {"family": family, **spec}
        by_answer.setdefault(answer_of(solve(objects, spec)[-1], spec), []).append(spec)
    if not by_answer:
        return None
    answer = rng.choice(sorted(by_answer))
    spec = rng.choice(by_answer[answer])
    words = {k: noun(v) if isinstance(v, dict) else v for k, v in spec.items()}
    return QUESTIONS[family].format(**words), spec, answer


# ----------------------------------------------------------------------------------------------
# Claims: one checkable fact per step. One grammar writes teacher steps, parses any chain and checks it (Sec. 3.1).

def look(objects, cell):
    o = next((o for o in objects if o["cell"] == cell), {})
    return {"kind": "look", "cell": cell, **{k: o.get(k) for k in ("size", "color", "shape")}}


def find(objects, color, shape, article="a"):
    cells = select(objects, {"color": color, "shape": shape})
    return {"kind": "find", "article": article, "color": color, "shape": shape, "cell": cells[0] if cells else None}


def count(objects, f):
    cells = select(objects, f)
    return {"kind": "count", "filter": f, "cells": cells, "n": len(cells)}


def arith(family, a, b):
    if family == "compare":
        return {"kind": "compare", "a": a, "b": b, "rel": "more" if a > b else "less" if a < b else "equal"}
    return {"kind": "add" if family == "sum" else "subtract", "a": a, "b": b, "n": a + b if family == "sum" else a - b}


def most(counts):
    """counts: {colour: n} -> the colour with the most objects (first in COLORS on ties)."""
    best = max(counts, key=counts.get)
    return {"kind": "most", "color": best, "n": counts[best]}


def solve(objects, spec):
    """The correct chain for a question, as a list of claims."""
    family = spec["family"]
    if family in ("color_at", "shape_at"):
        return [look(objects, spec["cell"])]
    if family == "exists":
        return [find(objects, spec["color"], spec["shape"])]
    if family == "count":
        return [count(objects, spec["filter"])]
    if family in ("compare", "sum", "difference"):
        a, b = count(objects, spec["a"]), count(objects, spec["b"])
        return [a, b, arith(family, a["n"], b["n"])]
    if family == "most_color":
        counts = [c for c in (count(objects, {"color": color}) for color in COLORS) if c["n"]]
        return counts + [most({c["filter"]["color"]: c["n"] for c in counts})]
    ref = find(objects, spec["color"], spec["shape"], "the")
    return [ref, count(objects, {"rel": spec["rel"], "cell": ref["cell"]})]


def answer_of(claim, spec):
    """The answer a chain's last claim implies for this question."""
    kind = claim["kind"]
    if kind == "look":
        return claim["color" if spec["family"] == "color_at" else "shape"] or "none"
    if kind == "find":
        return "yes" if claim["cell"] else "no"
    if kind == "compare":
        return "yes" if claim["rel"] == "more" else "no"
    return claim["color"] if kind == "most" else str(claim["n"])


REL_WORDS = {"more": "is more than", "less": "is less than", "equal": "equals"}
TITLES = {"look": "Look", "find": "Find", "count": "Count", "compare": "Compare", "add": "Add", "subtract": "Subtract",
          "most": "Compare"}


def claim_text(c):
    kind = c["kind"]
    if kind == "look":
        return f"{c['cell']} has a {c['size']} {c['color']} {c['shape']}" if c["shape"] else f"{c['cell']} is empty"
    if kind == "find":
        return (f"{c['article']} {c['color']} {c['shape']} is at {c['cell']}" if c["cell"] else
                f"there is no {c['color']} {c['shape']}")
    if kind == "count":
        return (f"{noun(c['filter'])} at {', '.join(c['cells'])}, total {c['n']}" if c["cells"] else
                f"no {noun(c['filter'])}, total {c['n']}")
    if kind == "compare":
        return f"{c['a']} {REL_WORDS[c['rel']]} {c['b']}"
    if kind in ("add", "subtract"):
        return f"{c['a']} {'+' if kind == 'add' else '-'} {c['b']} = {c['n']}"
    return f"{c['color']} has the most with {c['n']}"


def to_step(claim, answer=None):
    """A claim as a step record; the final step also states the answer in a parseable way."""
    tail = "" if answer is None else f", so the answer is {answer}"
    return {"title": TITLES[claim["kind"]], "content": claim_text(claim) + tail + ".",
            "next_action": "continue" if answer is None else "final_answer"}


_C, _S, _L, _R = ("|".join(v) for v in (COLORS, SHAPES, CELLS, RELATIONS))
_NOUN = rf"(?:({_C}) )?((?:{_S})s|objects)(?: ({_R}) ({_L}))?"


def _filter(color, head, rel, cell):
    f = {"color": color, "shape": None if head == "objects" else head[:-1], "rel": rel, "cell": cell}
    return {k: v for k, v in f.items() if v}


_GRAMMAR = [(re.compile(p), build) for p, build in [
    (rf"({_L}) has a (small|large) ({_C}) ({_S})", lambda m: {
        "kind": "look", "cell": m[1], "size": m[2], "color": m[3], "shape": m[4]}),
    (rf"({_L}) is empty", lambda m: {"kind": "look", "cell": m[1], "size": None, "color": None, "shape": None}),
    (rf"(a|the) ({_C}) ({_S}) is at ({_L})", lambda m: {
        "kind": "find", "article": m[1], "color": m[2], "shape": m[3], "cell": m[4]}),
    (rf"there is no ({_C}) ({_S})", lambda m: {
        "kind": "find", "article": "a", "color": m[1], "shape": m[2], "cell": None}),
    (rf"{_NOUN} at ((?:{_L})(?:, (?:{_L}))*), total (\d+)", lambda m: {
        "kind": "count", "filter": _filter(*m.groups()[:4]), "cells": m[5].split(", "), "n": int(m[6])}),
    (rf"no {_NOUN}, total (\d+)", lambda m: {
        "kind": "count", "filter": _filter(*m.groups()[:4]), "cells": [], "n": int(m[5])}),
    (r"(\d+) (is more than|is less than|equals) (\d+)", lambda m: {
        "kind": "compare", "a": int(m[1]), "b": int(m[3]), "rel": {v: k for k, v in REL_WORDS.items()}[m[2]]}),
    (r"(\d+) ([+-]) (\d+) = (\d+)", lambda m: {
        "kind": "add" if m[2] == "+" else "subtract", "a": int(m[1]), "b": int(m[3]), "n": int(m[4])}),
    (rf"({_C}) has the most with (\d+)", lambda m: {"kind": "most", "color": m[1], "n": int(m[2])}),
]]
_ANSWER = re.compile(r",? ?so the answer is (.+?)\.?\s*$")


def parse_claim(step):
    """The claim a step's content makes, or None if it is not in the world's grammar."""
    text = _ANSWER.sub("", step["content"].strip()).rstrip(".")
    for regex, build in _GRAMMAR:
        m = regex.fullmatch(text)
        if m:
            return build(m)
    return None


def claim_key(c):
    """Which fact a claim establishes; a question needs the keys of its `solve` chain."""
    if c["kind"] == "look":
        return ("look", c["cell"])
    if c["kind"] == "find":
        return ("find", c["color"], c["shape"])
    if c["kind"] == "count":
        return ("count", tuple(sorted(c["filter"].items())))
    return ("most",) if c["kind"] == "most" else ("arith", c["kind"])


def check_claim(c, objects, reference):
    """Is the claim true of this scene (and, for arithmetic, of this question's counts)?"""
    kind = c["kind"]
    if kind == "look":
        return c == look(objects, c["cell"])
    if kind == "find":
        cells = select(objects, {"color": c["color"], "shape": c["shape"]})
        return c["cell"] in cells if c["cell"] else not cells
    if kind == "count":
        cells = select(objects, c["filter"])
        return sorted(c["cells"]) == sorted(cells) and c["n"] == len(cells)
    if kind == "most":
        counts = Counter(o["color"] for o in objects).most_common()
        return (counts[0][0], counts[0][1]) == (c["color"], c["n"]) and (len(counts) == 1 or counts[1][1] < c["n"])
    ref = next((r for r in reference if r["kind"] == kind), None)
    if ref is not None:  # operands must be the question's true counts
        return c == ref
    return c == arith({"compare": "compare", "add": "sum"}.get(kind, "difference"), c["a"], c["b"])


# ----------------------------------------------------------------------------------------------
# Chains as text (SFT targets, prompts, DPO): the official code's `<thoughts>` block, one "Title: content" per step.

def render_chain(steps):
    return "<thoughts>\n" + "".join(f"{s['title']}: {s['content']}\n" for s in steps) + "</thoughts>"


def parse_chain(text):
    """Steps back from text; tolerant of a missing tag, a truncated step or an empty chain."""
    body = text.split("<thoughts>", 1)[-1].split("</thoughts>", 1)[0]
    steps = []
    for line in filter(None, (l.strip() for l in body.splitlines())):
        title, sep, content = line.partition(": ")
        steps.append({"title": title, "content": content} if sep else {"title": "", "content": line})
    return steps


def chain_answer(chain):
    """The answer the chain itself reaches (steps or text), or None."""
    for step in reversed(parse_chain(chain) if isinstance(chain, str) else chain):
        m = _ANSWER.search(step["content"])
        if m:
            return m[1].strip()
    return None


def as_path(p):
    """A path record from a path dict or a rendered chain (what a policy samples in DPO)."""
    if isinstance(p, str):
        return {"steps": parse_chain(p), "final_answer": chain_answer(p) or ""}
    return p if "final_answer" in p else {**p, "final_answer": chain_answer(p["steps"]) or ""}


# ----------------------------------------------------------------------------------------------
# Answers: normalised exact match (numbers, colours, yes/no, option letters).

NUMBER_WORDS = dict(zip("zero one two three four five six seven eight nine ten".split(), map(str, range(11))))


def normalize_answer(s):
    s = re.sub(r"^(the )?(final )?answer( is)?:?\s*", "", str(s or "").strip().lower())
    s = " ".join(s.strip(" .,!?\"'()[]").split())
    s = re.sub(r"^(a|an|the) ", "", s)
    return NUMBER_WORDS.get(s, s)


def is_correct(pred, gold, choices=None):
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    if choices:  # an option letter, "b. text", or the text of an option -> the letter
        letters = "abcdefghijklmnopqrstuvwxyz"[:len(choices)]
        options = [normalize_answer(c) for c in choices]

        def letter(x):
            m = re.match(r"^([a-z])(?:[.):]\s.*)?$", x)
            return m[1] if m and m[1] in letters else (letters[options.index(x)] if x in options else x)
        pred, gold = letter(pred), letter(gold)
    return pred != "" and pred == gold


# ----------------------------------------------------------------------------------------------
# Progressive generation (Sec. 3.1): step by step, each given the image, question and steps so far, up to the cap.

FITS = {"miscount": ("count",), "wrong_attribute": ("look", "find", "count"),
        "arithmetic_slip": ("compare", "add", "subtract", "most")}
GUESSES = {"color_at": list(COLORS), "most_color": list(COLORS), "shape_at": list(SHAPES),
           "exists": ["yes", "no"], "compare": ["yes", "no"]}  # else a count 0-7


class ScriptedTeacher:
    """The paper's LLM generator, scripted: writes the scene graph's correct steps one by one, slipping at set rates."""

    def __init__(self, error_rates=ErrorRates(), max_steps=16):
        self.rates, self.max_steps = error_rates, max_steps

    def generate(self, rec, n, rng):
        return [self.path(rec, rng) for _ in range(n)]

    def path(self, rec, rng):
        objects, spec = rec["objects"], rec["spec"]
        plan, errors, guess = solve(objects, spec), [], False
        if len(plan) > 1 and rng.random() < self.rates.skip_step:
            del plan[rng.randrange(len(plan) - 1)]
            errors.append("skip_step")
        if len(plan) > 1 and rng.random() < self.rates.premature_answer:
            plan, guess = plan[:rng.randrange(1, len(plan))], True
            errors.append("premature_answer")
        plan = plan[:self.max_steps]
        slips = {}  # step index -> mistake injected there
        for name, kinds in FITS.items():
            spots = [i for i, c in enumerate(plan) if c["kind"] in kinds and i not in slips]
            if spots and rng.random() < getattr(self.rates, name):
                slips[rng.choice(spots)] = name
        said, steps = [], []
        for i, planned in enumerate(plan):
            claim = self.next_claim(planned, objects, spec, said)
            if i in slips:
                slipped = slip(slips[i], claim, objects, rng)
                if slipped is not None and slipped != claim:
                    claim = slipped
                    errors.append(slips[i])
            said.append(claim)
            answer = None
            if i == len(plan) - 1:
                options = GUESSES.get(spec["family"], "01234567")
                answer = rng.choice(options) if guess else answer_of(claim, spec)
                # Drawn only when on, so the default world's random stream stays the same.
                if not guess and self.rates.wrong_conclusion and rng.random() < self.rates.wrong_conclusion:
                    answer = rng.choice([a for a in options if a != answer])
                    errors.append("wrong_conclusion")
            steps.append(to_step(claim, answer))
        return {"steps": steps, "final_answer": chain_answer(steps) or "", "errors": errors}

    @staticmethod
    def next_claim(planned, objects, spec, said):
        """The planned step, redone from what earlier steps *said*: an earlier slip carries on into the answer."""
        kind = planned["kind"]
        if kind == "count" and "rel" in planned["filter"]:
            cell = next((c["cell"] for c in said if c["kind"] == "find" and c["cell"]), planned["filter"]["cell"])
            return count(objects, dict(planned["filter"], cell=cell))
        stated = {json.dumps(c["filter"], sort_keys=True): c["n"] for c in said if c["kind"] == "count"}
        if kind in ("compare", "add", "subtract"):
            a, b = (stated.get(json.dumps(spec[k], sort_keys=True), planned[k]) for k in "ab")
            return arith(spec["family"], a, b)
        if kind == "most":  # colours it did not count are used silently
            return most({c: stated.get(json.dumps({"color": c}), len(select(objects, {"color": c}))) for c in COLORS})
        return planned


def slip(name, claim, objects, rng):
    """One realistic mistake in a claim, or None when it cannot happen here."""
    kind, occupied = claim["kind"], [o["cell"] for o in objects]
    if kind == "count":
        cells, others = list(claim["cells"]), [c for c in occupied if c not in claim["cells"]]
        if name == "wrong_attribute" and cells and others:  # mistakes one object for another
            cells[rng.randrange(len(cells))] = rng.choice(others)
        elif cells and (not others or rng.random() < 0.5):
            cells.pop(rng.randrange(len(cells)))
        elif others:
            cells.append(rng.choice(others))
        cells = [c for c in CELLS if c in cells]
        return dict(claim, cells=cells, n=len(cells))
    if kind == "look" and claim["shape"]:
        attr = rng.choice(["color", "shape"])
        return {**claim, attr: rng.choice([v for v in (COLORS if attr == "color" else SHAPES) if v != claim[attr]])}
    if kind == "find":
        wrong = [c for c in occupied if c not in select(objects, {"color": claim["color"], "shape": claim["shape"]})]
        if claim["cell"] and claim["article"] == "a" and rng.random() < 0.5:
            return dict(claim, cell=None)  # overlooks it
        return dict(claim, cell=rng.choice(wrong)) if wrong else None
    if kind == "compare":
        return dict(claim, rel=rng.choice([r for r in REL_WORDS if r != claim["rel"]]))
    if kind in ("add", "subtract"):
        return dict(claim, n=claim["n"] + (1 if claim["n"] == 0 else rng.choice([-1, 1])))
    if kind == "most":
        others = Counter(o["color"] for o in objects if o["color"] != claim["color"])
        return {**claim, **dict(zip(("color", "n"), rng.choice(sorted(others.items()))))} if others else None
    return None


# ----------------------------------------------------------------------------------------------
# Multi-granularity assessment (paper Sec. 3.1): coarse answer filter, then fine step scores.

class AnswerFilter:
    """Coarse: keep a path iff its final answer matches the ground truth (normalised)."""

    def judge(self, rec, answer):
        return is_correct(answer, rec["answer"], rec.get("choices"))


class SceneStepScorer:
    """Fine, for the world: parse every step into a claim and check it against the scene graph.
    score = 1 + 99 * precision * recall * (1 if the answer is right else 0.5): precision is the share of true claims
    (unparseable counts as false), recall the share of the facts the question needs (its `solve` chain's keys) that
    true steps establish. A slip lowers precision, a skipped step or early answer recall; a wrong conclusion after
    right steps halves it (51, Mid). Scores are absolute, so a question's N paths compare directly (as in the paper)."""

    def __init__(self, answer_filter=None):
        self.answer_filter = answer_filter or AnswerFilter()

    def score(self, rec, paths):
        objects, reference = rec["objects"], solve(rec["objects"], rec["spec"])
        needed = {claim_key(c) for c in reference}
        scores = []
        for path in map(as_path, paths):
            claims = [parse_claim(s) for s in path["steps"]]
            true = [c for c in claims if c is not None and check_claim(c, objects, reference)]
            precision = len(true) / len(claims) if claims else 0.0
            recall = len(needed & {claim_key(c) for c in true}) / len(needed)
            right = self.answer_filter.judge(rec, path["final_answer"])
            scores.append(1 + round(99 * precision * recall * (1.0 if right else 0.5)))
        return scores

    def first_error(self, rec, path):
        """Index of a wrong chain's first wrong step (Step-DPO's target): the first false or unreadable claim, else the
        last step (its answer does not follow, or comes too early); None when the answer is right."""
        path = as_path(path)
        if self.answer_filter.judge(rec, path["final_answer"]):
            return None
        reference = solve(rec["objects"], rec["spec"])
        for i, step in enumerate(path["steps"]):
            c = parse_claim(step)
            if c is None or not check_claim(c, rec["objects"], reference):
                return i
        return max(0, len(path["steps"]) - 1)


def bucket(score, high=DataConfig.high, mid=DataConfig.mid):
    return "high" if score >= high else "mid" if score >= mid else "low"


# ----------------------------------------------------------------------------------------------
# Tokenizer, the agents' prompts (defined here only) and the chat format (the same for the tiny preset and SmolVLM).

IMAGE_MEAN = IMAGE_STD = 0.5
DIRECT_PROMPT = "Answer with one word or number."
REASONING_PROMPT = "Reason step by step. Give only the reasoning."
SUMMARY_PROMPT = "Judge the reasoning silently. If right, answer from it; if not, answer directly."
VANILLA_PROMPT = "Reason step by step, then answer."


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE: any text round-trips exactly; the world's words become single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                            show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def load_tokenizer(path):
    path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path}: run `python data.py` first")
    return Tokenizer.from_file(path)


def special_ids(tok):
    ids = {name: tok.token_to_id(t) for name, t in zip(
        ("pad", "im_start", "eou", "image", "fake_image", "global_image"), SPECIAL_TOKENS)}
    missing = [t for t, i in zip(SPECIAL_TOKENS, ids.values()) if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the chat/image special tokens {missing}")
    return ids


def task_messages(task, question, chain=None, answer=None):
    """The conversation of a task, without the assistant turn when answer=None (chain=None for `reasoning`)."""
    empty = render_chain([])
    user = {"direct": f"{question}\n{DIRECT_PROMPT}", "summary_only": f"{question}\n{DIRECT_PROMPT}",
            "describe": question, "reasoning": f"{question}\n{REASONING_PROMPT}",
            "summary": f"{question}\n{chain or empty}\n{SUMMARY_PROMPT}", "vanilla": f"{question}\n{VANILLA_PROMPT}"}
    if task not in user:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(user)}")
    target = chain if task == "reasoning" else answer
    if task == "vanilla" and answer is not None:
        target = f"{chain or empty}\n{answer}"
    messages = [{"role": "user", "content": user[task], "image": True}]
    return messages + ([{"role": "assistant", "content": target}] if target is not None else [])


def render_conversation(tok, messages, image_seq_len, add_generation_prompt=False):
    """(ids, mask), mask 1 exactly on the assistant text and its <end_of_utterance>. Encoded piece by piece at chat
    boundaries, so a generation prompt is always a prefix of the training ids (SmolVLM's template, one image a turn)."""
    ids, mask = [], []

    def add(text, learn):
        new = tok.encode(text, add_special_tokens=False).ids
        ids.extend(new)
        mask.extend([int(learn)] * len(new))

    image = "<fake_token_around_image><global-img>" + "<image>" * image_seq_len + "<fake_token_around_image>"
    add("<|im_start|>", False)
    for m in messages:
        if m["role"] == "assistant":
            add("Assistant:", False)
            add(f" {m['content']}<end_of_utterance>", True)
            add("\n", False)
        else:
            add(f"{m['role'].capitalize()}:{image if m.get('image') else ' '}{m['content']}<end_of_utterance>\n", False)
    if add_generation_prompt:
        add("Assistant:", False)
    return ids, mask


def load_image(path, image_size):
    """(3, H, W) float, normalised as SigLIP expects: (x / 255 - 0.5) / 0.5. Any file Pillow reads, in any mode and
    size, is squashed to the model's square input (SmolVLM's global image is too); a photo is turned upright first."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # phones store photos sideways, with an EXIF tag saying how to turn them
            if im.mode.startswith("I;16"):  # 16-bit grey: RGB conversion would clip it to white, so scale to 8 bits
                im = im.point(lambda v: v / 256).convert("L")
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3).permute(2, 0, 1)
    return (x.float() / 255 - IMAGE_MEAN) / IMAGE_STD


# ----------------------------------------------------------------------------------------------
# Files: JSONL in, JSONL out. Errors a user can cause name the file and line.

def read_jsonl(path, skip_bad=False, required=(), check_images=False):
    """Rows of a JSONL file. A line that is not UTF-8 or not a JSON object, a required field that is missing or not
    text (an answer may be a number) or (with check_images) a missing or corrupt image raises ValueError naming
    file:line; skip_bad skips and counts them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    rows, bad = [], []
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is its line's error (named, skippable)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                for k in required:
                    if row.get(k) in (None, ""):
                        raise ValueError(f"missing field {k!r}")
                    if not isinstance(row[k], str) and not (k == "answer" and isinstance(row[k], (int, float))):
                        raise ValueError(f"field {k!r} must be a string, not {type(row[k]).__name__}")
                if row.get("choices") is not None and not (isinstance(row["choices"], list) and row["choices"]):
                    raise ValueError("'choices' must be a non-empty list")
                if check_images:
                    image = os.path.join(os.path.dirname(path), row["image"])
                    try:
                        with Image.open(image) as im:
                            im.load()
                    except FileNotFoundError:
                        raise ValueError(f"image not found: {image}") from None
                    except OSError as e:
                        raise ValueError(f"corrupt image {image}: {e}") from None
                rows.append(row)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if not skip_bad:
                    raise ValueError(f"{path}:{n}: {e}") from None
                bad.append(f"{path}:{n}: {e}")
    if bad:
        print(f"skipped {len(bad)} bad lines in {path} (first: {bad[0]})", file=sys.stderr)
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def writable_dir(path, flag="--out"):
    """Create the directory if needed and write a file in it, so work is never lost to a save that cannot happen."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"{path} is not a writable directory ({e.strerror or e}): choose another {flag}") from None
    return path


# ----------------------------------------------------------------------------------------------
# Building everything: generate -> assess -> the two SFT sets (world and real data alike).

def sft_row(rec, task, chain=None, answer=None, **extra):
    keep = {k: rec.get(k) for k in ("id", "image", "question", "family", "kind")}
    return {**keep, "answer": rec["answer"] if answer is None else answer, "task": task, "chain": chain, **extra}


def assess_and_write(rows, generator, answer_filter, scorer, out_dir, cfg):
    """Generate and assess N paths per question; write paths.jsonl and the two SFT sets; return their rows."""
    paths, reasoning, sound, flawed = [], [], [], []
    for rec in tqdm(rows, desc="reasoning paths", unit="q"):
        rng = random.Random(f"{cfg.seed}/paths/{rec['id']}")
        group = [as_path(p) for p in generator.generate(rec, cfg.paths_per_question, rng)]
        for k, (p, s) in enumerate(zip(group, scorer.score(rec, group))):
            paths.append({"id": rec["id"], "path": k, "steps": p["steps"], "final_answer": p["final_answer"],
                          "correct": answer_filter.judge(rec, p["final_answer"]), "score": s,
                          "bucket": bucket(s, cfg.high, cfg.mid), "errors": p.get("errors", [])})
        seen = set()  # distinct chains only
        for p in sorted(paths[-len(group):], key=lambda p: -p["score"]):
            chain = render_chain(p["steps"])
            if chain in seen:
                continue
            seen.add(chain)
            row = sft_row(rec, "summary", chain, path=p["path"], bucket=p["bucket"], chain_correct=p["correct"])
            if p["correct"] and p["bucket"] == "high":
                if len(seen) <= cfg.reasoning_per_question:
                    reasoning.append(sft_row(rec, "reasoning", chain, path=p["path"]))
                if len(seen) == 1:
                    sound.append(row)
            else:
                flawed.append(row)
    # Summary set: sound and flawed chains, target the correct answer, and perception QA so it keeps looking at images.
    rng = random.Random(f"{cfg.seed}/summary")
    flawed = rng.sample(flawed, min(len(flawed), round(len(sound) * cfg.flawed_per_sound)))
    perception = [r for r in rows if r.get("kind") == "perception"]
    perception = rng.sample(perception, min(len(perception), round(
        cfg.summary_perception * (len(sound) + len(flawed)))))
    summary = sound + flawed + [sft_row(r, "direct") for r in perception]
    rng.shuffle(summary)
    for name, set_rows in (("paths", paths), ("reasoning_sft", reasoning), ("summary_sft", summary)):
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), set_rows)
    return reasoning, summary, paths


def scene_graph(objects):
    """A scene's identity: two scenes with the same graph are the same picture."""
    return json.dumps([[o[k] for k in ("cell", "shape", "color", "size")] for o in objects])


def make_split(split, n_scenes, cfg, taken):
    """One split's scenes and questions; no scene graph of `taken` (earlier splits) recurs, so splits share none."""
    rows, scenes = [], []
    for i in range(n_scenes):
        rng = random.Random(f"{cfg.seed}/{split}/{i}")
        while True:
            objects = make_scene(rng, cfg)
            graph = scene_graph(objects)
            if graph not in taken:
                break
        taken.add(graph)
        scene = f"{split}-{i:05d}"
        scenes.append((scene, objects))
        draw = list(FAMILIES) + ["most_color"]  # most_color needs one top colour: drawn twice to stay balanced
        asked = 0
        for family in dict.fromkeys(rng.sample(draw, len(draw))):
            q = make_question(family, objects, rng)
            if q is None:
                continue
            question, spec, answer = q
            rows.append({"id": f"{scene}-{asked}", "image": f"images/{scene}.png", "question": question,
                         "answer": answer, "family": family, "kind": FAMILIES[family], "scene": scene,
                         "objects": objects, "spec": spec})
            asked += 1
            if asked == cfg.questions_per_scene:
                break
    return rows, scenes


def build_world(out_dir, **options):
    """Write the whole synthetic world to out_dir; returns the data card."""
    cfg = DataConfig(**options)
    if cfg.min_objects > cfg.max_objects:
        raise ValueError(f"--min-objects {cfg.min_objects} is more than --max-objects {cfg.max_objects}: "
                         f"pass a range with min <= max")
    writable_dir(out_dir)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    splits, taken = {}, set()
    for split in ("test", "val", "train"):  # test first: its scenes never depend on other sizes
        rows, scenes = make_split(split, getattr(cfg, f"{split}_scenes"), cfg, taken)
        write_split(out_dir, split, rows, scenes)
        splits[split] = (rows, scenes)
    train, train_scenes = splits["train"]
    teacher = ScriptedTeacher(cfg, cfg.max_steps)
    reasoning, summary, paths = assess_and_write(train, teacher, AnswerFilter(), SceneStepScorer(), out_dir, cfg)
    base = [sft_row({"id": f"{scene}-describe", "image": f"images/{scene}.png", "question": DESCRIBE_QUESTION,
                     "family": "describe", "kind": "perception"}, "describe", answer=describe(objects))
            for scene, objects in train_scenes]
    base += [sft_row(r, "direct") for r in train]
    write_jsonl(os.path.join(out_dir, "base.jsonl"), base)
    sets = {"base": base, "reasoning_sft": reasoning, "summary_sft": summary}
    texts = [m["content"] for rows in sets.values() for r in rows
             for m in task_messages(r["task"], r["question"], r["chain"], r["answer"])]
    texts += [m["content"] for r in train for task in ("direct", "vanilla")  # fitted on training text only
              for m in task_messages(task, r["question"], "", r["answer"])]
    texts += [render_chain(p["steps"]) for p in paths] + ["User:", "Assistant:", "System:"]
    texts.append(" ".join(str(n % 10) for n in range(5000)))  # every digit one token, 8/9 too
    tok = train_tokenizer(list(dict.fromkeys(texts)), cfg.vocab_size)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    card = data_card(cfg, {s: r for s, (r, _) in splits.items()}, sets, paths, tok)
    with open(os.path.join(out_dir, "card.json"), "w") as f:
        json.dump(card, f, indent=1)
    return card


def write_split(out_dir, split, rows, scenes):
    """A split's pictures under out_dir/images and its rows in out_dir/<split>.jsonl."""
    for scene, objects in tqdm(scenes, desc=f"{split} images", unit="img", leave=False):
        render_scene(objects).save(os.path.join(out_dir, "images", f"{scene}.png"), format="PNG", compress_level=6)
    write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), rows)


def world_config(out_dir):
    """The DataConfig the world in out_dir was built with (its card.json)."""
    with open(os.path.join(out_dir, "card.json")) as f:
        return DataConfig(**json.load(f)["config"])


def extra_split(out_dir, split, n_questions):
    """New questions on scenes no split of the world in out_dir has (the world is free; train_dpo.py's fresh pools):
    the world's own config, images under out_dir/images, rows in out_dir/<split>.jsonl -> the rows."""
    cfg = world_config(out_dir)
    taken = {scene_graph(r["objects"]) for name in ("train", "val", "test")
             for r in read_jsonl(os.path.join(out_dir, f"{name}.jsonl"))}
    rows, scenes = make_split(split, -(-n_questions // cfg.questions_per_scene), cfg, taken)
    write_split(out_dir, split, rows[:n_questions], scenes)
    return rows[:n_questions]


def data_card(cfg, splits, sets, paths, tok, image_seq_len=9):
    """Counts per family and split, bucket sizes, the summary set's ratio, chain lengths."""
    chain_len = [len(e.ids) for e in tok.encode_batch([render_chain(p["steps"]) for p in paths])]
    summary = Counter("direct" if r["task"] == "direct" else "sound" if r["chain_correct"] and r["bucket"] == "high"
                      else "flawed" for r in sets["summary_sft"])
    errors = {f.name: [p for p in paths if f.name in p["errors"]] for f in fields(ErrorRates)}
    return {
        "questions": {s: len(r) for s, r in splits.items()},
        "families": {s: dict(sorted(Counter(x["family"] for x in r).items())) for s, r in splits.items()},
        "paths": {"total": len(paths), "correct": sum(p["correct"] for p in paths),
                  "buckets": dict(Counter(p["bucket"] for p in paths)),
                  "chain_tokens_mean": round(sum(chain_len) / max(len(chain_len), 1), 1),
                  "chain_tokens_max": max(chain_len, default=0),
                  "mean_score_by_error": {k: round(sum(p["score"] for p in v) / len(v), 1)
                                          for k, v in errors.items() if v}},
        "sets": {name: len(rows) for name, rows in sets.items()},
        "summary_sft": {**summary, "correct:flawed": f"{summary['sound']}:{summary['flawed']}"},
        "max_tokens_per_sample": {name: max((len(render_conversation(tok, task_messages(
            r["task"], r["question"], r["chain"], r["answer"]), image_seq_len)[0])
            for r in rows), default=0) for name, rows in sets.items()},
        "vocab_size": tok.get_vocab_size(),
        "config": asdict(cfg),
    }


@dataclass
class DataCLI(DataConfig):
    out: str = option("out/data", "output directory")
    real: str = option(None, "check this JSONL (image, question, answer[, choices]) instead; agents.py --real uses it")
    skip_bad: bool = option(False, "skip and count bad --real lines")


def main(argv=None):
    args = parse_config(DataCLI, argv, "Build the synthetic world and the Insight-V data sets, or check a real JSONL.")
    try:
        if args.real is not None:
            rows = read_jsonl(args.real, args.skip_bad, ("image", "question", "answer"), True)
            print(f"{args.real}: {len(rows)} usable examples")
            return
        card = build_world(args.out, **{f.name: getattr(args, f.name) for f in fields(DataConfig)})
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for key, value in card.items():
        print(f"{key:>22}: {json.dumps(value)}")
    print(f"wrote {args.out} (card.json, tokenizer.json, images/, *.jsonl)")


if __name__ == "__main__":
    main()
