"""bench.py: how fast this project trains and decodes, against `transformers`, in one run.

    python bench.py            # the smolvlm-256m shape with random weights (~5-10 min on a 2-core CPU)
    python bench.py --quick    # the tiny preset, under a minute

Absolute times on a shared machine are noise; ratios measured in the same process, on the same
weights and the same inputs, are not. So the benchmark builds ONE set of random weights as a
`transformers` Idefics3ForConditionalGeneration (the SmolVLM architecture), saves it, loads this
project's VLM from that directory, checks that both give the same logits, and then times both
side by side:

  1. training step: tokens/s of forward + backward under bf16 autocast with fp32 master weights
     (on a CPU without fast bf16 matmuls, where train_sft's `auto` trains in fp32, in fp32)
     (the optimizer step is left out of both: it is the same AdamW on the same parameters);
  2. decoding: new tokens/s of greedy decoding at batch 1 and batch 16, generate.generate against
     `transformers`' generate (KV cache on, no stop token, the same number of new tokens). Every
     token's arrival time is recorded, so the decode phase (the steady per-token loop) is
     reported apart from the whole call (which includes the prefill: encoding the image and
     running the prompt once);
  3. one DPO step (Rafailov et al. 2023, as train_dpo runs it: reference log-probs precomputed,
     chosen and rejected rows in one forward) against one SFT step on the same rows: time and
     peak memory;
  4. the wall time of each stage of the last pipeline run, read from out/logs/.

Each figure is a warm-up followed by several repeats, printed as median (min-max). The tables
are written to out/bench.md for the README's performance section, with the machine described.
"""

import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from generate import generate
from model import VLM, atomic_write, get_config, parse_config
from train_dpo import dpo_loss, sequence_logps
from train_sft import resolve_device, resolve_precision

# Dense bf16 peak of the GPUs we know (NVIDIA datasheets, without sparsity); others need --peak-flops.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class BenchConfig:
    preset: str = field(default="smolvlm-256m", metadata={"help": "model shape (random weights)",
                                                         "choices": ["micro", "tiny", "smolvlm-256m", "nanovlm-222m"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    warmup: int = field(default=1, metadata={"help": "untimed runs before each measurement"})
    repeats: int = field(default=3, metadata={"help": "timed runs per measurement"})
    train_batch: int = field(default=2, metadata={"help": "rows per training step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training row, image tokens included"})
    decode_batches: str = field(default="1,16", metadata={"help": "comma-separated decoding batch sizes"})
    prompt_text: int = field(default=32, metadata={"help": "text tokens in the decoding prompt, besides the image"})
    new_tokens: int = field(default=32, metadata={"help": "new tokens per decoded row"})
    dpo_pairs: int = field(default=1, metadata={"help": "preference pairs per DPO step (2x rows)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    peak_flops: float = field(default=0.0, metadata={"help": "accelerator peak FLOP/s for MFU (0: look up the GPU)"})
    out: str = field(default="out", metadata={"help": "pipeline output dir: logs are read from OUT/logs, bench.md written"})
    precision: str = field(default="auto", metadata={"help": "auto (as train_sft: bf16 where it is faster than fp32), bf16 or fp32",
                                                     "choices": ["auto", "bf16", "fp32"]})
    quick: bool = field(default=False, metadata={"help": "the tiny preset: a check that everything runs, in < 1 min"})


# ----------------------------------------------------------------------------------------------
# One set of weights, two implementations


def idefics3_config(cfg):
    """Our VLMConfig as Idefics3Config arguments for the same architecture (the fields model.py reads back)."""
    v, t = cfg.vision, cfg.text
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, num_channels=v.num_channels)
    text = dict(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=8192)
    return dict(vision_config=vision, text_config=text, scale_factor=cfg.scale_factor,
                image_token_id=cfg.image_token_id, tie_word_embeddings=t.tie_word_embeddings)


def build_models(preset, device, workdir):
    """(ours, reference, checkpoint dir): random Idefics3 weights, saved, then loaded by VLM.from_pretrained."""
    # Imported here, where the reference is built, and nowhere else: the child processes that
    # measure memory start seconds faster without it.
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = get_config(preset)
    torch.manual_seed(0)
    ref = transformers.Idefics3ForConditionalGeneration(transformers.Idefics3Config(**idefics3_config(cfg)))
    ref.set_attn_implementation("sdpa")
    ref.generation_config.eos_token_id = None  # decode exactly max_new_tokens, as ours does without stop ids
    ref.generation_config.pad_token_id = 0
    ckpt = os.path.join(workdir, "idefics3")
    ref.save_pretrained(ckpt)
    ours = VLM.from_pretrained(ckpt)
    if ours.config.to_dict() != cfg.to_dict():
        raise RuntimeError(f"the saved Idefics3 config does not load back as preset {preset!r}")
    return ours.to(device), ref.to(device), ckpt


def make_rows(cfg, n_rows, n_text, seed):
    """(ids (B, T), pixel_values (B, 3, H, W)): each row one image's placeholders then random text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text.vocab_size, (n_rows, n_text), generator=g)
    text[text == cfg.image_token_id] = 4  # random text must not contain the placeholder
    image = torch.full((n_rows, cfg.tokens_per_image), cfg.image_token_id)
    ids = torch.cat([torch.ones(n_rows, 1, dtype=torch.long), image, text], dim=1)  # BOS-like token first
    size = cfg.vision.image_size
    return ids, torch.rand(n_rows, 3, size, size, generator=g) * 2 - 1  # normalised pixels in [-1, 1]


def text_targets(ids, image_token_id):
    return ids.masked_fill(ids == image_token_id, -100)  # every text token counts, image slots never do


@torch.no_grad()
def logits_max_diff(ours, ref, cfg, device):
    """Both implementations on one row in fp32: a large difference means the weights are not the same."""
    ids, px = make_rows(cfg, 1, 16, seed=1)
    ids, px = ids.to(device), px.to(device)
    for model in (ours, ref):
        model.eval()
    a = ours(ids, pixel_values=px)[0]
    b = ref(input_ids=ids, pixel_values=px[:, None]).logits
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# "bf16" or "fp32", set once by main (and by the memory-measuring child) from --precision: the same
# rule as train_sft's, so the benchmark measures the precision the pipeline really trains in.
PRECISION = "bf16"


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16")


def interleaved(runs, cfg):
    """{name: [what each timed call of runs[name]() returned]}.

    Every run is called cfg.warmup times untimed, then the runs take turns, one call each, for
    cfg.repeats rounds: whatever else the machine is doing falls on every contender alike.
    """
    for run in runs.values():
        for _ in range(cfg.warmup):
            run()
    results = {name: [] for name in runs}
    for _ in range(cfg.repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def seconds(fn, device):
    """fn as a run that returns its own wall time."""
    def run():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    return run


def spread(values):
    """(median, min, max) of a list of measurements."""
    return statistics.median(values), min(values), max(values)


# ----------------------------------------------------------------------------------------------
# 1. Training step: forward + backward under autocast


def train_step(model, is_ref, ids, px, targets, device):
    model.zero_grad(set_to_none=True)
    with autocast(device):
        if is_ref:
            loss = model(input_ids=ids, pixel_values=px[:, None], labels=targets).loss
        else:
            loss = model(ids, pixel_values=px, targets=targets)[1]
    loss.backward()
    return loss


def bench_training(ours, ref, cfg, device):
    """{"ours": [tokens/s, ...], "ref": [...], "shape": str} plus MFU on CUDA."""
    mcfg = ours.config
    ids, px = make_rows(mcfg, cfg.train_batch, cfg.seq_len - mcfg.tokens_per_image - 1, seed=2)
    ids, px, targets = ids.to(device), px.to(device), text_targets(ids, mcfg.image_token_id).to(device)
    tokens = ids.numel()
    for model in (ours, ref):
        model.train()
    times = interleaved({"ours": seconds(lambda: train_step(ours, False, ids, px, targets, device), device),
                         "ref": seconds(lambda: train_step(ref, True, ids, px, targets, device), device)}, cfg)
    for model in (ours, ref):
        model.zero_grad(set_to_none=True)
    result = {"shape": f"batch {cfg.train_batch} x {ids.shape[1]} tokens", **{k: [tokens / s for s in v] for k, v in times.items()}}
    if device.type == "cuda":
        # The 6N rule per tower: each parameter costs 6 FLOPs per token it sees, forward and backward;
        # vision parameters see every patch, the rest see the text-side tokens.
        n_vision = sum(p.numel() for p in ours.vision_model.parameters())
        flops = 6 * (n_vision * cfg.train_batch * mcfg.vision.num_patches + (ours.num_params() - n_vision) * tokens) / tokens
        peak = cfg.peak_flops or next((f for k, f in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), 0.0)
        result["mfu"] = {k: [r * flops / peak for r in result[k]] for k in ("ours", "ref")} if peak else None
    return result


# ----------------------------------------------------------------------------------------------
# 2. Decoding: greedy, same prompt and image, every token's arrival time recorded


class Clock:
    """Arrival times of new tokens: a `transformers` streamer (put/end) and our stream callback at once."""

    def __init__(self, skip_first_put):
        self.times, self.skip = [], skip_first_put  # transformers first puts the prompt itself

    def put(self, *_):
        if self.skip:
            self.skip = False
        else:
            self.times.append(time.perf_counter())

    def end(self):
        pass

    __call__ = put  # generate.generate's stream(rows, tokens)


def decode_once(model, is_ref, ids, px, n_new, device):
    """(whole-call seconds, decode-phase seconds per token after the first): one greedy generation."""
    clock = Clock(skip_first_put=is_ref)
    sync(device)
    t0 = time.perf_counter()
    if is_ref:  # as a user calls it: its generate runs under torch.no_grad by itself
        with autocast(device):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px[:, None],
                                 max_new_tokens=n_new, do_sample=False, use_cache=True, streamer=clock)
        n_out = out.shape[1] - ids.shape[1]
    else:
        out = generate(model, ids, px, max_new_tokens=n_new, temperature=0.0, dtype=torch.bfloat16 if PRECISION == "bf16" else None, stream=clock)
        n_out = min(len(r) for r in out)
    sync(device)
    total = time.perf_counter() - t0
    if n_out != n_new or len(clock.times) != n_new:
        raise RuntimeError(f"expected {n_new} new tokens per row, got {n_out} ({len(clock.times)} steps seen)")
    return total, (clock.times[-1] - clock.times[0]) / (n_new - 1)


def bench_decoding(ours, ref, cfg, device, batch):
    """{"ours": {"call": [new tokens/s], "decode": [...]}, "ref": {...}} at one batch size."""
    ids, px = make_rows(ours.config, 1, cfg.prompt_text, seed=3)
    ids, px = ids.repeat(batch, 1).to(device), px.repeat(batch, 1, 1, 1).to(device)  # one prompt, `batch` times
    for model in (ours, ref):
        model.eval()
    runs = interleaved({"ours": lambda: decode_once(ours, False, ids, px, cfg.new_tokens, device),
                        "ref": lambda: decode_once(ref, True, ids, px, cfg.new_tokens, device)}, cfg)
    return {name: {"call": [batch * cfg.new_tokens / total for total, _ in r],
                   "decode": [batch / per_token for _, per_token in r]} for name, r in runs.items()}


# ----------------------------------------------------------------------------------------------
# 3. One DPO step against one SFT step on the same pairs


def preference_batch(cfg, n_pairs, seq_len, seed=4):
    """train_sft.collate's layout, chosen rows then rejected rows: same prompt, different completions."""
    n_text = seq_len - cfg.tokens_per_image - 1
    ids, px = make_rows(cfg, n_pairs, n_text, seed)
    prompt_len = ids.shape[1] - n_text // 2  # the second half of the text is the completion (the chain)
    rejected = ids.clone()
    rejected[:, prompt_len:] = make_rows(cfg, n_pairs, n_text, seed + 1)[0][:, prompt_len:]
    ids = torch.cat([ids, rejected])
    targets = ids.clone()
    targets[:, :prompt_len] = -100
    return {"input_ids": ids, "targets": targets, "attention_mask": torch.ones_like(ids), "pixel_values": px.repeat(2, 1, 1, 1)}


def reference_logps(model, batch, device):
    model.eval()
    with torch.no_grad(), autocast(device):  # as train_dpo.py
        ref = sequence_logps(model, batch).chunk(2)
    model.train()
    return ref


def dpo_step(model, batch, ref, device):
    model.zero_grad(set_to_none=True)
    with autocast(device):
        logps = sequence_logps(model, batch)  # chosen and rejected in one forward
    chosen, rejected = logps.chunk(2)
    loss = dpo_loss(chosen, rejected, ref[0], ref[1], beta=0.1)[0]
    loss.backward()
    return loss


def sft_step(model, batch, device):
    model.zero_grad(set_to_none=True)
    with autocast(device):
        loss = model(batch["input_ids"], pixel_values=batch["pixel_values"], targets=batch["targets"])[1]
    loss.backward()
    return loss


def one_step(kind, model, batch, ref, device):
    return dpo_step(model, batch, ref, device) if kind == "dpo" else sft_step(model, batch, device)


def _rss_kib(field_name):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":"))


def cpu_peak_child(kind, ckpt, batch_file, threads, precision):
    """Run in a fresh process: load the model, then the peak RSS increase (bytes) of one step.

    The reference log-probs are computed before the peak counter is reset, as train_dpo does before
    its steps; the SFT child runs the same forward, so that one-time allocations (thread pools,
    kernel caches) are behind both counters. Linux resets the peak (VmHWM) when "5" is written
    to /proc/self/clear_refs.
    """
    global PRECISION
    PRECISION = precision
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model, batch = VLM.from_pretrained(ckpt), torch.load(batch_file)
    ref = reference_logps(model, batch, device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    one_step(kind, model, batch, ref, device)
    return (_rss_kib("VmHWM") - base) * 1024


def peak_memory(kind, model, batch, ref, ckpt, workdir, device):
    """Peak memory (bytes) one step adds on top of the loaded model."""
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_step(kind, model, batch, ref, device)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # On the CPU, torch's allocations are malloc's: only a fresh process gives a clean peak. A fixed
    # mmap threshold makes every large tensor its own mapping, returned to the OS when freed, so
    # the resident set tracks live tensors instead of malloc's cached free lists.
    batch_file = os.path.join(workdir, "batch.pt")
    torch.save({k: v.cpu() for k, v in batch.items()}, batch_file)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(cpu_peak_child, (kind, ckpt, batch_file, torch.get_num_threads(), PRECISION))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def bench_dpo(ours, ckpt, cfg, device, workdir):
    """{"dpo"/"sft": {"seconds": [...], "peak": [bytes, ...] or None}, "shape": str}."""
    batch = {k: v.to(device) for k, v in preference_batch(ours.config, cfg.dpo_pairs, cfg.seq_len).items()}
    ref = reference_logps(ours, batch, device)
    can_reset_peak = device.type == "cuda" or os.access("/proc/self/clear_refs", os.W_OK)
    ours.train()
    kinds = ("sft", "dpo")
    times = interleaved({k: seconds(lambda k=k: one_step(k, ours, batch, ref, device), device) for k in kinds}, cfg)
    peaks = interleaved({k: lambda k=k: peak_memory(k, ours, batch, ref, ckpt, workdir, device) for k in kinds},
                        replace(cfg, warmup=0)) if can_reset_peak else dict.fromkeys(kinds)
    ours.zero_grad(set_to_none=True)
    shape = f"{cfg.dpo_pairs} pair(s) = {batch['input_ids'].shape[0]} rows x {batch['input_ids'].shape[1]} tokens"
    return {"shape": shape, **{k: {"seconds": times[k], "peak": peaks[k]} for k in kinds}}


# ----------------------------------------------------------------------------------------------
# 4. The last pipeline run, from its logs


def pipeline_times(log_dir):
    """[(stage, seconds or None)] for each JSONL log in log_dir, oldest first; [] when there is none.

    A stage's wall time is the largest elapsed-seconds field its records carry ("wall_s" or
    "elapsed_s"), or else the span of their "time" stamps (seconds since the epoch).
    """
    if not os.path.isdir(log_dir):
        return []
    files = sorted((f for f in os.listdir(log_dir) if f.endswith(".jsonl")), key=lambda f: os.path.getmtime(os.path.join(log_dir, f)))
    stages = []
    for name in files:
        records = []
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        records = [r for r in records if isinstance(r, dict)]
        elapsed = [r[k] for r in records for k in ("wall_s", "elapsed_s") if isinstance(r.get(k), (int, float))]
        stamps = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
        seconds = max(elapsed) if elapsed else (max(stamps) - min(stamps)) if len(stamps) > 1 else None
        stages.append((name.removesuffix(".jsonl"), seconds))
    return stages


# ----------------------------------------------------------------------------------------------
# Report


def machine(device, ours, load):
    if device.type == "cuda":
        hardware = f"GPU {torch.cuda.get_device_name()}"
    else:
        cpu = platform.processor() or "unknown CPU"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        hardware = (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                    f"load average {load[0]:.1f} at the start and {load[1]:.1f} at the end")
    return (f"{hardware}; torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}; "
            f"fp32 master weights, {'bf16 autocast' if PRECISION == 'bf16' else 'fp32 compute'}; {ours.num_params() / 1e6:.1f}M parameters")


def fmt(values, unit="", scale=1.0, digits=1):
    med, lo, hi = (v * scale for v in spread(values))
    return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio(a, b):
    return spread(a)[0] / spread(b)[0]


def ratio_cell(a, b):
    """A table's ratio, e.g. "1.17x (1.08-1.22)": the ratio of the medians, then the range of the
    per-round ratios.

    a[i] and b[i] come from the same round of `interleaved`, run back to back, so a[i] / b[i] is
    what the machine's slow and fast spells disturb least: its range is the ratio's own noise,
    which the ratio of two medians hides.
    """
    per_round = [x / y for x, y in zip(a, b)]
    return f"{ratio(a, b):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def report(cfg, device, ours, max_diff, load, train, decoding, dpo, stages):
    """The markdown tables: speed against transformers, DPO against SFT, pipeline stages."""
    lines = [f"## Performance: preset `{cfg.preset}`, random weights, {device.type}", "",
             f"Machine: {machine(device, ours, load)}.", f"Same weights checked: max |logits difference| in fp32 = {max_diff:.2e}.",
             f"Each figure: {cfg.warmup} warm-up + {cfg.repeats} timed runs, median (min-max). A ratio: the ratio of "
             "the medians (min-max of the ratios within each round, whose two runs were back to back).", "",
             "| measurement | ours | transformers | ours / transformers | target |", "|---|---|---|---|---|",
             f"| training step, tokens/s ({train['shape']}, forward + backward) | {fmt(train['ours'])} | "
             f"{fmt(train['ref'])} | {ratio_cell(train['ours'], train['ref'])} | >= 1.3x on CPU |"]
    if train.get("mfu"):
        lines.append(f"| training step, model FLOPs utilisation | {fmt(train['mfu']['ours'], '%', 100)} | "
                     f"{fmt(train['mfu']['ref'], '%', 100)} | {ratio_cell(train['mfu']['ours'], train['mfu']['ref'])} | - |")
    for batch, d in decoding.items():
        target = ">= 2x on CPU" if batch == 1 else "more than at batch 1"
        lines.append(f"| decode batch {batch}, new tokens/s, decode phase ({cfg.new_tokens} new) | {fmt(d['ours']['decode'])} | "
                     f"{fmt(d['ref']['decode'])} | {ratio_cell(d['ours']['decode'], d['ref']['decode'])} | {target} |")
        lines.append(f"| decode batch {batch}, new tokens/s, whole call with prefill | {fmt(d['ours']['call'])} | "
                     f"{fmt(d['ref']['call'])} | {ratio_cell(d['ours']['call'], d['ref']['call'])} | - |")
    lines += ["", f"One DPO step (reference log-probs precomputed) against one SFT step on the same pairs, ours, {dpo['shape']}:", "",
              "| step | seconds | peak memory added by the step |", "|---|---|---|"]
    peaks = {k: dpo[k]["peak"] for k in ("sft", "dpo")}
    for kind, label in (("sft", "SFT (targets on chosen and rejected rows)"), ("dpo", "DPO (chosen + rejected in one forward)")):
        mem = fmt(peaks[kind], " MiB", 1 / 2**20, 0) if peaks[kind] else "n/a (needs Linux /proc or CUDA)"
        lines.append(f"| {label} | {fmt(dpo[kind]['seconds'], ' s', digits=2)} | {mem} |")
    mem_ratio = f"{ratio_cell(peaks['dpo'], peaks['sft'])} (target <= 1.2x)" if peaks["dpo"] else "n/a"
    lines.append(f"| DPO / SFT | {ratio_cell(dpo['dpo']['seconds'], dpo['sft']['seconds'])} | {mem_ratio} |")
    lines += ["", f"Pipeline wall time per stage, from the last run's logs in `{cfg.out}/logs/`:", ""]
    if stages:
        lines += ["| stage | wall time |", "|---|---|"]
        lines += [f"| {name} | {'not recorded in its log' if s is None else f'{s / 60:.1f} min'} |" for name, s in stages]
    else:
        lines.append("no run found (run `python train_dpo.py` first)")
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    if cfg.quick:
        cfg = replace(cfg, preset="tiny", new_tokens=16)
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if not all(b.strip().isdigit() and int(b) > 0 for b in cfg.decode_batches.split(",")):
        raise SystemExit(f"error: --decode-batches {cfg.decode_batches!r}: give positive integers separated by commas, e.g. 1,16")
    batches = [int(b) for b in cfg.decode_batches.split(",")]
    image_tokens = get_config(cfg.preset).tokens_per_image
    if cfg.seq_len < image_tokens + 3 or cfg.new_tokens < 2:
        raise SystemExit(f"error: --seq-len must leave text after the {image_tokens} image tokens of {cfg.preset} "
                         f"(>= {image_tokens + 3}) and --new-tokens must be >= 2")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    global PRECISION
    PRECISION = resolve_precision(device, cfg.precision)
    load = [os.getloadavg()[0]]  # other processes on the machine: printed beside the figures
    with tempfile.TemporaryDirectory() as workdir:
        print(f"[bench] building random {cfg.preset} weights, saving as Idefics3, loading both ...", flush=True)
        ours, ref, ckpt = build_models(cfg.preset, device, workdir)
        max_diff = logits_max_diff(ours, ref, ours.config, device)
        print(f"[bench] {ours.num_params() / 1e6:.1f}M parameters; max |logits difference| {max_diff:.2e}", flush=True)
        train = bench_training(ours, ref, cfg, device)
        print(f"[bench] training step: ours / transformers = {ratio(train['ours'], train['ref']):.2f}x", flush=True)
        decoding = {}
        for b in batches:
            decoding[b] = d = bench_decoding(ours, ref, cfg, device, b)
            print(f"[bench] decoding at batch {b}: ours / transformers = {ratio(d['ours']['decode'], d['ref']['decode']):.2f}x "
                  f"(decode phase), {ratio(d['ours']['call'], d['ref']['call']):.2f}x (whole call)", flush=True)
        del ref
        dpo = bench_dpo(ours, ckpt, cfg, device, workdir)
        print(f"[bench] DPO step / SFT step: {ratio(dpo['dpo']['seconds'], dpo['sft']['seconds']):.2f}x time", flush=True)
    load.append(os.getloadavg()[0])
    table = report(cfg, device, ours, max_diff, load, train, decoding, dpo, pipeline_times(os.path.join(cfg.out, "logs")))
    print("\n" + table)
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write(os.path.join(cfg.out, "bench.md"), lambda path: Path(path).write_text(table))
    print(f"[bench] written to {os.path.join(cfg.out, 'bench.md')}")
    return table


if __name__ == "__main__":
    main()
