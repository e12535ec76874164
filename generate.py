"""Decoding: turn prompts (and their images) into new tokens, fast.

Insight-V samples N reasoning chains per question in every round of RL, and its two agents decode one after the
other, so this is a small engine rather than a loop that reruns the sequence for every token (nanochat's engine.py):
  1. prefill: run every prompt through the model once, in one batch, writing each layer's keys and values into
     a preallocated KV cache (model.KVCache). Prompts are left-padded so that every last token sits in the last
     column; the attention mask hides the pads and the cache gives every row its own rotary positions.
  2. clone: for N samples per prompt, copy each prompt's cache rows N times instead of running it N times.
  3. decode: one new token per row per step. A row ends at its first id in stop_ids or after max_new_tokens,
     and finished rows are dropped from the batch so they no longer cost compute.
Unlike nanochat, every sample draws its own first token, and a batch may hold many different prompts.

Sampling follows the usual order (Hugging Face's logits processors): temperature, top-k, then the top-p nucleus
(Holtzman et al. 2019), then draw. temperature=0 is greedy. As a script it answers one question about an image:
    python generate.py --model out/sft --image cat.png --prompt "What colour is the cat?"
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import trange

import common
import data
from model import VLM, KVCache


CHECK_EVERY = 8  # decode steps between reads of which rows are done


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token per row, logits (B, V) -> (B,) long; a seeded torch.Generator gives the same tokens every time.
    The nucleus is the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # A token stays if the tokens ranked above it have not yet reached top_p; so the most
        # likely token always stays and the nucleus ends at the first token that reaches top_p.
        outside = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logps(model, input_ids, targets, pixel_values=None):
    """Teacher-forced scoring of given tokens, the other half of decoding (DPO, GRPO, the summary agent's margin):
    fp32 log-prob of each next token -> (logps (B, T-1), mask (B, T-1)), position t scoring token t+1; mask is
    targets != -100 shifted likewise (the completion; right pads are hidden by causal attention)."""
    logits, _ = model(input_ids, pixel_values=pixel_values)
    logits, targets = logits[:, :-1].float(), targets[:, 1:]  # position t predicts token t+1
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logps, targets != -100


def check_cache_fits(cfg, rows, positions, dtype, device):
    """A KV cache that cannot fit -> one ValueError before it is allocated (--max-new-tokens 1e12 asks for terabytes):
    against the GPU's free and torch's unused reserved memory, or the host's MemAvailable (not checked elsewhere)."""
    need = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * positions * cfg.head_dim * dtype.itemsize
    try:
        free = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable:")) if device.type != "cuda" else (
            torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    except (OSError, StopIteration):
        return
    if need > free:
        raise ValueError(f"the KV cache for {rows} rows of {positions} tokens needs {need / 2**30:.1f} GiB, more than "
                         f"the {free / 2**30:.1f} GiB free on {device}: lower --max-new-tokens or the batch size")


def left_pad(input_ids, attention_mask, pad_id, device):
    """Prompts -> (ids (B, T) long, mask (B, T) long or None when nothing is padded). A list of token lists is
    left-padded with pad_id here; a tensor must be padded on the left already, as the first new token is read from
    the last column."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.to(device=device, dtype=torch.long)
        mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
        if ids.ndim != 2 or ids.size(1) == 0:
            raise ValueError(f"input_ids must be a (B, T) tensor with T > 0, got shape {tuple(ids.shape)}")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("attention_mask has padding in the last column: pad prompts on the left")
    else:
        lengths = [len(p) for p in input_ids]
        if not lengths or min(lengths) == 0:
            raise ValueError("input_ids must be a non-empty list of non-empty token lists")
        T = max(lengths)
        ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in input_ids], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths], dtype=torch.long, device=device)
    if mask is not None and bool(mask.all()):
        mask = None  # nothing is padded: let the model take its plain causal path
    return ids, mask


# no_grad, not inference_mode: under inference_mode autocast does not cache the bf16 copies of the
# fp32 weights, so every decode step would cast every weight again.
@torch.no_grad()
def generate(model, input_ids, pixel_values=None, max_new_tokens=64, temperature=0.0, top_k=None,
             top_p=None, num_samples=1, stop_ids=(), seed=None, pad_id=0, attention_mask=None,
             dtype=None, stream=None, progress=False):
    """Sample new tokens for a batch of prompts -> list[list[int]], one list of new tokens per row.

    input_ids: a list of token lists (any lengths; left-padded here with pad_id), or a (B, T) tensor already padded
        on the left, with attention_mask (B, T) (1 = real, 0 = pad) when any row is padded.
    pixel_values: (num_images, 3, H, W), the images of all prompts in order; their cfg.image_token_id placeholders
        in input_ids are replaced by the image tokens.
    Rows are ordered prompt-major, sample-minor: row i * num_samples + j is sample j of prompt i.
    A row ends at its first token in stop_ids (which is kept) or after max_new_tokens tokens.
    temperature=0 is greedy; top_k / top_p cut the distribution after the temperature. seed: the same seed gives
    the same samples (None draws a fresh seed).
    dtype: compute dtype under autocast (e.g. torch.bfloat16) and of the KV cache; None uses the dtype of an
        autocast region the caller is in, else the model's own dtype.
    stream: called after every step as stream(rows, tokens) with the rows that got a new token (the CLI prints
        with it). progress: show a tqdm bar over the decode steps.
    """
    if temperature < 0 or num_samples < 1 or max_new_tokens < 0 or (top_k is not None and top_k < 1) or (
            top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, num_samples >= 1, max_new_tokens >= 0, top_k >= 1, 0 < top_p <= 1")
    param = next(model.parameters())
    device = param.device
    if dtype is None and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)  # called under autocast: keep the cache in its dtype
    dtype = dtype or param.dtype
    ids, mask = left_pad(input_ids, attention_mask, pad_id, device)  # (B, T)
    B, T = ids.shape
    n_rows = B * num_samples
    check_cache_fits(model.config.text, B + n_rows * (num_samples > 1), T + max_new_tokens, dtype, device)  # + copy
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    with torch.autocast(device.type, dtype=dtype, enabled=dtype != param.dtype):
        # 1. prefill: encode the images once and run every prompt once, filling the cache
        image_embeds = None if pixel_values is None else model.encode_images(pixel_values.to(device, param.dtype))
        cache = KVCache(model.config.text, batch_size=B, max_len=T + max_new_tokens, device=device, dtype=dtype)
        logits, _ = model(ids, attention_mask=mask, cache=cache, image_embeds=image_embeds, last_only=True)  # (B, 1, V)

        # 2. clone: num_samples copies of every prompt's cache rows and last logits
        if num_samples > 1:
            cache = cache.repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)  # (B * num_samples, 1, V)

        # 3. decode, one token per row per step, all on the device: cache row i writes to output row rows[i], and a
        #    finished row rides along with its tokens ignored (-1). Only every CHECK_EVERY steps (every step when
        #    streaming) does one transfer read which rows are done: all of them ends the loop, a quarter of them
        #    are dropped from the cache in one copy, so the copies stay few and a GPU never waits on the host.
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        tokens = torch.full((n_rows, max_new_tokens), -1, dtype=torch.long, device=device)
        rows = torch.arange(n_rows, device=device)
        done = torch.zeros(n_rows, dtype=torch.bool, device=device)
        check_every = 1 if stream is not None else CHECK_EVERY
        for step in trange(max_new_tokens, disable=not progress, desc="generate", leave=False):
            token = sample_next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (b,)
            tokens[rows, step] = token.masked_fill(done, -1)
            if stream is not None:
                stream(rows[~done].tolist(), token[~done].tolist())
            done = done | torch.isin(token, stop)
            if step == max_new_tokens - 1:
                break
            if (step + 1) % check_every == 0:
                live = (~done).nonzero().squeeze(1)  # the one read back to the host
                if len(live) == 0:
                    break
                if len(live) <= 0.75 * len(done):
                    cache.select(live)
                    token, rows, done = token[live], rows[live], done[live]
            logits, _ = model(token[:, None], cache=cache, last_only=True)  # (b, 1, V)
    return [[t for t in row if t >= 0] for row in tokens.tolist()]  # one transfer: up to each row's last token


@dataclass
class GenerateConfig:
    model: str = common.option(None, "checkpoint directory (this project's or a SmolVLM download)")
    image: str = common.option(None, "image file (png, jpg, ...)")
    prompt: str = common.option(None, "the question to ask about the image")
    max_new_tokens: int = common.option(256, "stop after this many tokens", min=1)
    temperature: float = common.option(0.0, "0 = greedy", min=0)
    top_k: int = common.option(None, "sample only from the k most likely tokens", type=int, min=1)
    top_p: float = common.option(None, "sample only from the top-p nucleus", type=float, above=0, max=1)
    seed: int = common.option(0, "random seed for sampling")


def main(argv=None):
    args = common.parse_config(GenerateConfig, argv, "Answer a question about an image with a checkpoint, streaming "
                               "the answer.")
    if not (args.model and args.image and args.prompt):
        raise SystemExit("error: pass --model DIR, --image FILE and --prompt TEXT")

    # A missing or foreign checkpoint, an unreadable image: OSError or ValueError naming the file, printed as one line.
    try:
        vlm = VLM.from_pretrained(args.model)
        image = data.load_image(args.image, vlm.config.vision.image_size)  # (3, H, W)
        tok = vlm.tokenizer
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer.json: save the checkpoint with its tokenizer")
        eou = data.special_ids(tok)["eou"]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vlm = vlm.to(device).eval()
    messages = [{"role": "user", "content": args.prompt, "image": True}]
    ids, _ = data.render_conversation(tok, messages, vlm.config.tokens_per_image, add_generation_prompt=True)

    # Print each token as it arrives. Decoding the whole answer each time (not token by token) keeps multi-byte
    # characters and word-initial spaces right; a trailing U+FFFD is a character still incomplete: wait for the rest.
    answer, shown = [], ""

    def show(rows, tokens):
        nonlocal shown
        answer.extend(tokens)
        text = tok.decode(answer)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text

    try:
        generate(vlm, [ids], image[None], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, stop_ids=[eou], seed=args.seed, stream=show,
                 dtype=torch.bfloat16 if device.type == "cuda" else None)
    except ValueError as e:  # the KV cache would not fit
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted("the answer so far is above")
    print(tok.decode(answer)[len(shown):])  # whatever was held back, and the final newline


if __name__ == "__main__":
    main()
