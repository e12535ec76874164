"""agents.py: the two agents on a micro random model, and on crafted replies for malformed chains;
the model-backed generator and judge for real data, and both command lines.

Hermetic: a tiny world and its tokenizer are built in a temp dir; the model is the micro preset
with random weights. Where a test needs a particular reply (a chain without its end tag, a step
cut off, nothing at all), the one generation helper, agents.complete, is replaced by a fake that
returns it, so the parsing and the hand-over between the agents are tested exactly; the real-data
generator and judge get theirs from a fake decoder under complete.
"""

import json
import os
import random
import shutil
import types

import pytest
import torch
from PIL import Image

import agents
import checkpoint
import data
import generate
import model as M


@pytest.fixture(scope="module")
def built_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    data.build_world(str(out), train_scenes=20, val_scenes=2, test_scenes=4, vocab_size=400)
    return str(out)


@pytest.fixture(scope="module")
def vlm(built_world):
    torch.manual_seed(0)
    tok = data.load_tokenizer(built_world)
    cfg = M.get_config("micro", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"])
    model = M.VLM(cfg).eval()
    model.tokenizer = tok
    return model


@pytest.fixture(scope="module")
def rows(built_world):
    return data.read_jsonl(os.path.join(built_world, "test.jsonl"))[:5]


def test_two_agents_answer_on_a_micro_model(vlm, rows, built_world):
    system = agents.TwoAgentSystem(agents.ReasoningAgent(vlm, max_new_tokens=10),
                                   agents.SummaryAgent(vlm, max_new_tokens=4), batch_size=2)
    results = system.answer(rows, built_world)
    assert len(results) == len(rows)
    for r in results:
        assert set(r) == {"chain", "steps", "chain_answer", "answer"}
        assert isinstance(r["chain"], str) and isinstance(r["answer"], str)
        assert isinstance(r["steps"], list)
        assert "<end_of_utterance>" not in r["chain"] + r["answer"]
    # Greedy decoding is reproducible, whatever the batching.
    again = agents.TwoAgentSystem(system.reasoner, system.summarizer, batch_size=5).answer(rows, built_world)
    assert [r["answer"] for r in again] == [r["answer"] for r in results]


class FakeGeneration:
    """Stands in for agents.complete: crafted chains for the reasoning agent, "7" for the rest."""

    def __init__(self, chains):
        self.chains, self.calls = list(chains), []

    def __call__(self, vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1, seed=0,
                 precision="auto"):
        self.calls.append({"prompts": [c[0]["content"] for c in conversations], "images": images,
                           "max_new_tokens": max_new_tokens})
        if conversations[0][0]["content"].endswith(data.REASONING_PROMPT):
            return [self.chains.pop(0) for _ in conversations]
        return ["7"] * len(conversations)


MALFORMED = {
    "missing end tag": "<thoughts>\nCount: red objects at top left, total 2.\nAdd: 2 plus 1 is 3, so the answer is 3.",
    "truncated step": "<thoughts>\nCount: red objects at top left, total 2.\nAdd: 2 pl",
    "empty chain": "",
    "no tags at all": "blue blue blue",
}


def test_malformed_chains_still_get_an_answer(vlm, rows, built_world, monkeypatch):
    fake = FakeGeneration(MALFORMED.values())
    monkeypatch.setattr(agents, "complete", fake)
    summarizer = agents.SummaryAgent(vlm, override_margin=None)  # its answers as decoded (the margin: tests below)
    system = agents.TwoAgentSystem(agents.ReasoningAgent(vlm), summarizer, batch_size=4)
    missing_end, truncated, empty, untagged = system.answer(rows[:4], built_world)

    assert [s["title"] for s in missing_end["steps"]] == ["Count", "Add"]
    assert missing_end["chain_answer"] == "3"
    assert len(truncated["steps"]) == 2 and truncated["steps"][1]["content"] == "2 pl"
    assert truncated["chain_answer"] is None
    assert empty["steps"] == [] and empty["chain_answer"] is None
    assert untagged["steps"] == [{"title": "", "content": "blue blue blue"}]
    assert all(r["answer"] == "7" for r in (missing_end, truncated, empty, untagged))

    # The summary agent sees each chain re-rendered in its training format, end tag included.
    summary_prompts = fake.calls[1]["prompts"]
    assert data.render_chain(missing_end["steps"]) in summary_prompts[0]
    assert "<thoughts>\n</thoughts>" in summary_prompts[2]
    assert all(p.count("</thoughts>") == 1 and p.endswith(data.SUMMARY_PROMPT) for p in summary_prompts)


def test_one_generate_call_per_batch_per_agent_and_each_image_read_once(vlm, rows, built_world, monkeypatch):
    fake = FakeGeneration(["<thoughts>\nLook: a red circle, so the answer is red.\n</thoughts>"] * len(rows))
    monkeypatch.setattr(agents, "complete", fake)
    reads = []
    load_image = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path, size: reads.append(path) or load_image(path, size))
    system = agents.TwoAgentSystem(agents.ReasoningAgent(vlm), agents.SummaryAgent(vlm), batch_size=2)
    results = system.answer(rows, built_world)

    assert len(fake.calls) == 2 * 3  # 5 questions in batches of 2 -> 3 batches, one call per agent
    assert sorted(reads) == sorted(os.path.join(built_world, r["image"]) for r in rows)
    for reasoning_call, summary_call in zip(fake.calls[::2], fake.calls[1::2]):
        assert summary_call["images"] is reasoning_call["images"]  # the same tensor serves both agents
        assert reasoning_call["images"].shape[1:] == (3, 32, 32)
    assert [r["chain_answer"] for r in results] == ["red"] * len(rows)


def test_single_model_arms(vlm, rows, built_world, monkeypatch):
    replies = ["<thoughts>\nCount: red objects at top left, total 2, so the answer is 2.\n</thoughts>\n2",
               "<thoughts>\nCount: red objects at top left, total",  # cut off inside the chain
               "4"]
    calls = []

    def fake(vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1, seed=0,
             precision="auto"):
        calls.append((conversations[0][0]["content"], max_new_tokens))
        return replies[:len(conversations)]

    monkeypatch.setattr(agents, "complete", fake)
    vanilla = agents.answer_direct(vlm, rows[:3], built_world, task="vanilla")
    assert vanilla[0] == {"chain": replies[0], "steps": [{"title": "Count", "content": "red objects at top left, total 2, so the answer is 2."}],
                          "chain_answer": "2", "answer": "2"}
    assert vanilla[1]["answer"] == "" and vanilla[1]["chain_answer"] is None
    assert calls[-1][0].endswith(data.VANILLA_PROMPT) and calls[-1][1] == agents.CHAIN_TOKENS + agents.ANSWER_TOKENS

    for task in ("direct", "summary_only"):
        direct = agents.answer_direct(vlm, rows[:3], built_world, task=task)
        assert direct[2] == {"chain": None, "steps": None, "chain_answer": None, "answer": "4"}
        assert calls[-1][0].endswith(data.DIRECT_PROMPT) and calls[-1][1] == agents.ANSWER_TOKENS
    with pytest.raises(ValueError, match="unknown single-model task"):
        agents.answer_direct(vlm, rows, built_world, task="reasoning")


def test_latest_reasoning_agent(tmp_path):
    assert checkpoint.latest_reasoning_dir(str(tmp_path)) == os.path.join(str(tmp_path), "reasoning")
    for name in ("reasoning_dpo1", "reasoning_dpo2", "reasoning_dpo10", "reasoning_dpo11"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        if name != "reasoning_dpo11":  # a round interrupted after its weights, before its marker
            (tmp_path / name / checkpoint.ROUND_DONE).write_text("{}")
    assert checkpoint.latest_reasoning_dir(str(tmp_path)) == os.path.join(str(tmp_path), "reasoning_dpo10")
    assert list(checkpoint.dpo_rounds(str(tmp_path))) == [1, 2, 10]
    assert list(checkpoint.dpo_rounds(str(tmp_path), last=2)) == [1, 2]  # train_dpo.py --iters 2


def test_cli_takes_a_runs_own_stages_only_when_finished(vlm, rows, built_world, tmp_path, capsys):
    out = tmp_path / "run"
    for stage in ("reasoning", "summary"):
        vlm.save_pretrained(str(out / stage))
    (out / "summary" / checkpoint.STAGE_DONE).write_text("{}")  # the reasoning stage was interrupted: no marker
    argv = ["--out", str(out), "--image", os.path.join(built_world, rows[0]["image"]), "--question", rows[0]["question"],
            "--max-new-tokens", "4"]
    with pytest.raises(SystemExit, match=f"^error: {out / 'reasoning'} is unfinished or out of date"):
        agents.main(argv)
    (out / "reasoning" / checkpoint.STAGE_DONE).write_text("{}")
    agents.main(argv)
    assert f"reasoning agent: {out / 'reasoning'}" in capsys.readouterr().out


def test_cli(vlm, rows, built_world, tmp_path, capsys, monkeypatch):
    ckpt = str(tmp_path / "agent")
    vlm.save_pretrained(ckpt)
    image = os.path.join(built_world, rows[0]["image"])
    agents.main(["--image", image, "--question", rows[0]["question"], "--reasoning", ckpt, "--summary", ckpt,
                 "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert f"reasoning agent: {ckpt}" in out and "\nanswer: " in out
    margins = []
    monkeypatch.setattr(agents.SummaryAgent, "summarize", lambda self, *a: margins.append(self.override_margin) or ["x"])
    for flag, margin in (([], agents.OVERRIDE_MARGIN), (["--override-margin=-inf"], float("-inf"))):
        agents.main(["--image", image, "--question", "q", "--reasoning", ckpt, "--summary", ckpt,
                     "--max-new-tokens", "2", *flag])
    assert margins == [agents.OVERRIDE_MARGIN, float("-inf")]  # the flag reaches the summary agent

    with pytest.raises(SystemExit, match=r"^error: no checkpoint at .*reasoning"):
        agents.main(["--image", image, "--question", "q", "--out", str(tmp_path / "nothing")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="^error: cannot read image"):
        agents.main(["--image", str(bad), "--question", "q", "--reasoning", ckpt, "--summary", ckpt])
    with pytest.raises(SystemExit, match="^error: pass both"):
        agents.main(["--image", image])


def test_cli_on_an_idefics3_checkpoint_and_a_photo_of_any_size_and_mode(built_world, tmp_path, capsys):
    # A published SmolVLM directory as a user downloads it: transformers' config.json and safetensors, the tokenizer
    # beside them; here tiny and random. Photos: odd sizes, with alpha, a palette, CMYK, 16-bit grey.
    transformers = pytest.importorskip("transformers")
    tok = data.load_tokenizer(built_world)
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
        scale_factor=2, image_token_id=data.special_ids(tok)["image"])
    torch.manual_seed(0)
    ckpt = tmp_path / "smolvlm"
    transformers.Idefics3ForConditionalGeneration(config).save_pretrained(ckpt)
    tok.save(str(ckpt / "tokenizer.json"))
    rgb = (torch.arange(57 * 31 * 3) % 251).to(torch.uint8).view(31, 57, 3).numpy()
    photos = {"photo.png": Image.fromarray(rgb).convert("RGBA"), "palette.png": Image.fromarray(rgb).convert("P"),
              "photo.jpg": Image.fromarray(rgb).convert("CMYK"),
              "grey16.png": Image.fromarray((torch.arange(40 * 20) * 80).view(20, 40).numpy().astype("uint16"))}
    for name, im in photos.items():
        im.save(tmp_path / name)
        agents.main(["--reasoning", str(ckpt), "--summary", str(ckpt), "--image", str(tmp_path / name),
                     "--question", "What is in the picture?", "--max-new-tokens", "5"])
        out = capsys.readouterr().out
        assert f"reasoning agent: {ckpt}" in out and "\nanswer: " in out


# ---------------------------------------------------------------------------------------------- real data


class FakeVLM:
    """Just enough of a VLM for complete, under the model-backed generator and judge."""

    def __init__(self, tok):
        self.tokenizer = tok
        self.config = types.SimpleNamespace(tokens_per_image=9, vision=types.SimpleNamespace(image_size=48))

    def parameters(self):
        return iter([torch.zeros(1)])


def fake_generate(monkeypatch, tok, replies):
    """Replace the decoder under agents.complete: each call answers with the next scripted reply."""
    calls = []

    def generate(model, input_ids, pixel_values=None, max_new_tokens=1, stop_ids=(), **kw):
        calls.append((input_ids, pixel_values))
        reply = tok.encode(replies[min(len(calls), len(replies)) - 1]).ids
        return [reply + [stop_ids[0]] for _ in input_ids]
    monkeypatch.setattr(agents, "generate", generate)
    return calls


def test_model_generator_retries_malformed_json_then_ends(built_world, rows, monkeypatch):
    tok = data.load_tokenizer(built_world)
    step = '{"title": "Look", "content": "I see it.", "next_action": "%s"}'
    calls = fake_generate(monkeypatch, tok, ["oops", step % "continue", step % "final_answer", "red"])
    gen = agents.ModelGenerator(FakeVLM(tok), root=built_world, retries=1)
    paths = gen.generate(rows[0], 3, random.Random(0))
    assert len(calls) == 4 and len(calls[0][0]) == 3 and calls[0][1].shape == (3, 3, 48, 48)
    assert all(len(p["steps"]) == 2 and p["final_answer"] == "red" for p in paths)
    assert paths[0]["steps"][1]["next_action"] == "final_answer"
    calls = fake_generate(monkeypatch, tok, ["still not json", "x"])
    paths = gen.generate(rows[0], 2, random.Random(0))
    assert len(calls) == 3 and all(p["steps"] == [] for p in paths)  # 1 try + 1 retry + final


def test_parse_step_json():
    assert agents.parse_step_json(r'Sure! {"title": "Count", "content": "2\nred", "next_action": "final_answer"}') == {
        "title": "Count", "content": "2 red", "next_action": "final_answer"}
    assert agents.parse_step_json('{"content": "x", "next_action": "maybe"}')["next_action"] == "continue"
    assert agents.parse_step_json("no json") is None and agents.parse_step_json('{"title": "x"}') is None


def test_model_judge_scores_all_paths_in_one_call(built_world, monkeypatch):
    tok = data.load_tokenizer(built_world)
    rec = {"question": "Q?", "answer": "3", "image": "x.png"}
    paths = [{"steps": [], "final_answer": "3"}, {"steps": [], "final_answer": "4"}]
    calls = fake_generate(monkeypatch, tok, ["Scores: [80, 20]"])
    judge = agents.ModelJudge(FakeVLM(tok))
    assert judge.score(rec, paths) == [80, 20] and len(calls) == 1 and calls[0][1] is None
    fake_generate(monkeypatch, tok, ["no idea", "no idea", "no idea", "0"])
    assert judge.score(rec, paths) == [100, 1]  # unparseable judge: the coarse verdict
    assert judge.judge(rec, "three")  # exact match needs no model call


def test_real_cli_writes_paths_and_sft_sets(vlm, rows, built_world, tmp_path, capsys):
    ckpt, out, bench = str(tmp_path / "agent"), str(tmp_path / "real"), tmp_path / "bench"
    vlm.save_pretrained(ckpt)
    (bench / "img").mkdir(parents=True)
    lines = []
    for r in rows[:2]:
        shutil.copy(os.path.join(built_world, r["image"]), bench / "img")
        lines.append({"image": "img/" + os.path.basename(r["image"]), "question": r["question"], "answer": r["answer"]})
    lines[1]["choices"] = ["red", lines[1]["answer"]]
    (bench / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    real = str(bench / "bench.jsonl")
    agents.main(["--real", real, "--generator", ckpt, "--data-out", out, "--paths-per-question", "2",
                 "--max-steps", "2"])
    assert "2 usable examples" in capsys.readouterr().out
    paths = data.read_jsonl(os.path.join(out, "paths.jsonl"))
    assert [(p["id"], p["path"]) for p in paths] == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    assert all(1 <= p["score"] <= 100 and len(p["steps"]) <= 2 for p in paths)
    # the generator read every image through its path relative to --data-out, as the SFT rows store it
    assert all(os.path.isfile(os.path.join(out, f"{name}.jsonl")) for name in ("reasoning_sft", "summary_sft"))
    with pytest.raises(SystemExit, match="^error: pass --generator"):
        agents.main(["--real", real])
    with pytest.raises(SystemExit, match=r"^error: no checkpoint at .*missing"):
        agents.main(["--real", real, "--generator", ckpt, "--judge", str(tmp_path / "missing"), "--data-out", out])


def test_help_lists_the_real_data_options_and_no_world_options(capsys):
    with pytest.raises(SystemExit):
        agents.main(["--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--paths-per-question", "--max-steps", "--flawed-per-sound", "--seed"))
    assert not any(flag in text for flag in ("--train-scenes", "--miscount", "--vocab-size", "--min-objects"))


# ---------------------------------------------------------------------------------------------- continuing a prefix

PREFIXES = ["<thoughts>\nCount: red objects at top left, total 1.\n", "<thoughts>\nLook: center is empty.\n"]


def reasoning_batch(rows, built_world, n=2):
    conversations = [data.task_messages("reasoning", r["question"]) for r in rows[:n]]
    images = torch.stack([data.load_image(os.path.join(built_world, r["image"]), 32) for r in rows[:n]])
    return conversations, images


def test_complete_continues_each_prefix_as_greedy_decoding_of_prompt_plus_prefix(vlm, rows, built_world):
    conversations, images = reasoning_batch(rows, built_world)
    texts = agents.complete(vlm, conversations, images, max_new_tokens=6, prefixes=PREFIXES)
    tok, ids = vlm.tokenizer, data.special_ids(vlm.tokenizer)
    for i, (messages, prefix) in enumerate(zip(conversations, PREFIXES)):
        prompt = data.render_conversation(tok, messages, vlm.config.tokens_per_image, add_generation_prompt=True)[0]
        prompt += tok.encode(" " + prefix, add_special_tokens=False).ids  # the assistant text starts " <thoughts>"
        new = generate.generate(vlm, [prompt], images[i:i + 1], max_new_tokens=6, stop_ids=[ids["eou"]],
                              pad_id=ids["pad"])[0]
        assert texts[i] == (prefix + tok.decode([t for t in new if t != ids["eou"]])).strip()
        # The reply's end is stripped: a continuation of newlines only takes the prefix's last newline with it.
        assert texts[i].startswith(prefix.rstrip())
    # An empty prefix is no prefix.
    assert agents.complete(vlm, conversations, images, 6, prefixes=["", ""]) == agents.complete(
        vlm, conversations, images, 6)


def test_complete_samples_start_with_their_own_prompts_prefix(vlm, rows, built_world):
    conversations, images = reasoning_batch(rows, built_world)
    texts = agents.complete(vlm, conversations, images, max_new_tokens=5, temperature=1.0, num_samples=2, seed=3,
                            prefixes=PREFIXES)
    assert len(texts) == 4  # prompt-major: two samples of the first prompt, then two of the second
    assert [t.startswith(PREFIXES[0]) for t in texts] == [True, True, False, False]
    assert [t.startswith(PREFIXES[1]) for t in texts] == [False, False, True, True]


# ----------------------------------------------------------------------------------------------
# The summary agent's answer against the chain's: what it follows, and when it may override

def copies_the_last_step(vlm, conversations, images, max_new_tokens, temperature=0.0, top_p=None, num_samples=1,
                         seed=0, precision="auto"):
    """A summary model stub: answers with what the chain in its prompt concludes."""
    return [data.chain_answer(c[0]["content"].split(data.SUMMARY_PROMPT)[0]) or "" for c in conversations]


def test_a_summary_stub_that_copies_the_last_step_gives_the_chains_answer(vlm, rows, built_world, monkeypatch):
    chains = ["<thoughts>\nScan: a red circle at top left.\nLook: top right has a small green square, so the answer is "
              "square.\n</thoughts>", "<thoughts>\nCount: circles at center, total 2.\nAdd: 2 plus 1 is 3, so the "
              "answer is 3.\n</thoughts>"]
    monkeypatch.setattr(agents, "complete", lambda vlm, conversations, *a, **kw: (
        [chains.pop(0) for _ in conversations] if conversations[0][0]["content"].endswith(data.REASONING_PROMPT)
        else copies_the_last_step(vlm, conversations, *a, **kw)))
    system = agents.TwoAgentSystem(agents.ReasoningAgent(vlm), agents.SummaryAgent(vlm), batch_size=2)
    results = system.answer(rows[:2], built_world)
    assert [r["answer"] for r in results] == [r["chain_answer"] for r in results] == ["square", "3"]


@pytest.mark.parametrize("margin, expected", [(None, ["Circle.", "4", "blue"]),  # the decoded answers, as the paper
                                              (0.5, ["Circle.", "3", "blue"]),  # prefers its own by 1.0, 0.2 nats
                                              (2.0, ["square", "3", "blue"])])  # the chain's, unless 2 nats surer
def test_the_summary_agent_overrides_a_chain_only_by_the_margin(vlm, rows, built_world, monkeypatch, margin, expected):
    chains = [[{"title": "Look", "content": "top right has a small green square, so the answer is square."}],
              [{"title": "Add", "content": "2 plus 1 is 3, so the answer is 3."}],
              [{"title": "Look", "content": "something blue"}]]  # no stated answer: nothing to weigh it against
    monkeypatch.setattr(agents, "complete", lambda *a, **kw: ["Circle.", "4", "blue"])
    scored = []

    def logps(vlm, conversations, replies, images):  # own answers: -1.0 and -2.0; the chains': -2.0 and -2.2
        scored.append(replies)
        table = {"Circle.": -1.0, "4": -2.0, "square": -2.0, "3": -2.2}
        return torch.tensor([table[r] for r in replies])
    monkeypatch.setattr(agents, "reply_logps", logps)
    images = torch.zeros(3, 3, 32, 32)
    answers = agents.SummaryAgent(vlm, override_margin=margin).summarize(["q1", "q2", "q3"], chains, images)
    assert answers == expected
    assert scored == ([] if margin is None else [["Circle.", "4", "square", "3"]])  # only the departures, one call


def test_reply_logps_sum_the_reply_tokens_whatever_the_batch(vlm, rows, built_world):
    images = torch.stack([data.load_image(os.path.join(built_world, r["image"]), 32) for r in rows[:3]])
    conversations = [data.task_messages("summary", r["question"], "<thoughts>\n</thoughts>") for r in rows[:3]]
    replies = ["red", "3", "a large blue square"]
    together = agents.reply_logps(vlm, conversations, replies, images)
    for i in range(3):
        ids, mask = data.render_conversation(vlm.tokenizer, conversations[i] + [{"role": "assistant",
                                                                                 "content": replies[i]}],
                                                vlm.config.tokens_per_image)
        with torch.no_grad():
            logits, _ = vlm(torch.tensor([ids]), images[i:i + 1])
        logp = logits[0, :-1].log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert together[i].item() == pytest.approx((logp * torch.tensor(mask[1:])).sum().item(), abs=1e-4)
        assert sum(mask) >= 2  # the reply's tokens and its end token
