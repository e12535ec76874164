"""bench.py: this project's speed and memory next to Hugging Face `transformers`, for information.

    python bench.py            # the smolvlm-256m shape with random weights
    python bench.py --quick    # the tiny preset: a check that everything runs

One set of random weights, built as a `transformers` Idefics3 model (SmolVLM's architecture), is loaded by our VLM.
Ours and theirs take turns, round after round, so that the machine's slow spells fall on both alike: training steps
(and our DPO step), then greedy decoding. Last, the peak memory of our SFT and DPO steps, each in a fresh process.
"""

import importlib.metadata
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from types import SimpleNamespace

import torch

import common
from common import autocast, resolve_device, resolve_precision
from generate import generate
from model import VLM, get_config
from plots import markdown_table
from train_dpo import dpo_loss, sequence_logps


@dataclass
class BenchConfig:
    preset: str = common.option("smolvlm-256m", "model shape (random weights)")
    device: str = common.option("auto", "auto, cpu or cuda")
    precision: str = common.option("auto", "auto: as train_sft", choices=["auto", "bf16", "fp32"])
    warmup: int = common.option(1, "untimed rounds before the timed ones", min=0)
    repeats: int = common.option(3, "timed rounds per measurement", min=1)
    train_batch: int = common.option(2, "rows per training step, an even number (DPO pairs them)", min=2)
    seq_len: int = common.option(128, "tokens per training row, image tokens included", min=1)
    decode_batches: str = common.option("1,16", "comma-separated decoding batch sizes")
    prompt_text: int = common.option(32, "text tokens in the decoding prompt, besides the image", min=1)
    new_tokens: int = common.option(32, "new tokens per decoded row", min=2)
    out: str = common.option("out", "where bench.md is written")
    quick: bool = common.option(False, "the tiny preset and 16 new tokens")


def make_rows(cfg, n_rows, n_text, seed):
    """(ids (B, T), pixel_values (B, 3, H, W) in [-1, 1]): BOS, one image's placeholders, random text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text.vocab_size, (n_rows, n_text), generator=g)
    text[text == cfg.image_token_id] = 4  # random text must not contain the placeholder
    image = torch.full((n_rows, cfg.tokens_per_image), cfg.image_token_id)
    ids = torch.cat([torch.ones(n_rows, 1, dtype=torch.long), image, text], dim=1)
    return ids, torch.rand(n_rows, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1


def build_models(preset, device, workdir):
    """(ours, theirs, max |logits difference| on one row in fp32): random Idefics3 weights, saved, loaded by VLM."""
    import transformers  # only here: the memory-measuring child processes start faster without it
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    d = get_config(preset).to_dict()  # our config fields carry the names of SigLIP's and Llama's
    torch.manual_seed(0)
    ref = transformers.Idefics3ForConditionalGeneration(transformers.Idefics3Config(
        vision_config=d["vision"], text_config=dict(d["text"], model_type="llama", max_position_embeddings=8192),
        scale_factor=d["scale_factor"], image_token_id=d["image_token_id"],
        tie_word_embeddings=d["text"]["tie_word_embeddings"]))
    ref.set_attn_implementation("sdpa")
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0  # no end-of-text token, as ours
    ref.save_pretrained(workdir)
    ours, ref = VLM.from_pretrained(workdir).to(device).eval(), ref.to(device).eval()
    ids, px = (x.to(device) for x in make_rows(ours.config, 1, 16, seed=1))
    diff = ours(ids, pixel_values=px)[0] - ref(input_ids=ids, pixel_values=px[:, None]).logits
    return ours, ref, diff.abs().max().item()


def interleaved(runs, cfg, device):
    """{name: [(seconds, result) of runs[name](), ...]}: one call of each per round; cfg.warmup rounds are untimed."""
    results = {name: [] for name in runs}
    for _ in range(cfg.warmup + cfg.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            result = run()
            if device.type == "cuda":
                torch.cuda.synchronize()  # CUDA runs asynchronously: wait for the work, not just its launch
            results[name].append((time.perf_counter() - t0, result))
    return {name: r[cfg.warmup:] for name, r in results.items()}


def training_inputs(model, cfg, device):
    """(pairs in train_sft.collate's layout; the frozen reference's (chosen, rejected) log-probs, once as train_dpo)."""
    n_pairs, n_text = cfg.train_batch // 2, cfg.seq_len - model.config.tokens_per_image - 1
    ids, px = make_rows(model.config, 2 * n_pairs, n_text, seed=4)  # rows i and n_pairs + i make pair i
    prompt_len = ids.shape[1] - n_text // 2  # the second half of the text is the completion (the chain)
    ids[n_pairs:, :prompt_len], px[n_pairs:] = ids[:n_pairs, :prompt_len], px[:n_pairs]  # same prompt and image
    batch = {"input_ids": ids.to(device), "pixel_values": px.to(device),
             "targets": ids.masked_fill(torch.arange(ids.shape[1]) < prompt_len, -100).to(device)}
    model.train()  # as train_dpo: the reference log-probs come from the training forward
    with torch.no_grad(), autocast(device, cfg.precision):
        return batch, sequence_logps(model, batch).chunk(2)


def step(kind, model, batch, ref_logps, precision):
    """One forward + backward: "sft" (ours), "transformers" (the same loss, theirs) or "dpo" (ours)."""
    with autocast(batch["input_ids"].device, precision):
        if kind == "dpo":  # the chosen and the rejected rows in one forward
            loss = dpo_loss(*sequence_logps(model, batch).chunk(2), *ref_logps, beta=0.1)[0]
        elif kind == "sft":
            loss = model(batch["input_ids"], pixel_values=batch["pixel_values"], targets=batch["targets"])[1]
        else:  # transformers takes each row's images as (B, n_images, 3, H, W) and calls the targets labels
            loss = model(batch["input_ids"], pixel_values=batch["pixel_values"][:, None], labels=batch["targets"]).loss
    loss.backward()
    model.zero_grad(set_to_none=True)  # the optimizer step, the same AdamW for all three, is left out


def bench_training(ours, ref, cfg, device):
    """{"sft" / "transformers" / "dpo": [seconds per step, ...]}, all three on the same preference pairs."""
    batch, ref_logps = training_inputs(ours, cfg, device)
    ref.train()
    runs = {k: lambda k=k, m=m: step(k, m, batch, ref_logps, cfg.precision)
            for k, m in {"sft": ours, "transformers": ref, "dpo": ours}.items()}
    return {k: [s for s, _ in r] for k, r in interleaved(runs, cfg, device).items()}


def peak_child(kind, ckpt, cfg, device):
    """The peak memory (MiB) one step adds to the loaded model and its inputs, in a fresh process so that nothing
    earlier hides in malloc's free lists."""
    model = VLM.from_pretrained(ckpt).to(device)
    batch, ref_logps = training_inputs(model, cfg, device)  # also warms up what every process sets up once
    if device.type == "cuda":  # peak(): bytes since the reset, CUDA's allocator peak or Linux's peak RSS
        torch.cuda.reset_peak_memory_stats()
        peak = torch.cuda.max_memory_allocated
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux's peak RSS (/proc: VmHWM, in KiB) := the current RSS
        peak = lambda: 1024 * int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])  # noqa: E731
    base = peak()  # right after the reset, the peak is what is in use
    step(kind, model, batch, ref_logps, cfg.precision)
    return (peak() - base) / 2**20


def peak_memory(ckpt, cfg, device):
    """{"sft" / "dpo": [MiB, ...]} that one step adds, or None where that cannot be measured."""
    if device.type != "cuda" and not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # children's blocks > 64 KiB unmapped when freed: RSS = live
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process per call
        mib = {k: [pool.apply(peak_child, (k, ckpt, cfg, device)) for _ in range(cfg.repeats)] for k in ("sft", "dpo")}
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return mib


def bench_decoding(ours, ref, cfg, device, batch):
    """{"decode phase" / "whole call": {"ours" / "transformers": [new tokens/s]}}: greedy, one prompt `batch` times."""
    ids, px = make_rows(ours.config, 1, cfg.prompt_text, seed=3)
    ids, px, n = ids.repeat(batch, 1).to(device), px.repeat(batch, 1, 1, 1).to(device), cfg.new_tokens
    ours.eval(), ref.eval()

    def run(model):  # as a user calls each, under autocast: both decode and keep their KV cache in its dtype
        times = []
        stamp = lambda *_: times.append(time.perf_counter())  # noqa: E731
        with autocast(device, cfg.precision):
            if model is ref:  # their streamer first gets the prompt itself: one more stamp
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px[:, None],
                               max_new_tokens=n, do_sample=False, streamer=SimpleNamespace(put=stamp, end=lambda: None))
            else:
                generate(model, ids, px, max_new_tokens=n, temperature=0.0, stream=stamp)
        assert len(times) == n + (model is ref), f"expected {n} new tokens per row"
        return (times[-1] - times[-n]) / (n - 1)  # the decode phase: per token, after the prefill and first token
    runs = interleaved({"ours": lambda: run(ours), "transformers": lambda: run(ref)}, cfg, device)
    return {"decode phase": {k: [batch / per_token for _, per_token in r] for k, r in runs.items()},
            "whole call": {k: [batch * n / total for total, _ in r] for k, r in runs.items()}}


def ratio_cell(a, b):
    """"1.17x (1.08-1.22)": the medians' ratio, then the range of a[i] / b[i] (back-to-back runs): the ratio's noise."""
    per_round = [x / y for x, y in zip(a, b)]
    lo, hi = min(per_round), max(per_round)
    return f"{median(a) / median(b):.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if lo != hi else "")


def report(cfg, device, max_diff, train, decoding, peaks):
    """The tables, in markdown: ours next to transformers, then our DPO step next to our SFT step (a, b, a / b)."""
    def spread(values):  # "median (min-max)" of some measurements, or the median alone when they are all equal
        med, lo, hi = (f"{v:.0f}" if v >= 100 else f"{v:#.3g}" for v in (median(values), min(values), max(values)))
        return med + (f" ({lo}-{hi})" if lo != hi else "")

    shape = f"{cfg.train_batch} rows x {cfg.seq_len} tokens"
    tokens_per_s = {k: [cfg.train_batch * cfg.seq_len / s for s in v] for k, v in train.items()}
    rows = [(f"training step on {shape}, tokens/s", tokens_per_s["sft"], tokens_per_s["transformers"])]
    rows += [(f"decoding at batch {b}, {phase}, new tokens/s", d["ours"], d["transformers"])
             for b, phases in decoding.items() for phase, d in phases.items()]
    dpo_rows = [("seconds", train["dpo"], train["sft"])]
    dpo_rows += [("peak memory added, MiB", peaks["dpo"], peaks["sft"])] if peaks else []
    rows, dpo_rows = ([(name, spread(a), spread(b), ratio_cell(a, b)) for name, a, b in r] for r in (rows, dpo_rows))
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return "\n".join([
        f"## Speed and memory, for information: `{cfg.preset}` shape, random weights, {hardware}", "",
        f"{resolve_precision(device, cfg.precision)} compute; torch {torch.__version__}, transformers "
        f"{importlib.metadata.version('transformers')}; max |logits difference| {max_diff:.1e} in fp32. Median "
        f"(min-max) of {cfg.repeats} rounds after {cfg.warmup} warm-up; a ratio is that of the medians (min-max "
        "of the ratios within each round).", "",
        *markdown_table(["measurement", "ours", "transformers", "ours / transformers"], rows), "",
        *markdown_table([f"ours, one step on {shape}", "DPO", "SFT", "DPO / SFT"], dpo_rows), ""])


def main(argv=None):
    cfg = common.parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    cfg = replace(cfg, preset="tiny", new_tokens=16) if cfg.quick else cfg
    try:  # an unknown device or preset, decoding batch sizes that are not integers, an --out that cannot be written
        device, image_tokens = resolve_device(cfg.device), get_config(cfg.preset).tokens_per_image
        batches = [int(b) for b in cfg.decode_batches.split(",")]
        common.writable_dir(cfg.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if cfg.train_batch % 2 or min(batches) < 1 or cfg.seq_len < image_tokens + 3:  # the ranges that parsing cannot see
        raise SystemExit(f"error: need --decode-batches >= 1, an even --train-batch and "
                         f"--seq-len >= {image_tokens + 3} (the image tokens of {cfg.preset} and some text)")
    cfg = replace(cfg, precision=resolve_precision(device, cfg.precision))  # decided once, as train_sft does
    print(f"[bench] {cfg.preset} on {device.type} in {cfg.precision}: training, decoding, memory ...", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        ours, ref, max_diff = build_models(cfg.preset, device, workdir)
        train = bench_training(ours, ref, cfg, device)
        decoding = {b: bench_decoding(ours, ref, cfg, device, b) for b in batches}
        del ours, ref  # the memory-measuring child processes load the checkpoint themselves
        peaks = peak_memory(workdir, cfg, device)
    md = report(cfg, device, max_diff, train, decoding, peaks)
    common.atomic_write(os.path.join(cfg.out, "bench.md"), lambda path: Path(path).write_text(md))
    print(f"\n{md}\n[bench] written to {os.path.join(cfg.out, 'bench.md')}")


if __name__ == "__main__":
    main()
