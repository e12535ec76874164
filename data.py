"""data.py: the whole Insight-V data pipeline, on the synthetic world of world.py or on real data.

Insight-V (Dong et al., arXiv 2411.14432, Sec. 3.1) builds its training data in three moves, all made here, with the
tokenizer and the chat format every other file reads:
1. progressive long-chain generation: a generator writes a reasoning path one structured step at a time,
   {"title", "content", "next_action": "continue" | "final_answer"}, N paths per question;
2. multi-granularity assessment: a coarse answer filter, then a fine step score 1-100 (High / Mid / Low);
3. two SFT sets: High correct paths for the reasoning agent; paths from every bucket plus wrong-answer paths
   (target = the correct answer) for the summary agent.

In the world every answer and step can be checked against the scene graph, so the paper's LLM teacher and scoring
agent become world.ScriptedTeacher, with injected mistakes, and SceneStepScorer; for real data a loaded VLM plays both
(agents.py --real).

    python data.py --out out/data                     # the world, defaults below
    python data.py --real bench.jsonl --skip-bad      # check a real JSONL
"""
import json
import os
import random
import re
import hashlib
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

import checkpoint
import common
import world
from common import option
from model import SPECIAL_TOKENS  # the chat format's special tokens, which the model's loader also needs

# ----------------------------------------------------------------------------------------------
# Configuration: every field is also a --flag (common.parse_config).

@dataclass
class DataConfig(world.ErrorRates):
    seed: int = option(0, "seed of the scenes, questions and paths")
    train_scenes: int = option(2000, "training scenes", min=1)
    val_scenes: int = option(400, "validation scenes (x questions per scene: 1200)", min=1)
    test_scenes: int = option(400, "test scenes (x questions per scene >= 1000 questions)", min=1)
    questions_per_scene: int = option(3, "distinct question families per scene", min=1)
    min_objects: int = option(3, "fewest objects in a scene", min=1, max=9)
    max_objects: int = option(7, "most objects in a scene (9 cells)", min=1, max=9)
    hard_val_scenes: int = option(None, "scenes of hard_val.jsonl, larger than any other split's: where RL is tried "
                                  "(default: --val-scenes; 0 = none)", type=int, min=0)
    hard_test_scenes: int = option(None, "scenes of hard_test.jsonl (default: 2 x --test-scenes)", type=int, min=0)
    hard_min_objects: int = option(8, "fewest objects in a hard scene", min=1, max=9)
    hard_max_objects: int = option(8, "most objects in a hard scene (9 is past the edge: docs/experiments.md)",
                                   min=1, max=9)
    paths_per_question: int = option(4, "N reasoning paths per question (the paper: unstated)", min=1)
    max_steps: int = option(16, "step cap of a path, as in the paper", min=1)
    high: int = option(90, "score >= high is High (only flawless world paths)", min=1, max=100)
    mid: int = option(50, "mid <= score < high is Mid; below is Low", min=1, max=100)
    reasoning_per_question: int = option(1, "distinct High correct chains per question kept", min=1)
    flawed_per_sound: float = option(0.5, "summary set: flawed paths per sound one (2:1)", min=0)
    summary_perception: float = option(0.25, "perception QA in the summary set, per chain row", min=0)
    vocab_size: int = option(512, "tiny BPE: 256 bytes + specials + merges for world words", min=1)

    def __post_init__(self):  # unless given, the hard splits scale with the standard ones (a test's tiny world too)
        self.hard_val_scenes = self.val_scenes if self.hard_val_scenes is None else self.hard_val_scenes
        self.hard_test_scenes = 2 * self.test_scenes if self.hard_test_scenes is None else self.hard_test_scenes


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
        m = world.ANSWER_TAIL.search(step["content"])
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
        objects, reference = rec["objects"], world.solve(rec["objects"], rec["spec"])
        needed = {world.claim_key(c) for c in reference}
        scores = []
        for path in map(as_path, paths):
            claims = [world.parse_claim(s) for s in path["steps"]]
            true = [c for c in claims if c is not None and world.check_claim(c, objects, reference)]
            precision = len(true) / len(claims) if claims else 0.0
            recall = len(needed & {world.claim_key(c) for c in true}) / len(needed)
            right = self.answer_filter.judge(rec, path["final_answer"])
            scores.append(1 + round(99 * precision * recall * (1.0 if right else 0.5)))
        return scores

    def first_error(self, rec, path):
        """Index of a wrong chain's first wrong step (Step-DPO's target): the first false or unreadable claim, else the
        last step (its answer does not follow, or comes too early); None when the answer is right."""
        path = as_path(path)
        if self.answer_filter.judge(rec, path["final_answer"]):
            return None
        reference = world.solve(rec["objects"], rec["spec"])
        for i, step in enumerate(path["steps"]):
            c = world.parse_claim(step)
            if c is None or not world.check_claim(c, rec["objects"], reference):
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
    except (OSError, Image.DecompressionBombError) as e:  # a bomb: a small file that decodes to gigapixels
        raise ValueError(f"cannot read image {path}: {e}") from None
    im = im if im.size == (image_size, image_size) else im.resize((image_size, image_size), Image.BICUBIC)
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
                    except (OSError, Image.DecompressionBombError) as e:
                        raise ValueError(f"corrupt image {image}: {e}") from None
                rows.append(row)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if not skip_bad:
                    raise ValueError(f"{path}:{n}: {e}") from None
                bad.append(f"{path}:{n}: {e}")
    if bad:
        print(f"skipped {len(bad)} bad lines in {path} (first: {bad[0]})", file=sys.stderr)
    return rows


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
        common.write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), set_rows)
    return reasoning, summary, paths


def build_world(out_dir, **options):
    """Write the whole synthetic world to out_dir, one writer at a time (common.run_lock); returns the data card."""
    cfg = DataConfig(**options)
    for low, high in (("min_objects", "max_objects"), ("hard_min_objects", "hard_max_objects")):
        if getattr(cfg, low) > getattr(cfg, high):
            raise ValueError(f"--{low.replace('_', '-')} {getattr(cfg, low)} is more than --{high.replace('_', '-')} "
                             f"{getattr(cfg, high)}: pass a range with min <= max")
    with common.run_lock(out_dir):
        return write_world(out_dir, cfg)


def write_world(out_dir, cfg):
    Path(out_dir, checkpoint.WORLD_DONE).unlink(missing_ok=True)  # written last: until then the world is unfinished
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    splits, taken = {}, set()
    hard = replace(cfg, min_objects=cfg.hard_min_objects, max_objects=cfg.hard_max_objects)  # no SFT set has these
    for split, c in (("test", cfg), ("val", cfg), ("train", cfg), ("hard_test", hard), ("hard_val", hard)):
        if getattr(cfg, f"{split}_scenes"):  # test first: its scenes never depend on other sizes; the hard ones last
            rows, scenes = world.make_split(split, getattr(cfg, f"{split}_scenes"), c, taken)
            write_split(out_dir, split, rows, scenes)
            splits[split] = (rows, scenes)
    train, train_scenes = splits["train"]
    teacher = world.ScriptedTeacher(cfg, cfg.max_steps)
    reasoning, summary, paths = assess_and_write(train, teacher, AnswerFilter(), SceneStepScorer(), out_dir, cfg)
    base = [sft_row({"id": f"{scene}-describe", "image": f"images/{scene}.png", "question": world.DESCRIBE_QUESTION,
                     "family": "describe", "kind": "perception"}, "describe", answer=world.describe(objects))
            for scene, objects in train_scenes]
    base += [sft_row(r, "direct") for r in train]
    common.write_jsonl(os.path.join(out_dir, "base.jsonl"), base)
    sets = {"base": base, "reasoning_sft": reasoning, "summary_sft": summary}
    texts = [m["content"] for rows in sets.values() for r in rows
             for m in task_messages(r["task"], r["question"], r["chain"], r["answer"])]
    texts += [m["content"] for r in train for task in ("direct", "vanilla")  # fitted on training text only
              for m in task_messages(task, r["question"], "", r["answer"])]
    texts += [render_chain(p["steps"]) for p in paths] + ["User:", "Assistant:", "System:"]
    texts.append(" ".join(str(n % 10) for n in range(5000)))  # every digit one token, 8/9 too
    tok = train_tokenizer(list(dict.fromkeys(texts)), cfg.vocab_size)
    common.atomic_write(os.path.join(out_dir, "tokenizer.json"), tok.save)
    card = data_card(cfg, {s: r for s, (r, _) in splits.items()}, sets, paths, tok)
    files = [*(f"{name}.jsonl" for name in (*splits, *sets, "paths")), "tokenizer.json"]
    digest = hashlib.sha256(b"".join(Path(out_dir, name).read_bytes() for name in files))
    card = {"id": digest.hexdigest()[:16], **card}  # the same files, the same id: what was built on them stays current
    common.atomic_write(os.path.join(out_dir, checkpoint.WORLD_DONE), lambda f: common.write_json(card, f))
    return card


def write_split(out_dir, split, rows, scenes):
    """A split's pictures under out_dir/images and its rows in out_dir/<split>.jsonl."""
    for scene, objects in tqdm(scenes, desc=f"{split} images", unit="img", leave=False):
        image = os.path.join(out_dir, "images", f"{scene}.png")
        with common.writing(image):
            world.render_scene(objects).save(image, format="PNG", compress_level=6)
    common.write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), rows)


def world_config(out_dir):
    """The DataConfig the world in out_dir was built with (its card.json)."""
    with open(os.path.join(out_dir, "card.json")) as f:
        return DataConfig(**{"hard_val_scenes": 0, "hard_test_scenes": 0, **json.load(f)["config"]})  # none before


def hard_scenes(out_dir):  # extra_split's changes for scenes as large as the hard splits' of the world in out_dir
    return {key: getattr(world_config(out_dir), f"hard_{key}") for key in ("min_objects", "max_objects")}


def extra_split(out_dir, split, n_questions, **changes):
    """New questions on scenes no split of the world in out_dir has (the world is free; train_dpo.py's fresh pools):
    the world's own config with `changes` (min_objects=8, max_objects=9: larger scenes), images under out_dir/images,
    rows in out_dir/<split>.jsonl -> the rows."""
    cfg = replace(world_config(out_dir), **changes)
    files = [os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "val", "test", "hard_val", "hard_test")]
    taken = {world.scene_graph(r["objects"]) for file in files if os.path.isfile(file) for r in read_jsonl(file)}
    rows, scenes = world.make_split(split, -(-n_questions // cfg.questions_per_scene), cfg, taken)
    write_split(out_dir, split, rows[:n_questions], scenes)
    return rows[:n_questions]


def teacher_set(out_dir, split, name, n_questions):
    """The scripted teacher's flawless chains (no slips: what a perfect generator writes) for new questions on scenes
    as large as the hard splits' -> out_dir/<name> (reasoning rows), the teacher bound of train_dpo.build_controls."""
    teacher = world.ScriptedTeacher(world.ErrorRates(**{f.name: 0.0 for f in fields(world.ErrorRates)}),
                                    world_config(out_dir).max_steps)
    rows = [sft_row(r, "reasoning", render_chain(teacher.path(r, random.Random(0))["steps"]))  # no slip to draw
            for r in extra_split(out_dir, split, n_questions, **hard_scenes(out_dir))]
    common.atomic_write(os.path.join(out_dir, name), lambda p: common.write_jsonl(p, rows))


def data_card(cfg, splits, sets, paths, tok, image_seq_len=9):
    """Counts per family and split, bucket sizes, the summary set's ratio, chain lengths."""
    chain_len = [len(e.ids) for e in tok.encode_batch([render_chain(p["steps"]) for p in paths])]
    summary = Counter("direct" if r["task"] == "direct" else "sound" if r["chain_correct"] and r["bucket"] == "high"
                      else "flawed" for r in sets["summary_sft"])
    errors = {f.name: [p for p in paths if f.name in p["errors"]] for f in fields(world.ErrorRates)}
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
    args = common.parse_config(DataCLI, argv, "Build the synthetic world and the Insight-V data sets, or check a "
                               "real JSONL.")
    try:
        if args.real is not None:
            rows = read_jsonl(args.real, args.skip_bad, ("image", "question", "answer"), True)
            print(f"{args.real}: {len(rows)} usable examples")
            return
        card = build_world(args.out, **{f.name: getattr(args, f.name) for f in fields(DataConfig)})
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # card.json, written last, is missing: train_dpo.py builds the world again
        common.interrupted(f"{args.out} is incomplete; run the command again")
    for key, value in card.items():
        print(f"{key:>22}: {json.dumps(value)}")
    print(f"wrote {args.out} (card.json, tokenizer.json, images/, *.jsonl)")


if __name__ == "__main__":
    main()
