"""The two agents of Insight-V, and how they answer questions together.

Insight-V (Dong et al. 2024, arXiv 2411.14432, Sec. 3.2) splits visual reasoning between two models fine-tuned from
one base MLLM (their prompts, and those of the single-model arms, are defined once, in data.task_messages):
  - the reasoning agent reads the image and the question and writes only a long structured chain, `<thoughts>` ...
    `</thoughts>` with one `Title: content` line per step (the official code's format, data.render_chain's);
  - the summary agent reads the image, the question and that chain, judges silently whether it is sound, and answers
    briefly: from the chain if it is, else from the image (its training set holds flawed chains on purpose, data.py).
Small models write untidy chains (no end tag, a step cut off, nothing at all): data.parse_chain keeps every line it
can read as a step. Decoding is greedy for both agents (the paper samples at 0.2-0.7 and 0.2), so evaluation gives
the same numbers on every run and machine; `temperature` turns sampling back on.

    python agents.py --image out/data/images/test-00000.png --question "How many circles are there?"
    python agents.py --real bench.jsonl --generator CKPT [--judge CKPT] --data-out out/real
"""

import json
import os
import random
import re
from dataclasses import dataclass, fields

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import checkpoint
import common
import data
from generate import generate, token_logps
from model import VLM

# Token budgets: a world chain is under 100 tokens (card.json has the longest), real ones run longer; answers are short.
CHAIN_TOKENS = 256
ANSWER_TOKENS = 32
OVERRIDE_MARGIN = 5.0  # nats by which the summary agent must prefer its own answer to the chain's (SummaryAgent)


# ----------------------------------------------------------------------------------------------
# One batched generation helper: every agent and every arm decodes through it.

def decode_dtype(device, precision="auto"):
    """The dtype decoding computes in (None: the model's own, fp32): the run's --precision, where "auto" decodes as
    training does on a GPU (bf16, fp16 before Ampere) and in fp32 on the CPU, as every result in the docs was."""
    if precision == "auto" and torch.device(device).type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(common.resolve_precision(device, precision))


def complete(vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1, seed=0,
             precision="auto", prefixes=None):
    """The reply to each conversation (messages without the assistant turn), all in one batched call -> list[str].
    images (B, 3, H, W): images[i] is conversation i's, or None (no image). Rows are prompt-major if num_samples > 1.
    prefixes[i], if given, is the start of reply i, written for the model to continue (and returned with it)."""
    tok = vlm.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer: load a checkpoint saved with its tokenizer.json")
    ids = data.special_ids(tok)
    prefixes = prefixes or [""] * len(conversations)
    # " " + prefix: the assistant text is encoded after "Assistant:" with one space, as render_conversation does.
    prompts = [data.render_conversation(tok, messages, vlm.config.tokens_per_image, add_generation_prompt=True)[0]
               + (tok.encode(" " + prefix, add_special_tokens=False).ids if prefix else [])
               for messages, prefix in zip(conversations, prefixes)]
    device = next(vlm.parameters()).device
    new = generate(vlm, prompts, None if images is None else images.to(device), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, num_samples=num_samples, stop_ids=[ids["eou"]], seed=seed,
                   pad_id=ids["pad"], dtype=decode_dtype(device, precision))
    return [(prefixes[i // num_samples] + tok.decode([t for t in row if t != ids["eou"]])).strip()
            for i, row in enumerate(new)]


def batches(rows, image_root, image_size, batch_size, desc=None):
    """(rows, images (B, 3, H, W)) batch by batch; each image is read once, with a progress bar."""
    bar = tqdm(total=len(rows), desc=desc, unit="q", leave=False, disable=desc is None)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        yield batch, torch.stack([data.load_image(os.path.join(image_root, r["image"]), image_size) for r in batch])
        bar.update(len(batch))
    bar.close()


def format_question(rec):
    """The question as shown to a model, with lettered options when it has choices."""
    return rec["question"] + "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(rec.get("choices") or []))


def read_chain(text):
    """A reasoning agent's reply -> {chain, steps, chain_answer}, whatever state the chain is in."""
    steps = data.parse_chain(text)
    return {"chain": text, "steps": steps, "chain_answer": data.chain_answer(steps)}


# ----------------------------------------------------------------------------------------------
# Many chains per question, assessed: what DPO, GRPO and the on-policy summary set learn from

def sample_chains(policy, rows, image_root, cfg, seed, k=None, temperature=None, prefixes=None, desc="sampling"):
    """k chains per question (default --samples-per-question at --temperature; 0 = greedy) from the policy -> {row id:
    [chain text, ...]}; prefixes {row id: start of the chain} are continued. Under torchrun process r decodes batches
    r, r + N, ..., each with the seed it has in one process, and every process gets all the chains."""
    k = cfg.samples_per_question if k is None else k
    temperature, out = cfg.temperature if temperature is None else temperature, {}
    per_batch = max(1, cfg.sample_batch // k)  # prompts per generate call: k samples each
    rank, world = common.distributed()
    mine = [r for start in range(rank * per_batch, len(rows), world * per_batch) for r in rows[start:start + per_batch]]
    for i, (batch, images) in enumerate(batches(mine, image_root, policy.config.vision.image_size, per_batch,
                                               desc=f"  {desc} chains" if rank == 0 else None)):
        texts = complete(policy, [data.task_messages("reasoning", r["question"]) for r in batch], images,
                         cfg.max_chain_tokens, temperature, cfg.top_p, num_samples=k,
                         seed=seed + rank + i * world, precision=cfg.precision,  # batch rank + i * N of all
                         prefixes=prefixes and [prefixes[r["id"]] for r in batch])
        for j, r in enumerate(batch):
            out[r["id"]] = texts[j * k:(j + 1) * k]  # rows are prompt-major
    chains = {i: c for part in common.all_gather(out) for i, c in part.items()}
    return {r["id"]: chains[r["id"]] for r in rows}  # in the rows' order


def rank_samples(row, texts, answer_filter, scorer):
    """Score all chains of one question together: the answer filter first, then the 1-100 step score."""
    scores = scorer.score(row, texts)
    verdicts = [answer_filter.judge(row, data.as_path(text)["final_answer"]) for text in texts]
    return [{"text": t, "correct": c, "score": s, "key": (int(c), s)} for t, c, s in zip(texts, verdicts, scores)]


def at_the_edge(ranked, min_score):
    """Whether a question's k assessed samples put it at the policy's edge: some, not all, right and sound (step score
    >= min_score). RL learns there (ThinkLite-VL, arXiv 2504.07934; Xiong et al., arXiv 2504.11343)."""
    passes = sum(s["correct"] and s["score"] >= min_score for s in ranked)
    return 0 < passes < len(ranked)


SUMMARY_SET = "summary_onpolicy_sft.jsonl"
SUMMARY_SET_OPTIONS = ("summary_chains", "summary_temperature", "seed", "top_p", "max_chain_tokens", "sample_batch")


def on_policy_summary_set(cfg, data_dir, device):
    """The summary set train_dpo.py's summary agent trains on: the teacher's rows plus --summary-chains chains per
    training question from the SFT reasoning agent, with the true answer as the target: at test time it reads this
    agent's chains, whose mistakes differ from the teacher's injected ones (the paper's summary data comes from the
    reasoning data's generator likewise) -> the file's name in data_dir ("path": agentK marks the rows)."""
    name, answer_filter, scorer = SUMMARY_SET, data.AnswerFilter(), data.SceneStepScorer()
    common.print0(f"[stage] summary set + {cfg.summary_chains} reasoning-agent chain(s) per training question -> "
                  f"{name}")
    reasoner = VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "reasoning")).to(device).eval()
    train = data.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    chains = sample_chains(reasoner, train, data_dir, cfg, cfg.seed, k=cfg.summary_chains,
                           temperature=cfg.summary_temperature, desc="summary-set")
    rows, world = data.read_jsonl(os.path.join(data_dir, "summary_sft.jsonl")), data.world_config(data_dir)
    for r in train:
        for k, s in enumerate(rank_samples(r, chains[r["id"]], answer_filter, scorer)):
            rows.append(data.sft_row(r, "summary", data.render_chain(data.parse_chain(s["text"])), path=f"agent{k}",
                                     bucket=data.bucket(s["score"], world.high, world.mid), chain_correct=s["correct"]))
    random.Random(cfg.seed).shuffle(rows)
    common.on_rank0(common.atomic_write, os.path.join(data_dir, name), lambda p: common.write_jsonl(p, rows))
    return name


# ----------------------------------------------------------------------------------------------
# The two agents: each keeps its model and its decoding options (complete's keywords).

class ReasoningAgent:
    """Image + question + the reasoning instruction -> a chain of steps, and no answer of its own."""

    def __init__(self, vlm, max_new_tokens=CHAIN_TOKENS, temperature=0.0, top_p=None, seed=0, precision="auto"):
        self.vlm, self.decoding = vlm, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed, precision=precision)

    def reason(self, questions, images):  # images (B, 3, H, W) -> [{chain, steps, chain_answer}]
        texts = complete(self.vlm, [data.task_messages("reasoning", q) for q in questions], images, **self.decoding)
        return [read_chain(t) for t in texts]


@torch.no_grad()
def reply_logps(vlm, conversations, replies, images):
    """Summed log-prob of each reply (and its end token) to its conversation, teacher-forced -> (B,) fp32 on the CPU."""
    rendered = [data.render_conversation(vlm.tokenizer, messages + [{"role": "assistant", "content": reply}],
                                         vlm.config.tokens_per_image)
                for messages, reply in zip(conversations, replies)]
    pad = data.special_ids(vlm.tokenizer)["pad"]
    ids = pad_sequence([torch.tensor(i) for i, _ in rendered], batch_first=True, padding_value=pad)  # (B, T)
    mask = pad_sequence([torch.tensor(m) for _, m in rendered], batch_first=True)  # (B, T): 1 on the reply
    device = next(vlm.parameters()).device
    logps, mask = token_logps(vlm, ids.to(device), ids.masked_fill(mask == 0, -100).to(device),
                              None if images is None else images.to(device))  # right pads: causal mask
    return (logps * mask).sum(-1).cpu()


class SummaryAgent:
    """Image + question + a chain -> a short final answer (from the chain if it is sound, else directly).

    The paper's summary agent decides silently whether the chain is right. A small one overrides right colour and
    shape chains with its own weaker look (docs/experiments.md, "The summary agent"), so an answer that departs from
    the chain's is kept only if the agent finds it more likely than the chain's answer by `override_margin` nats
    (None: its answer as decoded, the paper's rule)."""

    def __init__(self, vlm, max_new_tokens=ANSWER_TOKENS, temperature=0.0, top_p=None, seed=0, precision="auto",
                 override_margin=OVERRIDE_MARGIN):
        self.vlm, self.decoding = vlm, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed, precision=precision)
        self.override_margin = override_margin

    def summarize(self, questions, steps, images):  # steps: one list of steps per question -> [answer]
        # Rendered again from the parsed steps, so even a cut-off chain arrives in the format of its training data.
        messages = [data.task_messages("summary", q, data.render_chain(s)) for q, s in zip(questions, steps)]
        answers = complete(self.vlm, messages, images, **self.decoding)
        if self.override_margin is None:
            return answers
        stated = [data.chain_answer(s) for s in steps]
        departs = [i for i, (a, c) in enumerate(zip(answers, stated))
                   if c and data.normalize_answer(a) != data.normalize_answer(c)]
        if departs:
            # Both replies of each departing question in one forward: its own answers, then the chains'.
            convs, imgs = [messages[i] for i in departs] * 2, None if images is None else images[departs + departs]
            own, chain = reply_logps(self.vlm, convs, [answers[i] for i in departs] + [stated[i] for i in departs],
                                     imgs).chunk(2)
            for i, m in zip(departs, (own - chain).tolist()):
                if m < self.override_margin:
                    answers[i] = stated[i]
        return answers


class TwoAgentSystem:
    """The reasoning agent writes a chain, then the summary agent answers from it, batch by batch."""

    def __init__(self, reasoner, summarizer, batch_size=64):
        if reasoner.vlm.config.vision.image_size != summarizer.vlm.config.vision.image_size:
            raise ValueError("the two agents take images of different sizes: fine-tune both from one base model")
        self.reasoner, self.summarizer, self.batch_size = reasoner, summarizer, batch_size

    def answer(self, rows, image_root, desc=None):
        """rows with image (relative to image_root) and question -> [{chain, steps, chain_answer, answer}]."""
        size = self.reasoner.vlm.config.vision.image_size
        return [result for batch, images in batches(rows, image_root, size, self.batch_size, desc)
                for result in self.answer_batch([format_question(r) for r in batch], images)]

    def answer_batch(self, questions, images):  # images (B, 3, H, W), each used by both agents
        chains = self.reasoner.reason(questions, images)
        answers = self.summarizer.summarize(questions, [c["steps"] for c in chains], images)
        return [{**c, "answer": a} for c, a in zip(chains, answers)]


# ----------------------------------------------------------------------------------------------
# Single-model arms of the paper's ablation (Table 5), one model per question: direct (the base model answers at once,
# the "base model" row), summary_only (the summary agent trained without chains, at once), vanilla (chain, then answer).

def read_vanilla(text):
    """A vanilla reply (chain, then the answer after its end tag) -> {chain, steps, chain_answer, answer}."""
    cut_off = "<thoughts>" in text and "</thoughts>" not in text  # cut off inside its chain: it gave no answer
    return {**read_chain(text), "answer": "" if cut_off else text.split("</thoughts>", 1)[-1].strip()}


def answer_direct(vlm, rows, image_root, task="direct", batch_size=64, max_new_tokens=None, temperature=0.0, desc=None,
                  precision="auto"):
    """One model answers every row on its own -> [{chain, steps, chain_answer, answer}], no chain unless "vanilla"."""
    if task not in ("direct", "summary_only", "vanilla"):
        raise ValueError(f"unknown single-model task {task!r}: choose direct, summary_only or vanilla")
    if max_new_tokens is None:  # a vanilla reply holds a chain and then the answer
        max_new_tokens = CHAIN_TOKENS + ANSWER_TOKENS if task == "vanilla" else ANSWER_TOKENS
    results = []
    for batch, images in batches(rows, image_root, vlm.config.vision.image_size, batch_size, desc):
        texts = complete(vlm, [data.task_messages(task, format_question(r)) for r in batch], images, max_new_tokens,
                         temperature, precision=precision)
        no_chain = {"chain": None, "steps": None, "chain_answer": None}
        results += [read_vanilla(t) if task == "vanilla" else {**no_chain, "answer": t} for t in texts]
    return results


# ----------------------------------------------------------------------------------------------
# Real data (paper Sec. 3.1): a loaded VLM writes and judges reasoning paths behind the interfaces data.assess_and_write
# calls for the world: world.ScriptedTeacher (generate), data.AnswerFilter (judge) and data.SceneStepScorer (score).

STEP_PROMPT = ('Think about the next step only. Reply with one JSON object: {"title": ..., '
               '"content": ..., "next_action": "continue" or "final_answer"}.')
FINAL_PROMPT = "Given these steps, give only the final answer."


class _VLMClient:
    """Plain questions to a loaded VLM, about one image or none, decoded through complete."""

    def __init__(self, vlm, root=".", temperature=0.7, top_p=0.95, max_new_tokens=128):
        self.vlm, self.root = vlm, root
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def ask(self, texts, rng, image=None, temperature=None, max_new_tokens=None):
        images = None
        if image is not None:  # the same image under every text
            images = data.load_image(os.path.join(self.root, image), self.vlm.config.vision.image_size)
            images = images.expand(len(texts), -1, -1, -1)
        messages = [[{"role": "user", "content": t, "image": image is not None}] for t in texts]
        return complete(self.vlm, messages, images, max_new_tokens or self.max_new_tokens,
                        self.temperature if temperature is None else temperature, self.top_p,
                        seed=rng.randrange(2 ** 31))


class ModelGenerator(_VLMClient):
    """The paper's progressive generator: the VLM writes one JSON step per call, a question's N paths together in one
    batch; malformed JSON is retried, then the path ends; a final answer is requested after the last step."""

    def __init__(self, vlm, max_steps=16, retries=2, **kw):
        super().__init__(vlm, **kw)
        self.max_steps, self.retries = max_steps, retries

    def generate(self, rec, n, rng):
        paths = [{"steps": [], "final_answer": ""} for _ in range(n)]
        fails, live = [0] * n, list(range(n))
        while live:
            prompts = [f"{format_question(rec)}\nSteps so far:\n" + "".join(
                json.dumps(s) + "\n" for s in paths[i]["steps"]) + STEP_PROMPT for i in live]
            for i, reply in zip(list(live), self.ask(prompts, rng, rec["image"])):
                step = parse_step_json(reply)
                if step is None:
                    fails[i] += 1
                else:
                    paths[i]["steps"].append(step)
                if (fails[i] > self.retries or len(paths[i]["steps"]) >= self.max_steps
                        or (step and step["next_action"] == "final_answer")):
                    live.remove(i)
        todo = [p for p in paths if data.chain_answer(p["steps"]) is None]
        texts = [f"{format_question(rec)}\n{data.render_chain(p['steps'])}\n{FINAL_PROMPT}" for p in todo]
        replies = iter(self.ask(texts, rng, rec["image"], max_new_tokens=16) if todo else [])
        for p in paths:  # the answer its steps state, else the one asked for after them
            p["final_answer"] = next(replies) if p in todo else data.chain_answer(p["steps"]) or ""
        return paths


def parse_step_json(text):
    """The first {...} in a reply as a step record, or None when it is not one."""
    try:
        step = json.loads(text[text.index("{"):text.rindex("}") + 1])
    except ValueError:
        return None
    if not (isinstance(step, dict) and isinstance(step.get("content"), str)):
        return None
    action = step.get("next_action")
    return {"title": str(step.get("title", "")).replace("\n", " "), "content": step["content"].replace("\n", " "),
            "next_action": action if action in ("continue", "final_answer") else "continue"}


class ModelJudge(_VLMClient):
    """Both assessment roles, on text: the paper's same-meaning check; one call scores all N paths, so they compare."""

    def __init__(self, vlm, retries=2, **kw):
        super().__init__(vlm, **{"temperature": 0.0, **kw})
        self.retries = retries

    def judge(self, rec, answer):
        if data.is_correct(answer, rec["answer"], rec.get("choices")):
            return True
        question = (f"Question: {format_question(rec)}\nGround truth: {rec['answer']}\nAnswer: {answer}\n"
                    "Does the answer have the same meaning as the ground truth? Reply 1 or 0.")
        return self.ask([question], random.Random(0), max_new_tokens=4)[0].strip().startswith("1")

    def score(self, rec, paths):
        paths = [data.as_path(p) for p in paths]
        text = (f"Question: {format_question(rec)}\nGround truth: {rec['answer']}\n" + "".join(
            f"Path {i + 1}:\n{data.render_chain(p['steps'])}\n" for i, p in enumerate(paths)) +
            f"Score each path from 1 to 100 for correct, complete, relevant steps. Reply with "
            f"a JSON list of {len(paths)} integers.")
        rng = random.Random(0)
        for attempt in range(self.retries + 1):
            reply = self.ask([text], rng, temperature=0.0 if attempt == 0 else 0.7)[0]
            m = re.search(r"\[[\d\s,.]*\]", reply)
            scores = [int(float(x)) for x in re.findall(r"\d+(?:\.\d+)?", m[0])] if m else []
            if len(scores) == len(paths):
                return [max(1, min(100, s)) for s in scores]
        return [100 if self.judge(rec, p["final_answer"]) else 1 for p in paths]  # unreadable: the coarse verdict


# ----------------------------------------------------------------------------------------------
# Loading checkpoints, and the CLI

def load_vlm(path, device=None):
    """A checkpoint directory -> VLM in eval mode on the device, with a clear error when it is not there."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {path}: train it with python train_dpo.py --iters 3 (every stage)")
    vlm = VLM.from_pretrained(path)
    if vlm.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: save the checkpoint together with its tokenizer")
    return vlm.to(device or common.resolve_device("auto")).eval()


@dataclass
class AgentsConfig:
    """One image and question for the two agents; or --real: reasoning paths and the two SFT sets for a real JSONL."""
    image: str = common.option(None, "image file (png, jpg, ...)")
    question: str = common.option(None, "the question about the image")
    out: str = common.option("out", "the run directory whose agents are used by default")
    reasoning: str = common.option(None, "reasoning agent checkpoint (default: the last DPO round in --out, else SFT)")
    summary: str = common.option(None, "summary agent checkpoint (default: the summary agent in --out)")
    max_new_tokens: int = common.option(CHAIN_TOKENS, "token limit of the chain", min=1)
    temperature: float = common.option(0.0, "reasoning agent temperature; 0 = greedy (the paper: 0.2-0.7)", min=0)
    override_margin: float = common.option(OVERRIDE_MARGIN, "nats by which the summary agent must prefer its answer "
                                                          "to the chain's (=-inf: its answer as decoded)")
    seed: int = common.option(0, "random seed when sampling, and of the --real paths")
    real: str = common.option(None, "JSONL of image, question, answer (optional choices)")
    generator: str = common.option(None, "checkpoint that writes the --real reasoning paths")
    judge: str = common.option(None, "checkpoint that judges the paths (default: the generator)")
    data_out: str = common.option("out/real", "directory for the --real paths and SFT sets")
    skip_bad: bool = common.option(False, "skip and count bad --real lines")
    paths_per_question: int = common.option_of(data.DataConfig, "paths_per_question")  # the --real data options
    max_steps: int = common.option_of(data.DataConfig, "max_steps", "--real: step cap of a path")
    high: int = common.option_of(data.DataConfig, "high", "--real: judge score >= high is High")
    mid: int = common.option_of(data.DataConfig, "mid", "--real: mid <= score < high is Mid; below is Low")
    reasoning_per_question: int = common.option_of(data.DataConfig, "reasoning_per_question")
    flawed_per_sound: float = common.option_of(data.DataConfig, "flawed_per_sound")
    summary_perception: float = common.option_of(data.DataConfig, "summary_perception")


def write_real_sets(cfg):
    """--real: N paths per question from the generator, assessed by the judge, and the two SFT sets, in --data-out."""
    if not cfg.generator:
        raise SystemExit("error: pass --generator CKPT with --real (python data.py --real FILE only checks the file)")
    shared = [f.name for f in fields(data.DataConfig) if hasattr(cfg, f.name)]  # --seed and the --real data options
    data_cfg = data.DataConfig(**{name: getattr(cfg, name) for name in shared})
    try:
        rows = data.read_jsonl(cfg.real, cfg.skip_bad, ("image", "question", "answer"), check_images=True)
        print(f"{cfg.real}: {len(rows)} usable examples")
        common.writable_dir(cfg.data_out, "--data-out")
        generator = ModelGenerator(load_vlm(cfg.generator), cfg.max_steps, root=cfg.data_out)
        judge = ModelJudge(load_vlm(cfg.judge) if cfg.judge else generator.vlm)
        root = os.path.dirname(os.path.abspath(cfg.real))
        for i, r in enumerate(rows):
            r.setdefault("id", str(i))
            r["image"] = os.path.relpath(os.path.join(root, r["image"]), cfg.data_out)
        reasoning, summary, paths = data.assess_and_write(rows, generator, judge, judge, cfg.data_out, data_cfg)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {len(paths)} paths, {len(reasoning)} reasoning and {len(summary)} summary samples to {cfg.data_out}")


def main(argv=None):
    cfg = common.parse_config(AgentsConfig, argv, description="Answer a question about an image with the two agents, "
                              "or write paths and SFT sets for a real JSONL with a loaded generator and judge.")
    if cfg.real:
        return write_real_sets(cfg)
    if not cfg.image or not cfg.question:
        raise SystemExit("error: pass both --image PATH and --question TEXT (or --real FILE --generator CKPT)")
    reasoning_dir = cfg.reasoning or checkpoint.latest_reasoning_dir(cfg.out)
    summary_dir = cfg.summary or checkpoint.stage_dir(cfg.out, "summary")
    unfinished = [d for d, given in ((reasoning_dir, cfg.reasoning), (summary_dir, cfg.summary))
                  if not given and os.path.isdir(d) and not checkpoint.finished(d)]  # a run's own stages: finished only
    if unfinished:
        raise SystemExit(f"error: {unfinished[0]} is unfinished or out of date (built from a stage rebuilt since): run "
                         f"python train_dpo.py --iters 3 --out {cfg.out} again to build it, or pass a checkpoint")
    try:  # a missing checkpoint or image: a one-line message that names it
        reasoner = ReasoningAgent(load_vlm(reasoning_dir), cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
        summarizer = SummaryAgent(load_vlm(summary_dir), override_margin=cfg.override_margin)
        image = data.load_image(cfg.image, reasoner.vlm.config.vision.image_size)  # (3, H, W)
        [result] = TwoAgentSystem(reasoner, summarizer).answer_batch([cfg.question], image[None])
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted("nothing was written")
    print(f"reasoning agent: {reasoning_dir}\nsummary agent:   {summary_dir}\n")
    print(result["chain"] or "(the reasoning agent wrote no chain)")
    print(f"\nanswer: {result['answer']}")


if __name__ == "__main__":
    main()
