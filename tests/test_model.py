"""model.py against the reference implementations, and its loading, saving and KV cache.

The references are `transformers`' own SigLIP, Llama and Idefics3, built tiny and random offline,
saved with `save_pretrained` in the safetensors layouts of the published checkpoints, and loaded by
model.py from disk: so every test of equal outputs is also a test of the loader.

HF initialises with std 0.02, which makes attention almost uniform and the residual stream almost
the embedding: a wrong mask or rotary position would then move the logits by less than the
tolerance. `randomize` gives every weight an O(1) effect first, so 1e-4 is a real check.
"""

import copy
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

import data  # noqa: E402
from model import (SPECIAL_TOKENS, VLM, KVCache, SiglipEmbeddings, apply_rotary, get_config,  # noqa: E402
                   rotary_cos_sin)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Tiny shapes: 64px images in 8px patches (an 8x8 grid, divisible by scale 2 and 4); 6 query heads
# sharing 2 KV heads; a rope theta and an RMSNorm eps that differ from LlamaConfig's defaults.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=64, patch_size=8, layer_norm_eps=1e-6)
TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=256)
IMAGE_TOKEN = 120
TOL = 1e-4


@torch.no_grad()
def randomize(model, seed):
    """O(1) random weights: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1, biases ~ 0.1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 1.0 if "embed" in name or "probe" in name else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_ref(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return str(path)


def images(n, seed=0, size=VISION["image_size"]):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Reference checkpoints on disk, built once per module


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    r = {}
    r["siglip"] = randomize(SiglipVisionModel(SiglipVisionConfig(**VISION)), 1)
    r["siglip_dir"] = save_ref(r["siglip"], root / "siglip")
    # transformers 5 saves a SiglipVisionModel with bare keys (`embeddings.*`); files saved by
    # transformers 4, like the published vision-only checkpoints, put them under `vision_model.`.
    # Keep one checkpoint of each layout, whichever version wrote the first.
    state = load_file(os.path.join(r["siglip_dir"], "model.safetensors"))
    bare = {k.removeprefix("vision_model."): v for k, v in state.items()}
    for layout, keys in (("bare", bare), ("prefixed", {f"vision_model.{k}": v for k, v in bare.items()})):
        r[f"siglip_{layout}"] = r["siglip"]
        r[f"siglip_{layout}_dir"] = shutil.copytree(r["siglip_dir"], root / f"siglip_{layout}")
        save_file(keys, os.path.join(r[f"siglip_{layout}_dir"], "model.safetensors"), metadata={"format": "pt"})
    text_tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
    r["siglip_dual"] = randomize(SiglipModel(SiglipConfig(vision_config=VISION, text_config=text_tower)), 2)
    r["siglip_dual_dir"] = save_ref(r["siglip_dual"], root / "siglip_dual")
    for tied in (True, False):
        llama = randomize(LlamaForCausalLM(LlamaConfig(**TEXT, tie_word_embeddings=tied)), 3 + tied)
        r[f"llama_{tied}"], r[f"llama_{tied}_dir"] = llama, save_ref(llama, root / f"llama_tied{tied}")
    r["llama_sharded_dir"] = save_ref(r["llama_False"], root / "llama_sharded", max_shard_size="20KB")
    for scale, tied in ((2, False), (4, False), (2, True)):
        cfg = Idefics3Config(vision_config=VISION, text_config=dict(TEXT, model_type="llama"), scale_factor=scale,
                             image_token_id=IMAGE_TOKEN, tie_word_embeddings=tied)
        idefics = randomize(Idefics3ForConditionalGeneration(cfg), 10 + scale + tied)
        r[f"idefics_{scale}_{tied}"] = idefics
        r[f"idefics_{scale}_{tied}_dir"] = save_ref(idefics, root / f"idefics_s{scale}_tied{tied}")
    r["idefics_sharded_dir"] = save_ref(r["idefics_4_False"], root / "idefics_sharded", max_shard_size="30KB")
    for m in r.values():
        if isinstance(m, torch.nn.Module) and hasattr(m, "set_attn_implementation"):
            m.set_attn_implementation("eager")  # the plainest reference path
    return r


@pytest.fixture(scope="module")
def vlm_idefics(refs):
    """Our model loaded from the scale-2 Idefics3 checkpoint: the strong random weights the cache tests use."""
    return VLM.from_pretrained(refs["idefics_2_False_dir"]).eval()


def test_saved_references_use_the_published_layouts(refs):
    # The loader is written against these names; if transformers changes them, fail here first.
    keys = set(load_file(os.path.join(refs["siglip_dual_dir"], "model.safetensors")))
    assert {"vision_model.embeddings.patch_embedding.weight", "vision_model.head.probe", "logit_scale"} <= keys
    keys = set(load_file(os.path.join(refs["llama_True_dir"], "model.safetensors")))
    assert "model.layers.0.self_attn.k_proj.weight" in keys and "lm_head.weight" not in keys
    assert os.path.isfile(os.path.join(refs["llama_sharded_dir"], "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(refs["llama_sharded_dir"], "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Equal outputs: vision tower, decoder, the whole VLM


@pytest.mark.parametrize("which", ["siglip_bare", "siglip_prefixed", "siglip_dual"])
def test_from_parts_vision_matches_siglip(refs, which):
    # A vision-only SigLIP in both key layouts, and the full dual-tower one (text tower and
    # pooling head skipped).
    vlm = VLM.from_parts(refs[f"{which}_dir"], refs["llama_True_dir"], image_token_id=IMAGE_TOKEN).eval()
    px = images(3, seed=1)
    ref = refs[which].vision_model if which == "siglip_dual" else refs[which]
    with torch.no_grad():
        want = ref(pixel_values=px).last_hidden_state  # (3, 64, 32)
        got = vlm.vision_model(px)
    assert got.shape == want.shape
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("tied,sharded", [(True, False), (False, False), (False, True)],
                         ids=["tied", "untied", "untied-sharded"])
def test_from_parts_decoder_matches_llama(refs, tied, sharded):
    text_dir = refs["llama_sharded_dir"] if sharded else refs[f"llama_{tied}_dir"]
    vlm = VLM.from_parts(refs["siglip_dual_dir"], text_dir, image_token_id=IMAGE_TOKEN).eval()
    t = vlm.config.text
    assert (t.num_attention_heads, t.num_key_value_heads, t.rope_theta, t.rms_norm_eps, t.tie_word_embeddings) == \
        (6, 2, 50000.0, 1e-5, tied)
    assert (vlm.lm_head.weight is vlm.text_model.embed_tokens.weight) == tied
    ids = torch.randint(0, IMAGE_TOKEN, (2, 17), generator=torch.Generator().manual_seed(0))  # no image tokens
    with torch.no_grad():
        want = refs[f"llama_{tied}"](input_ids=ids).logits
        got, loss = vlm(ids)
    assert loss is None and got.shape == want.shape == (2, 17, TEXT["vocab_size"])
    assert max_diff(got, want) <= TOL


def test_from_parts_reads_top_level_rope_theta(refs, tmp_path):
    # Published SmolLM2 configs (older transformers) keep rope_theta at the top level.
    text_dir = shutil.copytree(refs["llama_False_dir"], tmp_path / "llama_old")
    config = json.loads((text_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = TEXT["rope_theta"]
    (text_dir / "config.json").write_text(json.dumps(config))
    vlm = VLM.from_parts(refs["siglip_dual_dir"], str(text_dir), image_token_id=IMAGE_TOKEN).eval()
    assert vlm.config.text.rope_theta == TEXT["rope_theta"]
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert max_diff(vlm(ids)[0], refs["llama_False"](input_ids=ids).logits) <= TOL


def text_dir_with_tokenizer(refs, tmp_path, tied, tokens):
    """A copy of a Llama reference with a tokenizer.json of the given tokens (ids in order), as SmolLM2 ships one."""
    text_dir = shutil.copytree(refs[f"llama_{tied}_dir"], tmp_path / f"llama_tied{tied}")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[-1]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(text_dir / "tokenizer.json"))
    return str(text_dir)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_from_parts_adds_the_chat_tokens_a_text_tokenizer_lacks(refs, tmp_path, tied):
    # The vocabulary fills the embedding, has <|endoftext|> and <|im_start|> but no <image>, as SmolLM2's.
    V = TEXT["vocab_size"]
    tokens = ["<|endoftext|>", "<|im_start|>"] + [f"w{i}" for i in range(V - 2)]
    vlm = VLM.from_parts(refs["siglip_dual_dir"], text_dir_with_tokenizer(refs, tmp_path, tied, tokens)).eval()
    ids = {t: vlm.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    new = [ids[t] for t in SPECIAL_TOKENS[2:]]  # the four it lacked, appended after the old vocabulary
    assert ids["<|endoftext|>"] == 0 and ids["<|im_start|>"] == 1 and sorted(new) == list(range(V, V + 4))
    assert vlm.config.image_token_id == ids["<image>"] and vlm.config.text.vocab_size == V + 4
    # New rows start at the mean of the old ones, in the embedding and in an untied head.
    ref = refs[f"llama_{tied}"]
    for ours, theirs in ((vlm.text_model.embed_tokens.weight, ref.model.embed_tokens.weight),
                         (vlm.lm_head.weight, ref.lm_head.weight)):
        assert ours.shape == (V + 4, TEXT["hidden_size"]) and torch.equal(ours[:V], theirs)
        assert torch.allclose(ours[V:], theirs.mean(0).expand(4, -1), atol=1e-6)
    assert (vlm.lm_head.weight is vlm.text_model.embed_tokens.weight) == tied
    # Text-only logits over the old vocabulary still equal the Llama reference.
    text_ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, _ = vlm(text_ids)
        assert max_diff(got[..., :V], ref(input_ids=text_ids).logits) <= TOL
    # A forward with an image, prompted in the chat format the agents use (every special token now has an id).
    messages = [{"role": "user", "content": "w5 w6", "image": True}]
    prompt = torch.tensor([data.render_conversation(vlm.tokenizer, messages, vlm.config.tokens_per_image, True)[0]])
    assert (prompt == ids["<image>"]).sum() == vlm.config.tokens_per_image
    with torch.no_grad():
        with_image, _ = vlm(prompt, pixel_values=images(1, seed=6))
    assert with_image.shape == (1, prompt.shape[1], V + 4) and torch.isfinite(with_image).all()
    # save_pretrained -> from_pretrained: the same ids, config and logits.
    vlm.save_pretrained(str(tmp_path / "saved"))
    loaded = VLM.from_pretrained(str(tmp_path / "saved")).eval()
    assert loaded.config == vlm.config and {t: loaded.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS} == ids
    with torch.no_grad():
        assert torch.equal(loaded(prompt, pixel_values=images(1, seed=6))[0], with_image)


def test_from_parts_keeps_a_tokenizer_that_has_the_chat_tokens(refs, tmp_path):
    # Every special token present (at ids 90..95 of 128): nothing is added, no row changes.
    tokens = [f"w{i}" for i in range(90)] + list(SPECIAL_TOKENS) + [f"v{i}" for i in range(32)]
    vlm = VLM.from_parts(refs["siglip_dual_dir"], text_dir_with_tokenizer(refs, tmp_path, False, tokens))
    assert vlm.config.text.vocab_size == TEXT["vocab_size"] and vlm.config.image_token_id == 93
    assert vlm.tokenizer.get_vocab_size() == TEXT["vocab_size"]
    assert torch.equal(vlm.text_model.embed_tokens.weight, refs["llama_False"].model.embed_tokens.weight)


def test_from_parts_gives_spare_rows_to_new_tokens(refs, tmp_path):
    # A tokenizer smaller than the embedding (padded vocabularies are common): new tokens take spare rows, which start
    # at the mean of the rows the tokenizer used (not of the spare ones), and nothing grows.
    tokens = ["<|endoftext|>", "<|im_start|>"] + [f"w{i}" for i in range(98)]
    vlm = VLM.from_parts(refs["siglip_dual_dir"], text_dir_with_tokenizer(refs, tmp_path, True, tokens))
    emb, ref = vlm.text_model.embed_tokens.weight, refs["llama_True"].model.embed_tokens.weight
    assert vlm.config.text.vocab_size == TEXT["vocab_size"] and vlm.config.image_token_id in range(100, 104)
    assert torch.equal(emb[:100], ref[:100]) and torch.equal(emb[104:], ref[104:])
    assert torch.allclose(emb[100:104], ref[:100].mean(0).expand(4, -1), atol=1e-6)


def idefics_batch(tokens_per_image):
    """Two rows of equal length: row 0 holds two images, row 1 one. Returns ids, our pixel_values
    (3 images in prompt order) and HF's (B, max_images, 3, H, W) with an all-zero padding image."""
    n = tokens_per_image
    row0 = [1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9] + [IMAGE_TOKEN] * n + [10, 11]
    row1 = [1, 5] + [IMAGE_TOKEN] * n + list(range(20, 20 + len(row0) - n - 2))
    ids = torch.tensor([row0, row1])
    px = images(3, seed=2)
    hf_px = torch.zeros(2, 2, *px.shape[1:])
    hf_px[0, 0], hf_px[0, 1], hf_px[1, 0] = px[0], px[1], px[2]
    return ids, px, hf_px


@pytest.mark.parametrize("scale,tied", [(2, False), (4, False), (2, True)], ids=["s2", "s4", "s2-tied"])
def test_vlm_matches_idefics3(refs, scale, tied):
    vlm = VLM.from_pretrained(refs[f"idefics_{scale}_{tied}_dir"]).eval()
    assert vlm.config.scale_factor == scale and vlm.config.image_token_id == IMAGE_TOKEN
    assert vlm.config.tokens_per_image == 64 // scale**2
    assert vlm.config.text.tie_word_embeddings == tied
    ids, px, hf_px = idefics_batch(vlm.config.tokens_per_image)
    ref = refs[f"idefics_{scale}_{tied}"]
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=hf_px).logits
        got, _ = vlm(ids, pixel_values=px)
        # The projected image tokens themselves, against Idefics3's vision tower + connector.
        want_img = ref.model.connector(ref.model.vision_model(pixel_values=px).last_hidden_state)
        got_img = vlm.encode_images(px)
    assert got_img.shape == want_img.shape == (3, 64 // scale**2, TEXT["hidden_size"])
    assert max_diff(got_img, want_img) <= TOL
    assert got.shape == want.shape
    assert max_diff(got, want) <= TOL


def test_train_mode_attention_kernel_gives_the_same_logits_and_gradients(refs):
    # In training mode on the CPU, short sequences go through SDPA's math path (model.attention);
    # it must be the same function as the fused kernel the parity test above runs in eval mode.
    vlm = VLM.from_pretrained(refs["idefics_2_False_dir"])
    ids, px, _ = idefics_batch(vlm.config.tokens_per_image)
    targets = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    out = {}
    for mode in ("eval", "train"):
        getattr(vlm, mode)()
        vlm.zero_grad(set_to_none=True)
        logits, loss = vlm(ids, pixel_values=px, targets=targets)
        loss.backward()
        out[mode] = logits.detach(), [p.grad.clone() for p in vlm.parameters() if p.grad is not None]
    assert max_diff(out["train"][0], out["eval"][0]) <= TOL
    assert len(out["train"][1]) == len(out["eval"][1]) > 0
    for a, b in zip(out["train"][1], out["eval"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sharded_idefics3_loads_the_same(refs):
    single = VLM.from_pretrained(refs["idefics_4_False_dir"])
    sharded = VLM.from_pretrained(refs["idefics_sharded_dir"])
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# The VLM's own contract: placeholders, loss


def test_image_placeholders_filled_in_order(vlm_idefics):
    vlm, n = vlm_idefics, vlm_idefics.config.tokens_per_image
    ids, px, _ = idefics_batch(n)
    with torch.no_grad():
        batch, _ = vlm(ids, pixel_values=px)
        # Row 0 gets images 0 and 1, row 1 gets image 2: the same as running each row alone.
        row0, _ = vlm(ids[:1], pixel_values=px[:2])
        row1, _ = vlm(ids[1:], pixel_values=px[2:])
        swapped, _ = vlm(ids[:1], pixel_values=px[[1, 0]])
        # Precomputed image embeddings are the same as pixels.
        embeds, _ = vlm(ids, image_embeds=vlm.encode_images(px))
    assert max_diff(batch[:1], row0) <= TOL and max_diff(batch[1:], row1) <= TOL
    assert max_diff(embeds, batch) <= TOL
    assert max_diff(swapped, row0) > 1e-2  # order matters, so the test above can tell
    with torch.no_grad(), pytest.raises(ValueError, match="3 x 16|image placeholder"):
        vlm(ids, pixel_values=px[:2])  # 3 images' worth of placeholders, 2 images


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(vlm_idefics):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, IMAGE_TOKEN, (2, 12), generator=g)
    targets = ids.clone()
    targets[0, :5] = -100  # a prompt that is not trained on
    targets[1, 8:] = -100
    with torch.no_grad():
        logits, loss = vlm_idefics(ids, targets=targets)
    pred, gold = logits[:, :-1].float(), targets[:, 1:]
    keep = gold != -100
    manual = -(pred.log_softmax(-1).gather(-1, gold.clamp(min=0)[..., None])[..., 0] * keep).sum() / keep.sum()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - manual.item()) <= 1e-5


def test_last_only_returns_the_last_position(vlm_idefics):
    ids = torch.randint(0, IMAGE_TOKEN, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = vlm_idefics(ids)
        last, _ = vlm_idefics(ids, last_only=True)
    assert last.shape == (2, 1, TEXT["vocab_size"]) and max_diff(last, full[:, -1:]) <= TOL


# ----------------------------------------------------------------------------------------------
# Saving and loading: round trip, and every way a checkpoint can be wrong


@pytest.fixture(scope="module")
def saved_micro(tmp_path_factory):
    torch.manual_seed(0)
    vlm = randomize(VLM(get_config("micro")), 5)
    path = tmp_path_factory.mktemp("micro") / "ckpt"
    vlm.save_pretrained(str(path))
    return vlm, path


def test_save_load_round_trip_is_bit_exact(saved_micro, vlm_idefics, tmp_path):
    vlm, path = saved_micro
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]  # no temp files left behind
    vlm_idefics.save_pretrained(str(tmp_path / "from_idefics"))  # untied, where micro is tied
    for original, directory in ((vlm, path), (vlm_idefics, tmp_path / "from_idefics")):
        loaded = VLM.from_pretrained(str(directory))
        assert loaded.config == original.config
        a, b = original.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (loaded.lm_head.weight is loaded.text_model.embed_tokens.weight) == original.config.text.tie_word_embeddings


def test_load_with_dtype(saved_micro):
    _, path = saved_micro
    loaded = VLM.from_pretrained(str(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_tokenizer_is_saved_and_loaded(saved_micro, tmp_path):
    from tokenizers import Tokenizer, models
    vlm, _ = saved_micro
    vlm.tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    try:
        vlm.save_pretrained(str(tmp_path / "with_tok"))
    finally:
        vlm.tokenizer = None
    loaded = VLM.from_pretrained(str(tmp_path / "with_tok"))
    assert loaded.tokenizer is not None and loaded.tokenizer.token_to_id("world") == 1


def tampered(src, dst, edit):
    """A copy of checkpoint src whose model.safetensors is rewritten by edit(state)."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return str(dst)


KEY = "text_model.layers.1.mlp.up_proj.weight"


def test_tampered_shape_names_key_and_both_shapes(saved_micro, tmp_path):
    _, path = saved_micro

    def edit(state):
        state[KEY] = torch.zeros(state[KEY].shape[0] + 1, state[KEY].shape[1])
    shape = tuple(load_file(os.path.join(path, "model.safetensors"))[KEY].shape)
    bad = (shape[0] + 1, shape[1])
    with pytest.raises(ValueError, match=re.escape(KEY)) as err:
        VLM.from_pretrained(tampered(path, tmp_path / "ckpt", edit))
    message = str(err.value).replace(" ", "")
    assert str(shape).replace(" ", "") in message and str(bad).replace(" ", "") in message


def test_missing_key_is_named(saved_micro, tmp_path):
    _, path = saved_micro
    with pytest.raises(ValueError, match=re.escape(KEY)):
        VLM.from_pretrained(tampered(path, tmp_path / "ckpt", lambda s: s.pop(KEY)))


def test_extra_key_is_named(saved_micro, tmp_path):
    _, path = saved_micro
    extra = "text_model.layers.7.mlp.up_proj.weight"

    def edit(state):
        state[extra] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=re.escape(extra)):
        VLM.from_pretrained(tampered(path, tmp_path / "ckpt", edit))


def test_missing_key_in_idefics3_checkpoint_is_named(refs, tmp_path):
    hf_key = "model.text_model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=re.escape("layers.1.mlp.up_proj.weight")):
        VLM.from_pretrained(tampered(refs["idefics_2_False_dir"], tmp_path / "ckpt", lambda s: s.pop(hf_key)))


def test_bad_directory_and_unsupported_model_type(saved_micro, refs, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        VLM.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLM.from_pretrained(str(tmp_path / "empty"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        VLM.from_pretrained(str(gpt2))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(saved_micro[1], "config.json"), no_weights)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        VLM.from_pretrained(str(no_weights))
    with pytest.raises(ValueError, match="llama"):  # the two parts swapped
        VLM.from_parts(refs["llama_True_dir"], refs["siglip_dual_dir"], image_token_id=IMAGE_TOKEN)


@pytest.mark.parametrize("part,field,value,message", [
    ("text", "hidden_size", 100000, r"text_model.embed_tokens.weight is \(256, 64\), so not \(256, 100000\)"),
    ("text", "num_attention_heads", 0, r"sizes must be positive integers: text.num_attention_heads = 0"),
    ("text", "num_key_value_heads", 3, "num_attention_heads is a multiple of num_key_value_heads"),
    ("vision", "patch_size", 7, "image_size is a multiple of patch_size"),
    ("vision", "hidden_size", "32", "sizes must be positive integers: vision.hidden_size = '32'"),
])
def test_a_config_that_does_not_fit_is_refused_before_the_model_is_built(saved_micro, tmp_path, monkeypatch, part,
                                                                         field, value, message):
    _, path = saved_micro
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    config = json.loads((broken / "config.json").read_text())
    config[part][field] = value
    (broken / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(VLM, "__init__", lambda *a, **kw: pytest.fail("the model was built before the check"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(broken))}: config.json .*{message}"):
        VLM.from_pretrained(str(broken))


# ----------------------------------------------------------------------------------------------
# KV cache: prefill, a multi-token chunk, then single tokens == one full forward


def cached_logits(vlm, ids, chunks, attention_mask=None, pixel_values=None, dtype=torch.float32):
    """Feed ids through a fresh cache in pieces of the given lengths; the first piece is the prefill
    (with its attention_mask and images). Returns the logits of every position, concatenated."""
    cache = KVCache(vlm.config.text, batch_size=ids.shape[0], max_len=ids.shape[1], dtype=dtype)
    out, start = [], 0
    for i, n in enumerate(chunks):
        mask = attention_mask[:, start:start + n] if attention_mask is not None else None
        logits, _ = vlm(ids[:, start:start + n], pixel_values=pixel_values if i == 0 else None,
                        attention_mask=mask, cache=cache)
        out.append(logits)
        start += n
    assert start == ids.shape[1] and cache.length == ids.shape[1]
    return torch.cat(out, dim=1), cache


CHUNKS = [5, 4, 1, 1, 1]  # prefill k=5, a chunk of m=4, then single tokens


# bf16 keeps ~3 significant digits and the cached and full paths multiply matrices of different
# shapes, so they may round differently: allow a few bf16 steps at the largest logit (~4 here).
DTYPES = [(torch.float32, TOL), (torch.bfloat16, 0.1)]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
def test_kv_cache_matches_full_forward(vlm_idefics, dtype, tol):
    vlm = copy.deepcopy(vlm_idefics).to(dtype)
    ids = torch.randint(0, IMAGE_TOKEN, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = vlm(ids)
        cached, cache = cached_logits(vlm, ids, CHUNKS, dtype=dtype)
        changed, _ = vlm(torch.cat([ids[:, :1] + 1, ids[:, 1:]], 1))
    assert cache.pos.tolist() == [sum(CHUNKS)] * 2
    assert max_diff(cached, full) <= tol
    assert max_diff(changed[:, -1], full[:, -1]) > 10 * tol  # the last token does attend to the first


def test_single_row_decoding_matches_full_forward(vlm_idefics):
    # One row, as the agents decode a single question: prefill, a chunk, then one token at a time.
    vlm = vlm_idefics
    ids = torch.randint(0, IMAGE_TOKEN, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, _ = vlm(ids)
        cached, _ = cached_logits(vlm, ids, CHUNKS)
    assert max_diff(cached, full) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotate_half_equals_one_roll_with_a_signed_sin_bit_for_bit(dtype):
    # The faster form, one roll of x with rotate_half's minus sign folded into sin's first half, gives the same
    # numbers as model.py's rotate_half, values and gradients: the textbook form costs no change of results.
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 16, generator=g).to(dtype).requires_grad_()
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 7]])
    cos, sin = rotary_cos_sin(positions, 16, 10000.0, torch.float32)
    cos, sin = cos[:, None], sin[:, None]
    assert torch.equal(cos[..., :8], cos[..., 8:]) and torch.equal(sin[..., :8], sin[..., 8:])
    y = apply_rotary(x, cos, sin)
    x2 = x.detach().clone().requires_grad_()
    signed_sin = torch.cat((-sin[..., :8], sin[..., 8:]), dim=-1)
    y2 = x2 * cos + x2.roll(8, dims=-1) * signed_sin
    assert torch.equal(y, y2)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    y2.backward(grad)
    assert torch.equal(x.grad, x2.grad)


def test_patch_embedding_takes_the_patches_row_major():
    torch.manual_seed(0)
    vcfg = get_config("micro").vision
    emb = SiglipEmbeddings(vcfg)
    p, n = vcfg.patch_size, vcfg.image_size // vcfg.patch_size
    px = torch.randn(2, vcfg.num_channels, vcfg.image_size, vcfg.image_size)
    x, w = emb(px), emb.patch_embedding.weight.reshape(vcfg.hidden_size, -1)  # (D, C*p*p)
    assert x.shape == (2, vcfg.num_patches, vcfg.hidden_size)
    for r, c in [(0, 0), (0, 1), (1, 0), (n - 1, n - 1)]:  # patch (r, c) is token r * n + c, by hand
        patch = px[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(2, -1)
        expected = patch @ w.T + emb.patch_embedding.bias + emb.position_embedding.weight[r * n + c]
        assert torch.allclose(x[:, r * n + c], expected, atol=1e-5)


def test_kv_cache_with_images_in_the_prefill(vlm_idefics):
    ids, px, _ = idefics_batch(vlm_idefics.config.tokens_per_image)
    # The prefill must hold all image tokens (row 0's second image ends 2 before the end).
    chunks = [ids.shape[1] - 2, 1, 1]
    with torch.no_grad():
        full, _ = vlm_idefics(ids, pixel_values=px)
        cached, _ = cached_logits(vlm_idefics, ids, chunks, pixel_values=px)
    assert max_diff(cached, full) <= TOL


def padded_batch(pad_side):
    """Rows of 12 and 8 real tokens, padded to 12 on the given side with token 0."""
    g = torch.Generator().manual_seed(7)
    long, short = torch.randint(1, IMAGE_TOKEN, (12,), generator=g), torch.randint(1, IMAGE_TOKEN, (8,), generator=g)
    pad = torch.zeros(4, dtype=torch.long)
    row1 = torch.cat([pad, short]) if pad_side == "left" else torch.cat([short, pad])
    mask = (torch.arange(12) >= 4) if pad_side == "left" else (torch.arange(12) < 8)
    return torch.stack([long, row1]), torch.stack([torch.ones(12, dtype=torch.bool), mask]).long(), long, short


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_padded_batch_matches_unpadded_rows(vlm_idefics, pad_side):
    ids, mask, long, short = padded_batch(pad_side)
    with torch.no_grad():
        batch, _ = vlm_idefics(ids, attention_mask=mask)
        want_long, _ = vlm_idefics(long[None])
        want_short, _ = vlm_idefics(short[None])
    real = mask[1].bool()
    assert max_diff(batch[0], want_long[0]) <= TOL
    assert max_diff(batch[1, real], want_short[0]) <= TOL
    assert torch.isfinite(batch).all()  # padding rows must not produce NaN


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
def test_kv_cache_with_left_padding(vlm_idefics, dtype, tol):
    ids, mask, long, short = padded_batch("left")
    # The short row continues with the same 4 tokens the long row has: 12 + 4 after the pads.
    cont = torch.randint(1, IMAGE_TOKEN, (2, 4), generator=torch.Generator().manual_seed(8))
    ids, mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    vlm = copy.deepcopy(vlm_idefics).to(dtype)
    with torch.no_grad():
        # Prefill 6 columns (4 of them pads in row 1), a chunk of 6, then 4 single tokens.
        cached, cache = cached_logits(vlm, ids, [6, 6, 1, 1, 1, 1], attention_mask=mask, dtype=dtype)
        want_long, _ = vlm(torch.cat([long, cont[0]])[None])
        want_short, _ = vlm(torch.cat([short, cont[1]])[None])
    assert cache.pos.tolist() == [16, 12]
    assert max_diff(cached[0], want_long[0]) <= tol
    assert max_diff(cached[1, 4:], want_short[0]) <= tol


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_one_token_after_unpadded_rows_needs_no_mask(vlm_idefics, autocast):
    # A decode step of one token after unpadded rows runs attention without any mask (a faster
    # kernel call); forcing the explicit all-True mask must give the same bits.
    ids = torch.randint(1, IMAGE_TOKEN, (2, 9), generator=torch.Generator().manual_seed(10))
    logits = {}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for padded in (False, True):
            cache = KVCache(vlm_idefics.config.text, batch_size=2, max_len=9)
            vlm_idefics(ids[:, :8], cache=cache)
            assert not cache.padded
            cache.padded = padded  # True takes the explicit mask, as after a left-padded prefill
            logits[padded], _ = vlm_idefics(ids[:, 8:], cache=cache)
    assert torch.equal(logits[False], logits[True])
    cache = KVCache(vlm_idefics.config.text, batch_size=2, max_len=9)
    with torch.no_grad():
        vlm_idefics(ids[:, :8], attention_mask=torch.tensor([[1] * 8, [0] + [1] * 7]), cache=cache)
    assert cache.padded and cache.repeat_interleave(2).padded  # a padded prefill keeps the mask


def test_cache_repeat_interleave_and_select(vlm_idefics):
    g = torch.Generator().manual_seed(9)
    prompt, nxt = torch.randint(1, IMAGE_TOKEN, (2, 7), generator=g), torch.randint(1, IMAGE_TOKEN, (6, 1), generator=g)
    last = torch.tensor([[3], [4]])
    seqs = torch.cat([prompt.repeat_interleave(3, 0), nxt], 1)  # (6, 8): rows 0,0,0,1,1,1 of the prompt
    with torch.no_grad():
        cache = KVCache(vlm_idefics.config.text, batch_size=2, max_len=9)
        vlm_idefics(prompt, cache=cache)
        clones = cache.repeat_interleave(3)  # prefill once, sample three continuations per prompt
        got, _ = vlm_idefics(nxt, cache=clones)
        want, _ = vlm_idefics(seqs)
        assert max_diff(got[:, 0], want[:, -1]) <= TOL
        clones.select(torch.tensor([1, 4]))  # drop finished rows
        got, _ = vlm_idefics(last, cache=clones)
        want, _ = vlm_idefics(torch.cat([seqs[[1, 4]], last], 1))
    assert max_diff(got[:, 0], want[:, -1]) <= TOL


# ----------------------------------------------------------------------------------------------
# Presets and the optimizer helper


def test_smolvlm_preset_has_the_published_shapes():
    cfg = get_config("smolvlm-256m")
    assert cfg.tokens_per_image == 64 and cfg.scale_factor == 4 and cfg.image_token_id == 49190
    with torch.device("meta"):  # shapes only: no 256M parameters allocated
        vlm = VLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in vlm.state_dict().items()}
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (768, 3, 16, 16)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (1024, 768)
    assert shapes["connector.modality_projection.proj.weight"] == (576, 12288)
    assert shapes["text_model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["text_model.layers.29.mlp.gate_proj.weight"] == (1536, 576)
    assert shapes["lm_head.weight"] == (49280, 576)
    assert vlm.lm_head.weight is not vlm.text_model.embed_tokens.weight
    assert 250e6 < sum(p.numel() for p in vlm.parameters()) < 260e6


def test_nanovlm_preset_size():
    with torch.device("meta"):
        vlm = VLM(get_config("nanovlm-222m"))
    assert vlm.config.tokens_per_image == 49
    assert vlm.lm_head.weight is vlm.text_model.embed_tokens.weight
    assert 215e6 < sum(p.numel() for p in vlm.parameters()) < 230e6


def test_tiny_preset_runs_and_overrides_apply():
    cfg = get_config("tiny", vocab_size=300, image_token_id=299)
    assert cfg.text.vocab_size == 300 and cfg.image_token_id == 299
    assert get_config("tiny").text.vocab_size != 300  # presets are copies, never mutated
    vlm = VLM(cfg).eval()
    ids = torch.tensor([[1, 2] + [299] * cfg.tokens_per_image + [3]])
    px = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        logits, _ = vlm(ids, pixel_values=px)
    assert logits.shape == (1, ids.shape[1], 300)
    with pytest.raises(ValueError):
        get_config("no-such-preset")


def test_configure_optimizers_groups(saved_micro):
    vlm, _ = saved_micro
    opt = vlm.configure_optimizers(0.1, lr_text=1e-3, lr_vision=1e-4, lr_projector=1e-2)
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(vlm.parameters()))
    for group in opt.param_groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(vlm.connector.modality_projection.proj.weight)] == 1e-2
    assert lr[id(vlm.vision_model.post_layernorm.weight)] == 1e-4
    assert lr[id(vlm.text_model.norm.weight)] == 1e-3
