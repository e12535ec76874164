"""checkpoint.py: checkpoints on disk. Skip it on a first read; model.VLM's save_pretrained, from_pretrained and
from_parts call it, and every script asks it which products of a run (world, stages, rounds) are finished and current,
and for the train state --resume continues from (nanochat's checkpoint_manager.py plays the same part there).

Three layouts load: this project's own (config.json, model.safetensors, tokenizer.json); a SmolVLM / Idefics3
directory as transformers publishes it; a SigLIP checkpoint beside a Llama one (from_parts, a new projector). Names map
by key prefix alone (model.py names every module as transformers does); every key and shape is checked before a copy.
"""

import contextlib
import glob
import json
import os
import re
import uuid
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from common import atomic_write, on_rank0, print0, write_json


@contextlib.contextmanager
def reading_checkpoint(path):
    """A checkpoint file that cannot be parsed -> one ValueError naming it, the same from every script."""
    try:
        yield
    except OSError:
        raise  # missing or unreadable, not corrupt: its own message names the file
    except Exception as e:  # json, safetensors, tokenizers and torch.load each raise their own kinds
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {reason})") from None


def stage_dir(out, stage):  # a stage's checkpoint in the run directory out: every script finds the agents here
    return os.path.join(out, stage)


# What the world, an SFT stage, a DPO round and a GRPO run write last: without it, it was interrupted.
WORLD_DONE, STAGE_DONE, ROUND_DONE, GRPO_DONE = "card.json", "stage.json", "round.json", "grpo.json"


# ----------------------------------------------------------------------------------------------
# Cached products. The world, an SFT stage, a DPO round and a GRPO run each record, in the file they write last, their
# id, the options that define them and the ids of their inputs (the products they were built from, named by their
# directory in the run). A product is reused only while both still hold: nothing stale, nothing mixed.

def options_of(config, default=False):  # the options that define what config builds: all but compared=False ones;
    compared = [f for f in fields(config) if f.metadata.get("compared", True)]  # default=True: what a product built
    return json.loads(json.dumps({f.name: f.metadata.get("absent", f.default) if default else getattr(config, f.name)
                                  for f in compared}))  # before an option existed had: its "absent" value, or default


def marker(path):  # the finished product at path: its last file (card, stage, round or grpo .json) as a dict, or None
    for file in (os.path.join(path, name) for name in (WORLD_DONE, STAGE_DONE, ROUND_DONE, GRPO_DONE)):
        if os.path.isfile(file):
            try:
                return json.loads(Path(file).read_text())
            except ValueError:
                raise ValueError(f"{file} is corrupt: build that product again") from None
    return None


def ids(run_dir, names):  # {name: id of the finished product run_dir/name} (None: unfinished, or built before ids)
    return {name: (marker(os.path.join(run_dir, name)) or {}).get("id") for name in names}


def provenance(config, run_dir, inputs, extra=None, leave_out=()):
    """What a product records: a new id; the options that define it (config's, with `extra` and without `leave_out`)
    and what a product built before each existed was built with (options_of's default=True); its inputs' ids."""
    options = {k: v for k, v in {**options_of(config), **(extra or {})}.items() if k not in leave_out}
    return {"id": uuid.uuid4().hex, "options": options, "defaults": options_of(config, default=True),
            "inputs": ids(run_dir, inputs)}


def stale(path, done=None):  # the inputs of the finished product at path rebuilt after it, or out of date themselves
    recorded, run_dir = (done or marker(path) or {}).get("inputs", {}), os.path.dirname(os.path.abspath(path))
    return [k for k, v in ids(run_dir, recorded).items() if v != recorded[k] or stale(os.path.join(run_dir, k))]


def finished(path, built_from=None):  # a product written to the end, from inputs that are still the ones it was
    done = marker(path)  # built from (and with built_from among them: a control, matched to those rounds)
    return done is not None and not stale(path, done) and (built_from is None or built_from in done.get("inputs", {}))


def dpo_rounds(out_dir, last=None):
    """The reasoning agents of train_dpo.py's finished rounds (1..last, when given) -> {round t: checkpoint dir}."""
    rounds = {}
    for path in glob.glob(os.path.join(out_dir, "reasoning_dpo*")):
        match = re.fullmatch(r"reasoning_dpo(\d+)", os.path.basename(path))
        if match and finished(path) and (last is None or int(match[1]) <= last):
            rounds[int(match[1])] = path
    return dict(sorted(rounds.items()))


def latest_reasoning_dir(out_dir):  # the last reasoning agent a run produced: its last DPO round if any, else SFT's
    return ([*dpo_rounds(out_dir).values()] or [stage_dir(out_dir, "reasoning")])[-1]


def flat(options, prefix=""):  # {"a": {"b": 1}} -> {"a.b": 1}, so that an error names the one option that differs
    out = {}
    for key, value in options.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def check_record(path, recorded, wanted, fix):
    """A product's (or train state's) recorded provenance against the wanted one: the first option or input that
    differs -> a one-line ValueError naming it and `fix`, the flag that builds just that product again."""
    if "options" not in recorded and "config" not in recorded:  # "config": stage.json before "options" was added
        raise ValueError(f"{path} was built before its options were recorded: {fix}")
    options, defaults = flat(recorded.get("options", recorded.get("config"))), wanted.get("defaults", {})
    for key, value in flat(wanted["options"]).items():
        if key not in options and key in defaults and defaults[key] == value:
            continue  # an option added since: the product was built as its default builds
        if key not in options or options[key] != value:
            raise ValueError(f"{path} was built with {key}={options.get(key, '(not recorded)')}, not {value}: pass "
                             f"the same option, or {fix}")
    for key, value in wanted["inputs"].items():
        if recorded.get("inputs", {}).get(key) != value:
            raise ValueError(f"{path} was built from an earlier {key}, rebuilt since: {fix}")


def cached(path, name, record, fix, force=False):
    """Whether the finished product at path is reused: built with record's options from its inputs as they are now.
    Forced, or an input rebuilt since: its marker and train state go, and it is built again from scratch. An
    interrupted one is built, continuing its train state. Other options: check_record's error."""
    done = marker(path)
    old = stale(path, done)
    if force or old:
        if done is not None:
            why = "asked to" if force else f"its {', '.join(old)} was rebuilt"
            print0(f"[stage] {name}: building it again ({why})")
        # On rank 0, and the other processes wait for it: they then all see the train state gone.
        on_rank0(lambda: [Path(path, f).unlink(missing_ok=True) for f in (STAGE_DONE, ROUND_DONE, GRPO_DONE,
                                                                          "train_state.pt")])
        return False
    if done is not None:
        check_record(path, done, record, fix)
        print0(f"[stage] {name}: cached at {path}")
    return done is not None


# ----------------------------------------------------------------------------------------------
# Checkpoint files

def save(model, path):
    """config.json + model.safetensors (+ tokenizer.json), each written to a temp file and renamed."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.text.tie_word_embeddings)}
    atomic_write(os.path.join(path, "model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
    atomic_write(os.path.join(path, "config.json"), lambda f: write_json(model.config.to_dict(), f))
    if model.tokenizer is not None:
        atomic_write(os.path.join(path, "tokenizer.json"), lambda f: model.tokenizer.save(f))


def load(path):
    """A checkpoint directory of ours or of Idefics3 / SmolVLM -> (config as VLMConfig.to_dict, tensors under our
    names, tokenizer or None)."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type == "nano-insight-v":
        prefix_map = {"": ""}
    elif model_type == "idefics3":
        config, prefix_map = idefics3_config(config), {"model.": "", "lm_head.": "lm_head."}
    else:
        raise ValueError(f"{path}/config.json: unsupported model_type {model_type!r}; expected 'nano-insight-v' "
                         f"or 'idefics3' (for a SigLIP + Llama pair use VLM.from_parts)")
    state = rename(read_safetensors(path), prefix_map)
    check_config(config, state, path)
    return config, state, read_tokenizer(path)


def load_parts(vision_dir, text_dir, scale_factor, image_token_id, special_tokens):
    """A SigLIP checkpoint + a Llama-family checkpoint -> (config, tensors, tokenizer) as load gives, without the
    projector's. The chat format's special tokens the tokenizer lacks (SmolLM2's has no <image>) are added, with new
    embedding rows; the image token's id goes into the config. image_token_id is for a text checkpoint without a
    tokenizer.json."""
    vconf, tconf = read_config(vision_dir), read_config(text_dir)
    vtype, ttype = vconf.get("model_type"), tconf.get("model_type")
    if vtype not in ("siglip", "siglip_vision_model"):
        raise ValueError(f"{vision_dir}/config.json: expected a SigLIP checkpoint, got model_type {vtype!r}")
    if ttype != "llama":
        raise ValueError(f"{text_dir}/config.json: expected a Llama checkpoint, got model_type {ttype!r}")
    text_cfg, tokenizer = llama_config(tconf, tconf), read_tokenizer(text_dir)
    text = rename(read_safetensors(text_dir), {"model.": "text_model.", "lm_head.": "lm_head."})
    if tokenizer is not None:
        old_ids = sorted(i for i in tokenizer.get_vocab().values() if i < text_cfg["vocab_size"])
        added = [t for t in special_tokens if tokenizer.token_to_id(t) is None]
        tokenizer.add_special_tokens(added)
        new_ids = [tokenizer.token_to_id(t) for t in added]
        text_cfg["vocab_size"] = add_token_rows(text, new_ids, old_ids, text_cfg["vocab_size"])
    if image_token_id is None:
        if tokenizer is None:
            raise ValueError(f"{text_dir}: no tokenizer.json, so no '<image>' token to use; pass image_token_id=")
        image_token_id = tokenizer.token_to_id("<image>")
    config = {"vision": siglip_config(vconf.get("vision_config", vconf)), "text": text_cfg,
              "scale_factor": scale_factor, "image_token_id": image_token_id}
    vision = read_safetensors(vision_dir)
    if vtype == "siglip_vision_model":
        # transformers 4 saved vision-only SigLIP keys under `vision_model.`, transformers 5 without it.
        vision = rename(vision, {"vision_model.": "vision_model.", "": "vision_model."})
    # A dual-tower SigLIP also holds a text tower and a pooling head: only the vision trunk is used.
    vision = {k: v for k, v in vision.items()
              if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
    check_config(config, {**vision, **text}, f"{vision_dir} + {text_dir}")
    return config, {**vision, **text}, tokenizer


SIZES = {"vision": ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_channels"),
         "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads")}


def check_config(config, state, source):
    """A config that cannot describe these tensors -> one ValueError naming the checkpoint, before any model is built:
    built first, hidden_size 100000 would ask for tens of GB, num_attention_heads 0 would divide by zero. A config
    lacking a section or size is left to the loader, which says so."""
    try:
        v, t, s = config["vision"], config["text"], config["scale_factor"]
        sizes = {f"{part}.{k}": c[k] for part, c in (("vision", v), ("text", t)) for k in SIZES[part]}
    except (KeyError, TypeError):
        return
    bad = [f"{k} = {n!r}" for k, n in {**sizes, "scale_factor": s}.items() if type(n) is not int or n <= 0]
    if bad:
        raise ValueError(f"{source}: config.json sizes must be positive integers: {', '.join(bad)}")
    side, heads = v["image_size"] // v["patch_size"], t["num_attention_heads"]
    rules = {"vision hidden_size is a multiple of num_attention_heads": v["hidden_size"] % v["num_attention_heads"],
             "text hidden_size is a multiple of num_attention_heads": t["hidden_size"] % heads,
             "num_attention_heads is a multiple of num_key_value_heads": heads % t["num_key_value_heads"],
             "image_size is a multiple of patch_size": v["image_size"] % v["patch_size"],
             "the patch grid's side is a multiple of scale_factor": side % s}
    broken = [rule for rule, remainder in rules.items() if remainder]
    shapes = {"text_model.embed_tokens.weight": (t["vocab_size"], t["hidden_size"]),
              "text_model.norm.weight": (t["hidden_size"],), "vision_model.post_layernorm.weight": (v["hidden_size"],)}
    broken += [f"{k} is {tuple(state[k].shape)}, so not {shape}" for k, shape in shapes.items()
               if k in state and tuple(state[k].shape) != shape]
    if broken:
        raise ValueError(f"{source}: config.json does not fit its model: " + "; ".join(broken))


def load_into(model, state, tokenizer, source, fresh=()):
    """Copy tensors into model, after checking that every key and shape matches (never a silent partial load), and
    give it the tokenizer -> model. Keys starting with a prefix in `fresh` may be missing (they keep their
    initialisation)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if model.config.text.tie_word_embeddings else set()
    missing = [k for k in expected if k not in state and k not in optional and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} is {tuple(state[k].shape)} in the checkpoint but {tuple(expected[k])} in the model"
             for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k])]
    problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else []) + wrong
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the model config: " + "; ".join(problems))
    # A diverged run can save NaN weights; loaded, they would only show up as empty chains much later.
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{source}: NaN or inf in {', '.join(broken[:3])}{' and more' if broken[3:] else ''}: "
                         f"the run that saved this checkpoint diverged; train it again with a lower --lr")
    if "lm_head.weight" in optional:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: the embedding is the head
    model.load_state_dict(state, strict=False)
    model.tokenizer = tokenizer
    return model


def read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json, so this is not a checkpoint directory")
    with open(config_path, "rb") as f, reading_checkpoint(config_path):
        return dict(json.load(f))


def read_safetensors(path):
    """All tensors of a checkpoint, from model.safetensors or the shards its index names."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, "rb") as f, reading_checkpoint(index):
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    state = {}
    for file in files:
        with reading_checkpoint(file), safe_open(file, framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def read_tokenizer(path):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    with reading_checkpoint(file):
        return Tokenizer.from_file(file)


def rename(state, prefix_map):
    """Map checkpoint key prefixes to ours; keys matching no prefix are kept, to be reported."""
    out = {}
    for key, value in state.items():
        src = next((p for p in prefix_map if key.startswith(p)), None)
        out[key if src is None else prefix_map[src] + key[len(src):]] = value
    return out


def add_token_rows(state, new_ids, old_ids, vocab_size):
    """Give tokens added to a tokenizer their rows of the embedding (and of an untied head) -> the new vocab size.
    An id past the matrices grows them; every new row starts as the mean of the rows the tokenizer already used, so
    the token begins as an average one, not noise with an outsized logit (Hewitt 2021, "Initializing new word
    embeddings"). Spare rows of a padded vocabulary are never used, so they stay out of the mean."""
    new_size = max([vocab_size, *(i + 1 for i in new_ids)])
    for key in ("text_model.embed_tokens.weight", "lm_head.weight"):  # lm_head is absent when tied
        if key in state and new_ids:
            w = torch.cat([state[key], state[key].new_zeros(new_size - len(state[key]), state[key].shape[1])])
            w[new_ids] = w[old_ids].float().mean(0).to(w.dtype)
            state[key] = w
    return new_size


def siglip_config(v):
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported vision activation {v['hidden_act']!r}")
    # Defaults are SiglipVisionConfig's, for keys a config.json may omit.
    defaults = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, layer_norm_eps=1e-6, num_channels=3)
    return {key: v.get(key, default) for key, default in defaults.items()}


def llama_config(t, top):
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope scaling {rope!r}: only plain rotary embeddings are implemented")
    heads, hidden = t.get("num_attention_heads", 32), t.get("hidden_size", 4096)
    if t.get("head_dim", hidden // heads) != hidden // heads:
        raise ValueError("unsupported: head_dim differs from hidden_size / num_attention_heads")
    if t.get("attention_bias") or t.get("mlp_bias"):
        raise ValueError("unsupported: Llama checkpoints with attention or MLP biases")
    # Defaults are LlamaConfig's, for keys a config.json may omit.
    defaults = dict(vocab_size=32000, intermediate_size=11008, num_hidden_layers=32, rms_norm_eps=1e-6)
    return dict(**{key: t.get(key, default) for key, default in defaults.items()}, hidden_size=hidden,
                num_attention_heads=heads, num_key_value_heads=t.get("num_key_value_heads") or heads,
                rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
                tie_word_embeddings=bool(top.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))


def idefics3_config(c):
    # Idefics3Config's defaults: a SigLIP-so400m-like vision config and scale factor 2.
    vision = {"hidden_size": 1152, "intermediate_size": 3072, "num_attention_heads": 16, "patch_size": 32,
              **c.get("vision_config", {})}
    return {"vision": siglip_config(vision), "text": llama_config(c.get("text_config", {}), c),
            "scale_factor": c.get("scale_factor", 2), "image_token_id": c.get("image_token_id", 128257)}


# ----------------------------------------------------------------------------------------------
# The train state --resume continues from (SFT stages, GRPO runs)

def save_train_state(path, model, optimizer, scaler, step, record, rng=True):
    """What --resume needs, beside the weights save_pretrained writes: its own copy of the weights (a crash never mixes
    two steps), the optimizer, the scaler, the step, the run's provenance (its options and inputs) and (rng) the random
    generators' states."""
    device = next(model.parameters()).device  # the training GPU's generator only: a resume may see fewer GPUs
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), **record}
    if rng:
        state.update(rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    def write(tmp):  # through a file object: torch.save rejects the dot-named path atomic_write gives
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(path, write)


def load_train_state(path, model, optimizer, scaler, record, start_over="run without --resume"):
    """Restore a save_train_state file in place -> the number of steps done. Every option that changes the trajectory
    and every input must be those of record (check_record): a resumed run never mixes two."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: nothing to resume; {start_over}")
    with reading_checkpoint(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    check_record(path, state, record, start_over)
    for part, key in ((model, "model"), (optimizer, "optimizer"), (scaler, "scaler")):
        part.load_state_dict(state[key])
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    device = next(model.parameters()).device
    if isinstance(state.get("rng_cuda"), torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["step"]
