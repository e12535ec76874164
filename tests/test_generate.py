"""generate.py: the KV-cached engine against decoding without a cache and against transformers.

Hermetic and fast: micro random models in fp32, built in the test. A freshly initialised model
(small weights, tied head) just repeats its last token, which would make every comparison pass
trivially, so the test model gets large random weights and an untied head: its greedy output
wanders over the whole vocabulary.
"""

import pytest
import torch
from PIL import Image

import data
import generate as G
import model as M
from generate import generate, sample_next_token

NEW = 12  # new tokens per test generation


def scramble(module, seed):
    """Unit-variance random weights: logits far apart, outputs that change at every step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                is_table = "embed" in name and "patch" not in name  # token / position tables
                std = 1.0 if is_table else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


@pytest.fixture(scope="module")
def vlm():
    return scramble(M.VLM(M.get_config("micro", tie_word_embeddings=False)), seed=0)


def prompt(vlm, n_text, seed, image=False):
    """Random text tokens, with one image's placeholders in the middle."""
    cfg = vlm.config
    assert cfg.image_token_id < 4  # so the random text never holds a placeholder
    ids = torch.randint(4, cfg.text.vocab_size, (n_text,), generator=torch.Generator().manual_seed(seed)).tolist()
    if image:
        ids[n_text // 2:n_text // 2] = [cfg.image_token_id] * cfg.tokens_per_image
    return ids


def images(vlm, n, seed):
    size = vlm.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def greedy_without_cache(vlm, ids, pixel_values, n):
    """The reference: recompute the whole sequence for every new token and take the argmax."""
    ids, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = vlm(ids, pixel_values=pixel_values)
            out.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


# ---------------------------------------------------------------------------------------------
# The sampler


def test_sampler_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits), logits.argmax(-1))


def support(logits, n=4000, **kwargs):
    """The set of tokens the sampler ever picks from one row of logits, over n draws."""
    g = torch.Generator().manual_seed(0)
    return set(sample_next_token(logits.expand(n, -1), generator=g, **kwargs).tolist())


def test_sampler_top_k_keeps_the_k_best():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, 2.5, 0.0]])
    assert support(logits, temperature=1.0, top_k=3) == {1, 3, 4}
    assert support(logits, temperature=1.0, top_k=1) == {1}
    assert support(logits, temperature=1.0) == set(range(6))


def test_sampler_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    assert support(logits, temperature=1.0, top_p=0.45) == {1}  # the best token alone reaches 0.45
    assert support(logits, temperature=1.0, top_p=0.75) == {1, 3}  # 0.5 + 0.3 reaches 0.75
    assert support(logits, temperature=1.0, top_p=0.9) == {1, 3, 2}
    assert support(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}


def test_sampler_temperature_comes_before_top_p():
    # At temperature 1 the best token holds 0.5 < 0.6, so the nucleus has two tokens; at a low
    # temperature the best token alone holds almost all the mass. Cutting before dividing would
    # keep two tokens in both cases.
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert support(logits, temperature=1.0, top_p=0.6) == {1, 3}
    assert support(logits, temperature=0.2, top_p=0.6) == {1}


# ---------------------------------------------------------------------------------------------
# Greedy decoding is exact


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_equals_decoding_without_cache(vlm, with_image):
    ids = prompt(vlm, 9, seed=1, image=with_image)
    pixels = images(vlm, 1, seed=1) if with_image else None
    assert generate(vlm, [ids], pixels, max_new_tokens=NEW) == [greedy_without_cache(vlm, ids, pixels, NEW)]


def test_batch_of_different_lengths_equals_each_prompt_alone(vlm):
    prompts = [prompt(vlm, n, seed=n, image=True) for n in (3, 11, 6)]
    pixels = images(vlm, 3, seed=2)
    alone = [generate(vlm, [p], pixels[i:i + 1], max_new_tokens=NEW)[0] for i, p in enumerate(prompts)]
    assert generate(vlm, prompts, pixels, max_new_tokens=NEW) == alone
    # the same batch as a left-padded tensor with its attention mask
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    assert generate(vlm, ids, pixels, max_new_tokens=NEW, attention_mask=mask) == alone


def test_right_padding_is_refused(vlm):
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(vlm, torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_num_samples_rows_are_prompt_major(vlm):
    prompts = [prompt(vlm, n, seed=10 + n) for n in (4, 7)]
    single = generate(vlm, prompts, max_new_tokens=NEW)
    assert generate(vlm, prompts, max_new_tokens=NEW, num_samples=3) == [single[0]] * 3 + [single[1]] * 3
    # top-k = 1 leaves nothing to chance: every sample is the greedy answer, at any temperature
    sampled = generate(vlm, prompts, max_new_tokens=NEW, num_samples=3, temperature=1.5, top_k=1, seed=0)
    assert sampled == [single[0]] * 3 + [single[1]] * 3


def test_equals_transformers_greedy_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=10000.0, pad_token_id=0, bos_token_id=None, eos_token_id=None),
        scale_factor=2, image_token_id=100)
    hf = scramble(transformers.Idefics3ForConditionalGeneration(config), seed=1)
    hf.generation_config.eos_token_id = None  # run every row to max_new_tokens
    hf.save_pretrained(tmp_path)
    ours = M.VLM.from_pretrained(str(tmp_path)).eval()
    assert ours.config.tokens_per_image == 4

    # two prompts of different lengths, one image each, left-padded for transformers
    prompts = [[5, 6, 7] + [100] * 4 + [8, 9], [10] + [100] * 4 + [11, 12, 13, 14, 15, 16]]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, None],
                               max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, T:].tolist()
    assert all(len(row) == NEW for row in expected)
    assert generate(ours, prompts, pixels, max_new_tokens=NEW) == expected


# ---------------------------------------------------------------------------------------------
# Sampling, seeds and stopping


def test_same_seed_same_samples_different_seed_different(vlm):
    prompts = [prompt(vlm, 5, seed=20), prompt(vlm, 8, seed=21, image=True)]
    pixels = images(vlm, 1, seed=4)
    run = lambda seed: generate(vlm, prompts, pixels, max_new_tokens=NEW, temperature=1.0, top_p=0.95,
                                num_samples=4, seed=seed)
    first = run(0)
    assert run(0) == first
    assert run(1) != first
    # every sample draws its own first token: the four samples of a prompt are not copies
    assert len({tuple(row) for row in first[:4]}) > 1


def test_stop_ids_end_each_row(vlm, monkeypatch):
    prompts = [prompt(vlm, n, seed=30 + n) for n in (3, 4, 5, 6, 7, 8)]
    full = generate(vlm, prompts, max_new_tokens=NEW)
    # stop at tokens that rows reach at different steps, so rows finish at different times
    stop_ids = {full[0][2], full[1][5], full[2][8]}
    drops = []
    select = M.KVCache.select
    monkeypatch.setattr(M.KVCache, "select", lambda cache, rows: drops.append(len(rows)) or select(cache, rows))
    stopped = generate(vlm, prompts, max_new_tokens=NEW, stop_ids=stop_ids)
    for row, whole in zip(stopped, full):
        end = next((i + 1 for i, t in enumerate(whole) if t in stop_ids), NEW)
        assert row == whole[:end]  # cut right after the first stop id, which is kept
    assert drops, "finished rows were never dropped from the batch"


def test_stop_ids_with_sampling(vlm):
    rows = generate(vlm, [prompt(vlm, 6, seed=40)], max_new_tokens=NEW, temperature=1.0, num_samples=16, seed=0,
                    stop_ids=range(0, 256, 3))
    assert any(len(row) < NEW for row in rows)
    for row in rows:
        assert all(t % 3 for t in row[:-1])  # no stop id before the end
        assert len(row) == NEW or row[-1] % 3 == 0  # a short row ends on a stop id


def test_stream_sees_every_token(vlm):
    seen = {}
    rows = generate(vlm, [prompt(vlm, 4, seed=50), prompt(vlm, 6, seed=51)], max_new_tokens=NEW, temperature=1.0,
                    seed=0, stop_ids=range(0, 256, 5),
                    stream=lambda r, t: [seen.setdefault(i, []).append(x) for i, x in zip(r, t)])
    assert [seen[i] for i in range(2)] == rows


def test_bfloat16_autocast(vlm):
    ids, pixels = prompt(vlm, 9, seed=60, image=True), images(vlm, 1, seed=60)
    fp32 = generate(vlm, [ids], pixels, max_new_tokens=NEW)
    bf16 = generate(vlm, [ids], pixels, max_new_tokens=NEW, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generate(vlm, [ids], pixels, max_new_tokens=NEW) == bf16  # the caller's autocast is picked up
    assert len(bf16[0]) == NEW and bf16[0][0] == fp32[0][0]  # rounding may flip a later near-tie


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro model saved with a throwaway chat tokenizer (nanochat's habit: trained in the test)."""
    tok = data.train_tokenizer(["User: what colour is the circle? Assistant: red"] * 4, vocab_size=300)
    cfg = M.get_config("micro", vocab_size=tok.get_vocab_size(), image_token_id=tok.token_to_id("<image>"),
                       tie_word_embeddings=False)
    vlm = scramble(M.VLM(cfg), seed=2)
    vlm.tokenizer = tok
    path = tmp_path_factory.mktemp("ckpt")
    vlm.save_pretrained(path)
    image = path / "scene.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    return vlm, path, image


def test_cli_streams_the_greedy_answer(checkpoint, capsys):
    vlm, path, image = checkpoint
    G.main(["--model", str(path), "--image", str(image), "--prompt", "what colour?", "--max-new-tokens", str(NEW)])
    tok = vlm.tokenizer
    ids, _ = data.render_conversation(tok, [{"role": "user", "content": "what colour?", "image": True}],
                                      vlm.config.tokens_per_image, add_generation_prompt=True)
    pixels = data.load_image(image, vlm.config.vision.image_size)[None]
    expected = generate(vlm, [ids], pixels, max_new_tokens=NEW, stop_ids=[data.special_ids(tok)["eou"]])[0]
    assert capsys.readouterr().out == tok.decode(expected) + "\n"


def cli_error(*argv):
    with pytest.raises(SystemExit) as e:
        G.main([*map(str, argv), "--prompt", "hi"])
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_cli_missing_model_directory(tmp_path, checkpoint):
    assert str(tmp_path / "nope") in cli_error("--model", tmp_path / "nope", "--image", checkpoint[2])


def test_cli_unreadable_image(tmp_path, checkpoint):
    (tmp_path / "broken.png").write_text("not an image")
    for image in (tmp_path / "broken.png", tmp_path / "missing.png"):
        assert str(image) in cli_error("--model", checkpoint[1], "--image", image)


def test_a_kv_cache_that_cannot_fit_is_refused_before_it_is_allocated(checkpoint, monkeypatch):
    vlm, path, image = checkpoint
    monkeypatch.setattr(G, "KVCache", lambda *a, **kw: pytest.fail("the cache was allocated before the check"))
    # 3 rows: while the 2 samples' cache is cloned from the prompt's, both exist.
    with pytest.raises(ValueError, match=r"^the KV cache for 3 rows of \d+ tokens needs [\d.]+ GiB, more than the "
                                         r"[\d.]+ GiB free on cpu: lower --max-new-tokens or the batch size$"):
        generate(vlm, [[5, 6, 7]], max_new_tokens=10**12, num_samples=2)
    message = cli_error("--model", path, "--image", image, "--max-new-tokens", 10**12)
    assert "lower --max-new-tokens" in message


def test_ctrl_c_while_streaming_is_one_line(checkpoint, monkeypatch, capsys):
    _, path, image = checkpoint
    monkeypatch.setattr(G, "generate", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        G.main(["--model", str(path), "--image", str(image), "--prompt", "hi"])
    assert e.value.code == 130 and capsys.readouterr().out.splitlines()[-1] == "interrupted: the answer so far is above"
