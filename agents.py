"""The two agents of Insight-V, and how they answer questions together.

Insight-V (Dong et al. 2024, arXiv 2411.14432, Sec. 3.2) splits visual reasoning between two models
fine-tuned from one base MLLM:
  - the reasoning agent reads the image and the question and writes only a long structured chain,
    `<thoughts>` ... `</thoughts>` with one `Title: content` line per step (the official code's
    format; data.render_chain writes it, data.parse_chain reads it back);
  - the summary agent reads the image, the question and that chain, judges silently whether the
    chain is sound, and gives a short final answer: from the chain when it is right, from the image
    directly when it is not. Its training set holds flawed chains on purpose (data.py), so a wrong
    chain need not mean a wrong answer.
The prompts of both agents (and of the single-model arms) are defined once, in data.task_messages.

Small models write untidy chains: the end tag may be missing, the last step cut off by the token
limit, or nothing written at all. data.parse_chain keeps every line it can read as a step, and the
summary agent always gets a chain in exactly the format it was trained on (the parsed steps
rendered again, possibly with no steps), so it can still answer.

Decoding: the paper samples the reasoning agent at temperature 0.2-0.7 and the summary agent at
0.2. Our default is greedy for both: evaluation then gives the same numbers on every run and every
machine, which a table with confidence intervals needs. `temperature` turns sampling back on.

Reading order: the one batched-generation helper every caller uses, the agents, the two-agent
system, the single-model arms (direct answer, summary agent without chains, vanilla), the CLI.

    python agents.py --image out/data/images/test-00000.png --question "How many circles and triangles are there in total?"
"""

import glob
import os
import re
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import train_sft
from generate import generate
from model import VLM, parse_config

# Token budgets. A chain of the synthetic world is under 100 tokens (data.py's card.json reports the
# longest); the margin leaves room for longer chains on real data. An answer is a word or a number,
# a real benchmark's answer a short phrase.
CHAIN_TOKENS = 256
ANSWER_TOKENS = 32


# ----------------------------------------------------------------------------------------------
# One batched generation helper: every agent and every arm decodes through it.


def complete(vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1, seed=0):
    """The assistant's reply to each conversation, all decoded in one batched call -> list[str].

    conversations[i] is a message list from data.task_messages (no assistant turn); images is
    (B, 3, H, W), images[i] the image of conversation i. Rows are prompt-major when num_samples > 1.
    Decoding stops at <end_of_utterance>, which is cut from the text.
    """
    tok = vlm.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer: load a checkpoint saved with its tokenizer.json")
    ids = data.special_ids(tok)
    prompts = [data.render_conversation(tok, messages, vlm.config.tokens_per_image, add_generation_prompt=True)[0]
               for messages in conversations]
    device = next(vlm.parameters()).device
    new = generate(vlm, prompts, images.to(device), max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, num_samples=num_samples, stop_ids=[ids["eou"]], seed=seed, pad_id=ids["pad"],
                   dtype=torch.bfloat16 if device.type == "cuda" else None)
    return [tok.decode([t for t in row if t != ids["eou"]]).strip() for row in new]


def batches(rows, image_root, image_size, batch_size, desc=None):
    """(rows, images (B, 3, H, W)) batch by batch; each image is read once, with a progress bar."""
    bar = tqdm(total=len(rows), desc=desc, unit="q", leave=False, disable=desc is None)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images = torch.stack([data.load_image(os.path.join(image_root, r["image"]), image_size) for r in batch])
        yield batch, images
        bar.update(len(batch))
    bar.close()


def read_chain(text):
    """A reasoning agent's reply -> {chain, steps, chain_answer}, whatever state the chain is in."""
    steps = data.parse_chain(text)
    return {"chain": text, "steps": steps, "chain_answer": data.chain_answer(steps)}


# ----------------------------------------------------------------------------------------------
# The two agents


class ReasoningAgent:
    """Image + question + the reasoning instruction -> a chain of steps, and no answer of its own."""

    def __init__(self, vlm, max_new_tokens=CHAIN_TOKENS, temperature=0.0, top_p=None, seed=0):
        self.vlm, self.max_new_tokens, self.temperature, self.top_p, self.seed = vlm, max_new_tokens, temperature, top_p, seed

    def reason(self, questions, images):  # images (B, 3, H, W) -> [{chain, steps, chain_answer}]
        texts = complete(self.vlm, [data.task_messages("reasoning", q) for q in questions], images,
                         self.max_new_tokens, self.temperature, self.top_p, seed=self.seed)
        return [read_chain(t) for t in texts]


class SummaryAgent:
    """Image + question + a chain -> a short final answer (from the chain if it is sound, else directly)."""

    def __init__(self, vlm, max_new_tokens=ANSWER_TOKENS, temperature=0.0, top_p=None, seed=0):
        self.vlm, self.max_new_tokens, self.temperature, self.top_p, self.seed = vlm, max_new_tokens, temperature, top_p, seed

    def summarize(self, questions, steps, images):  # steps: one list of steps per question -> [answer]
        # Rendered again from the parsed steps: a chain without its end tag or with a half-written
        # last step reaches the summary agent in the exact format of its training data.
        messages = [data.task_messages("summary", q, data.render_chain(s)) for q, s in zip(questions, steps)]
        return complete(self.vlm, messages, images, self.max_new_tokens, self.temperature, self.top_p, seed=self.seed)


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
                for result in self.answer_batch([data.format_question(r) for r in batch], images)]

    def answer_batch(self, questions, images):  # images (B, 3, H, W), each used by both agents
        chains = self.reasoner.reason(questions, images)
        answers = self.summarizer.summarize(questions, [c["steps"] for c in chains], images)
        return [{**c, "answer": a} for c, a in zip(chains, answers)]


# ----------------------------------------------------------------------------------------------
# Single-model arms of the paper's ablation (Table 5): one model answers each question alone.
#   direct        the base model answers at once (the paper's "base model" row)
#   summary_only  the summary agent trained without chains answers at once
#   vanilla       one model writes the chain and then the answer in one reply


def read_vanilla(text):
    """A vanilla reply (chain, then the answer after its end tag) -> {chain, steps, chain_answer, answer}.
    A reply cut off inside its chain gave no answer (data.response_answer)."""
    return {**read_chain(text), "answer": data.response_answer(text)}


def answer_direct(vlm, rows, image_root, task="direct", batch_size=64, max_new_tokens=None, temperature=0.0, desc=None):
    """One model answers every row on its own -> [{chain, steps, chain_answer, answer}].

    task: "direct" or "summary_only" (a short answer; no chain, so chain fields are None), or
    "vanilla" (chain then answer in one reply; max_new_tokens covers both).
    """
    if task not in ("direct", "summary_only", "vanilla"):
        raise ValueError(f"unknown single-model task {task!r}: choose direct, summary_only or vanilla")
    if max_new_tokens is None:
        max_new_tokens = CHAIN_TOKENS + ANSWER_TOKENS if task == "vanilla" else ANSWER_TOKENS
    results = []
    for batch, images in batches(rows, image_root, vlm.config.vision.image_size, batch_size, desc):
        questions = [data.format_question(r) for r in batch]  # with lettered options for multiple choice
        texts = complete(vlm, [data.task_messages(task, q) for q in questions], images, max_new_tokens, temperature)
        no_chain = {"chain": None, "steps": None, "chain_answer": None}
        results += [read_vanilla(t) if task == "vanilla" else {**no_chain, "answer": t} for t in texts]
    return results


# ----------------------------------------------------------------------------------------------
# Loading checkpoints, and the CLI for one image


def load_vlm(path, device=None):
    """A checkpoint directory -> VLM in eval mode on the device, with a clear error when it is not there."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {path}: train it first (python train_dpo.py --iters 3 builds every stage)")
    vlm = VLM.from_pretrained(path)
    if vlm.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: save the checkpoint together with its tokenizer")
    return vlm.to(device or train_sft.resolve_device("auto")).eval()


def dpo_rounds(out_dir):
    """The reasoning agents saved by train_dpo.py's rounds -> {round t: checkpoint dir}, in order."""
    rounds = {}
    for path in glob.glob(os.path.join(out_dir, "reasoning_dpo*")):
        match = re.fullmatch(r"reasoning_dpo(\d+)", os.path.basename(path))
        if match and os.path.isfile(os.path.join(path, "config.json")):
            rounds[int(match.group(1))] = path
    return dict(sorted(rounds.items()))


def latest_reasoning_dir(out_dir):
    """The last reasoning agent a run produced: its last DPO round if any, else the SFT one."""
    rounds = dpo_rounds(out_dir)
    return rounds[max(rounds)] if rounds else train_sft.stage_dir(out_dir, "reasoning")


@dataclass
class AgentsConfig:
    image: str = field(default=None, metadata={"help": "image file (png, jpg, ...)"})
    question: str = field(default=None, metadata={"help": "the question about the image"})
    out: str = field(default="out", metadata={"help": "the run directory whose agents are used by default"})
    reasoning: str = field(default=None, metadata={"help": "reasoning agent checkpoint (default: the last DPO round in --out, else its SFT agent)"})
    summary: str = field(default=None, metadata={"help": "summary agent checkpoint (default: the summary agent in --out)"})
    max_new_tokens: int = field(default=CHAIN_TOKENS, metadata={"help": "token limit of the chain"})
    temperature: float = field(default=0.0, metadata={"help": "reasoning agent temperature; 0 = greedy (the paper: 0.2-0.7)"})
    seed: int = field(default=0, metadata={"help": "random seed when sampling"})


def main(argv=None):
    cfg = parse_config(AgentsConfig, argv, description="Answer a question about an image with the two agents.")
    if not cfg.image or not cfg.question:
        raise SystemExit("error: pass both --image PATH and --question TEXT")
    reasoning_dir = cfg.reasoning or latest_reasoning_dir(cfg.out)
    summary_dir = cfg.summary or train_sft.stage_dir(cfg.out, "summary")
    try:
        reasoner = ReasoningAgent(load_vlm(reasoning_dir), cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
        summarizer = SummaryAgent(load_vlm(summary_dir))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    try:
        image = data.load_image(cfg.image, reasoner.vlm.config.vision.image_size)  # (3, H, W)
    except (OSError, ValueError) as e:  # data.load_image's message names the file
        raise SystemExit(f"error: {e}")
    [result] = TwoAgentSystem(reasoner, summarizer).answer_batch([cfg.question], image[None])
    print(f"reasoning agent: {reasoning_dir}\nsummary agent:   {summary_dir}\n")
    print(result["chain"] or "(the reasoning agent wrote no chain)")
    print(f"\nanswer: {result['answer']}")


if __name__ == "__main__":
    main()
