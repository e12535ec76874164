"""world.py: the synthetic visual world that stands in for the paper's data. Skip it on a first read.

48x48 scenes on a 3x3 grid of 16 px cells, at most one object per cell, which the tiny ViT (patch 8, pixel shuffle 2)
sees as one image token per cell; questions in nine families, each with an exact answer; a grammar of claims, one
checkable fact per reasoning step, which writes the teacher's steps, parses any chain and checks it against the scene
graph; and the scripted teacher, the paper's LLM generator with injected mistakes. data.py builds the data sets from
it; its multi-granularity assessment scores chains with the claim checker.
"""
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

from common import option


@dataclass
class ErrorRates:
    """How often the scripted teacher slips, per path (each mistake at most once, where it fits). Defaults leave ~70%
    of paths flawless, so a question's N paths mix sound and flawed reasoning, as sampled LLM paths do. wrong_conclusion
    (right steps, another answer) is off by default (docs/experiments.md, "The summary agent")."""
    miscount: float = option(0.15, "rate: a Count step drops or adds one object", min=0, max=1)
    wrong_attribute: float = option(0.10, "rate: a step misreads a colour, shape or place", min=0, max=1)
    arithmetic_slip: float = option(0.10, "rate: a Compare / Add / Subtract result is off", min=0, max=1)
    skip_step: float = option(0.10, "rate: a step is left out (its fact used silently)", min=0, max=1)
    premature_answer: float = option(0.05, "rate: the chain stops early and guesses", min=0, max=1)
    wrong_conclusion: float = option(0.0, "rate: the answer does not follow from the last step", min=0, max=1)


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
ANSWER_TAIL = re.compile(r",? ?so the answer is (.+?)\.?\s*$")


def parse_claim(step):
    """The claim a step's content makes, or None if it is not in the world's grammar."""
    text = ANSWER_TAIL.sub("", step["content"].strip()).rstrip(".")
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
        return {"steps": steps, "final_answer": answer, "errors": errors}

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


# The labels of the vision tower's pretraining (train_sft.pretrain_vision), per grid cell.
VISION_LABELS = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}


def cell_labels(description):
    """A scene description -> per cell [shape, colour, size], each 1 + its index in VISION_LABELS; 0s if empty."""
    labels = [[0] * len(VISION_LABELS) for _ in CELLS]
    for o in read_description(description):
        labels[CELLS.index(o["cell"])] = [1 + VISION_LABELS[k].index(o[k]) for k in VISION_LABELS]
    return labels


# ----------------------------------------------------------------------------------------------
# Splits: scenes no earlier split has, and their questions.

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
