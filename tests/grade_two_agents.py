"""Graded tests of the assignment two_agents (agents.py: ReasoningAgent.reason, SummaryAgent.summarize,
TwoAgentSystem.answer_batch, TwoAgentSystem.answer).

No model runs: agents.complete, the one generation helper every agent decodes through, is replaced by a fake that
records each call and replies from a script (a chain for each reasoning prompt, an answer for each summary prompt),
and agents.reply_logps by a table of log-probs. So what is checked is the hand-over itself: which prompts each agent
sends, in how many calls, with which images and options, and what comes back.
"""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import agents
import data

STUB = SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(image_size=8)))  # what the agents read of a model
CHAINS = {  # question -> the reasoning agent's reply
    "q0": "<thoughts>\nCount: red objects at top left, total 2.\nAdd: 2 plus 1 is 3, so the answer is 3.\n</thoughts>",
    "q1": "<thoughts>\nLook: top right has a small green square, so the answer is green.",  # no end tag
    "q2": "",  # nothing at all
    "q3": "<thoughts>\nLook: a blue circle at center, so the answer is blue.\n</thoughts>",
    "q4\nA. red\nB. blue": "<thoughts>\nLook: center has a blue square, so the answer is B.\n</thoughts>",
}


class FakeComplete:
    """Stands in for agents.complete: each reasoning prompt gets its question's chain, each summary prompt the
    answer "answer to <question>"; every call is recorded."""

    def __init__(self):
        self.calls = []

    def __call__(self, vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1, seed=0,
                 precision="auto", prefixes=None):
        self.calls.append({"vlm": vlm, "conversations": conversations, "images": images, "options": dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, precision=precision)})
        texts = [c[0]["content"] for c in conversations]
        if texts[0].endswith(data.REASONING_PROMPT):
            return [CHAINS[t.removesuffix("\n" + data.REASONING_PROMPT)] for t in texts]
        return ["answer to " + t.split("\n<thoughts>")[0] for t in texts]


@pytest.fixture
def fake(monkeypatch):
    fake = FakeComplete()
    monkeypatch.setattr(agents, "complete", fake)
    return fake


def images(n):
    """(n, 3, 8, 8): image i is all i, so where each one went can be read back."""
    return torch.arange(float(n))[:, None, None, None].expand(n, 3, 8, 8).clone()


def test_the_reasoning_agent_sends_one_batched_call(fake):
    agent = agents.ReasoningAgent(STUB, max_new_tokens=7, temperature=0.3, top_p=0.9, seed=5, precision="fp32")
    pictures = images(2)
    results = agent.reason(["q0", "q1"], pictures)
    [call] = fake.calls
    assert call["vlm"] is STUB and call["images"] is pictures
    assert call["conversations"] == [data.task_messages("reasoning", q) for q in ("q0", "q1")]
    assert call["options"] == dict(max_new_tokens=7, temperature=0.3, top_p=0.9, seed=5, precision="fp32")
    assert results == [agents.read_chain(CHAINS["q0"]), agents.read_chain(CHAINS["q1"])]
    assert results[0]["chain_answer"] == "3" and results[1]["steps"][0]["title"] == "Look"


def test_the_summary_agent_sees_each_chain_in_its_training_format(fake):
    steps = [data.parse_chain(CHAINS[q]) for q in ("q0", "q1", "q2")]  # q1's lacks its end tag, q2 has no step
    agent = agents.SummaryAgent(STUB, max_new_tokens=3, seed=2, override_margin=None)
    pictures = images(3)
    answers = agent.summarize(["q0", "q1", "q2"], steps, pictures)
    [call] = fake.calls
    assert call["conversations"] == [data.task_messages("summary", q, data.render_chain(s))
                                     for q, s in zip(("q0", "q1", "q2"), steps)]
    assert "<thoughts>\n</thoughts>" in call["conversations"][2][0]["content"]
    assert call["images"] is pictures and call["options"]["max_new_tokens"] == 3 and call["options"]["seed"] == 2
    assert answers == ["answer to q0", "answer to q1", "answer to q2"]


@pytest.mark.parametrize("margin, expected", [(None, ["Circle.", "4", "blue"]),  # the decoded answers, as the paper
                                              (0.5, ["Circle.", "3", "blue"]),  # it prefers its own by 1.0, 0.2 nats
                                              (2.0, ["square", "3", "blue"])])  # the chain's, unless 2 nats surer
def test_the_summary_agent_overrides_a_chain_only_by_the_margin(monkeypatch, margin, expected):
    steps = [[{"title": "Look", "content": "top right has a small green square, so the answer is square."}],
             [{"title": "Add", "content": "2 plus 1 is 3, so the answer is 3."}],
             [{"title": "Look", "content": "something blue"}]]  # no stated answer: nothing to weigh it against
    monkeypatch.setattr(agents, "complete", lambda *a, **kw: ["Circle.", "4", "blue"])
    scored = []

    def reply_logps(vlm, conversations, replies, pictures):  # own answers -1.0 and -2.0; the chains' -2.0 and -2.2
        for conversation, reply, picture in zip(conversations, replies, pictures):
            question = conversation[0]["content"].split("\n")[0]
            assert picture[0, 0, 0].item() == int(question[1]), "each reply is scored with its question's image"
            scored.append(reply)
        return torch.tensor([{"Circle.": -1.0, "4": -2.0, "square": -2.0, "3": -2.2}[r] for r in replies])
    monkeypatch.setattr(agents, "reply_logps", reply_logps)
    answers = agents.SummaryAgent(STUB, override_margin=margin).summarize(["q0", "q1", "q2"], steps, images(3))
    assert answers == expected
    assert sorted(scored) == ([] if margin is None else sorted(["Circle.", "4", "square", "3"]))  # departures only


def test_answer_batch_hands_each_chain_to_the_summary_agent(fake):
    system = agents.TwoAgentSystem(agents.ReasoningAgent(STUB), agents.SummaryAgent(STUB, override_margin=None))
    pictures = images(3)
    results = system.answer_batch(["q0", "q1", "q2"], pictures)
    reasoning, summary = fake.calls
    assert reasoning["conversations"][0][0]["content"].endswith(data.REASONING_PROMPT)
    assert summary["images"] is pictures  # the summary agent looks at the same pictures
    for q, r, conversation in zip(("q0", "q1", "q2"), results, summary["conversations"]):
        assert r == {**agents.read_chain(CHAINS[q]), "answer": f"answer to {q}"}
        assert conversation == data.task_messages("summary", q, data.render_chain(r["steps"]))


def test_answer_goes_batch_by_batch_in_order(fake, tmp_path):
    rows = [{"image": f"{i}.png", "question": f"q{i}"} for i in range(4)]
    rows.append({"image": "4.png", "question": "q4", "choices": ["red", "blue"]})
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    system = agents.TwoAgentSystem(agents.ReasoningAgent(STUB), agents.SummaryAgent(STUB, override_margin=None),
                                   batch_size=2)
    results = system.answer(rows, str(tmp_path))
    assert len(fake.calls) == 2 * 3  # 5 questions in batches of 2: 3 batches, one call per agent each
    assert [len(c["conversations"]) for c in fake.calls] == [2, 2, 2, 2, 1, 1]
    for reasoning, summary in zip(fake.calls[::2], fake.calls[1::2]):
        assert torch.equal(reasoning["images"], summary["images"]) and reasoning["images"].shape[1:] == (3, 8, 8)
    first = data.load_image(str(tmp_path / "0.png"), 8)
    assert torch.equal(fake.calls[0]["images"][0], first)
    questions = [agents.format_question(r) for r in rows]  # q4 with its lettered options
    assert [r["answer"] for r in results] == [f"answer to {q}" for q in questions]
    assert results[4]["chain_answer"] == "B"
