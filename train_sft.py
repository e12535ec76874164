"""Supervised fine-tuning: one readable training loop, and every SFT stage of Insight-V.

Insight-V (Dong et al. 2024, arXiv 2411.14432, Sec. 3.3) fine-tunes two agents from one base MLLM, trained here by
the first stage in the role of LLaVA-NeXT (`--init DIR`: real weights). The reasoning agent writes a long structured
chain; the summary agent answers from the question and a chain that may be flawed. The loop: nanoGPT's train.py plus
gradient accumulation, bf16 / fp16 mixed precision, fp32 master weights, a val loss, exact `--resume`, a JSONL log,
and data parallelism over N GPUs with torchrun (nanoGPT's DDP).

    python data.py --out out/data && python train_sft.py --stage base   # then the other STAGES, in order
    torchrun --standalone --nproc_per_node=4 train_sft.py --stage base  # 4 GPUs: each takes a share of every step
"""

import contextlib
import datetime
import functools
import gc
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import data
from model import PRESETS, VLM, atomic_write, get_config, pixel_shuffle, reading_checkpoint, write_json

# ----------------------------------------------------------------------------------------------
# Stages: each reads an SFT file of data.py, from a fresh model (base) or another stage; `task` re-renders the rows
# for the paper's Table 5 ablations. Epochs and lr are tuned on val (docs/experiments.md); the vision tower is frozen.
# train_dpo.py trains summary and summary-only on a larger set (`--data-file`: the teacher's rows plus the reasoning
# agent's own chains, 1.6x the rows), hence their 2 epochs.

STAGES = {
    "base": dict(data="base.jsonl", init=None, task=None, epochs=3, lr=2e-3,
                 about="a general VLM from scratch: scene descriptions and direct answers"),
    "reasoning": dict(data="reasoning_sft.jsonl", init="base", task=None, epochs=8, lr=1e-3,
                      about="the reasoning agent: image + question -> chain only"),
    "summary": dict(data="summary_sft.jsonl", init="base", task=None, epochs=2, lr=1e-3,
                    about="the summary agent: image + question + chain (right or flawed) -> answer"),
    "vanilla": dict(data="reasoning_sft.jsonl", init="base", task="vanilla", epochs=8, lr=1e-3,
                    about="ablation: one model writes the chain and then the answer in one response"),
    "summary-only": dict(data="summary_sft.jsonl", init="base", task="summary_only", epochs=2, lr=1e-3,
                         about="ablation: the summary agent trained without chains"),
}
SPLIT_COST = 512  # a forward and backward pass's fixed cost, in tokens, on a 2-core CPU (docs/experiments.md)
STAGE_DONE = "stage.json"  # the marker of a finished stage, with its summary


def stage_dir(out, stage):
    """Where a stage's checkpoint lives (other scripts find the agents here)."""
    return os.path.join(out, stage)


@dataclass
class TrainConfig:
    stage: str = data.option("base", "what to train", choices=list(STAGES))
    data_file: str = data.option(None, "train on this JSONL of OUT/data instead of the stage's (see train_dpo.py)")
    out: str = data.option("out", "run directory: data in OUT/data, checkpoints in OUT/<stage>")
    init: str = data.option(None, "start from this checkpoint, not the stage's default")
    preset: str = data.option("tiny", "model shape from scratch", choices=list(PRESETS))
    epochs: float = data.option(None, "passes over the data (default: the stage's)", type=float, above=0)
    max_steps: int = data.option(0, "optimizer steps; 0 = from --epochs", min=0)
    batch_size: int = data.option(32, "rows per step (x --grad-accum) and at most per micro-batch", min=1)
    grad_accum: int = data.option(1, "a step is --batch-size x --grad-accum rows, in micro-batches of at most "
                                     "--batch-size rows, shared by the torchrun processes", min=1)
    lr: float = data.option(None, "peak lr of the language model (default: the stage's)", type=float, above=0)
    lr_vision: float = data.option(None, "peak lr of the vision tower (default: --lr)", type=float, above=0)
    lr_projector: float = data.option(None, "peak lr of the projector (default: --lr)", type=float, above=0)
    weight_decay: float = data.option(0.1, "AdamW weight decay, on matrices only", min=0)
    warmup_steps: float = data.option(0.05, "linear warmup: steps, or a fraction of all steps if < 1", min=0)
    min_lr_ratio: float = data.option(0.1, "cosine decay ends at this fraction of the peak lr", min=0, max=1)
    grad_clip: float = data.option(1.0, "clip the global grad norm to this; 0 = off", min=0)
    precision: str = data.option("auto", "auto = bf16 (fp16 on older GPUs; fp32 on a CPU without bf16 arithmetic)",
                                 choices=["auto", "bf16", "fp16", "fp32"])
    device: str = data.option("auto", "auto, cpu, cuda, cuda:1, ...")
    eval_every: int = data.option(100, "validation loss every N steps (and at the end); 0 = end only", min=0)
    save_every: int = data.option(200, "checkpoint every N steps (and at the end); 0 = end only", min=0)
    resume: bool = data.option(False, "continue from OUT/<stage>/train_state.pt")
    compile: bool = data.option(False, "torch.compile the model (worth it on GPU)")
    freeze_vision: bool = data.option(True, "train only the projector and the LM (see STAGES)")
    vision_pretrain_steps: int = data.option(100, "from scratch only: vision tower pretraining steps before the "
                                                  "stage (pretrain_vision); 0 = off", min=0)
    seed: int = data.option(1337, "seeds the initial weights, the val split and the data order")
    max_len: int = data.option(1024, "skip samples longer than this many tokens", min=1)
    split_cost: int = data.option(SPLIT_COST, "cut each step into micro-batches of similar length where that saves "
                                              "more pad tokens than this per cut (split_by_length)", min=0)
    val_fraction: float = data.option(0.05, "fraction of the images held out for the validation loss", min=0, max=1)



# ----------------------------------------------------------------------------------------------
# Rows into batches: conversation, loss mask and image come from data.py, as when the agents are prompted.

def encode_row(row, tok, cfg, image_root, task=None):
    """A JSONL row -> {ids, targets (-100 outside the loss mask), image}; cfg is the model's VLMConfig."""
    messages = data.task_messages(task or row["task"], row["question"], chain=row.get("chain"), answer=row["answer"])
    ids, mask = data.render_conversation(tok, messages, cfg.tokens_per_image)
    if ids.count(cfg.image_token_id) != cfg.tokens_per_image:  # VLM.forward does not count them while training
        raise ValueError(f"row {row.get('id')!r} renders {ids.count(cfg.image_token_id)} image tokens, not "
                         f"{cfg.tokens_per_image}: the tokenizer's <image> is not the model's image_token_id")
    ids = torch.tensor(ids, dtype=torch.long)  # (T,)
    image = data.load_image(os.path.join(image_root, row["image"]), cfg.vision.image_size)  # (3, H, W)
    return {"ids": ids, "targets": ids.masked_fill(torch.tensor(mask) == 0, -100), "image": image}  # -100: not learned


def collate(examples, pad_id):
    """Examples -> one batch, right-padded: the causal mask hides the pads, and their targets are -100."""
    input_ids = pad_sequence([ex["ids"] for ex in examples], batch_first=True, padding_value=pad_id)  # (B, T)
    targets = pad_sequence([ex["targets"] for ex in examples], batch_first=True, padding_value=-100)  # (B, T)
    attention_mask = pad_sequence([torch.ones_like(ex["ids"]) for ex in examples], batch_first=True)  # (B, T)
    pixel_values = torch.stack([ex["image"] for ex in examples])  # (B, 3, H, W): one image per sample
    # Counted on the host, so no training step reads them back from a GPU; targets shift inside the model, so [:, 1:].
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "n_targets": int((targets[:, 1:] != -100).sum()), "n_tokens": int(attention_mask.sum())}


def split_by_length(rows, lengths, max_rows, cost=SPLIT_COST):
    """A step's rows (indices) sorted by length and cut into micro-batches of at most max_rows, where the cuts give the
    fewest padded tokens plus `cost` per micro-batch (a forward pass's fixed cost, in tokens): a dynamic program over
    the cut points. The step's gradient is their token-weighted sum (train_step), whatever the cuts."""
    rows = sorted(rows, key=lengths.__getitem__)
    best, start_of = [0] + [math.inf] * len(rows), [0] * (len(rows) + 1)  # best[e]: cost of rows[:e]
    for end in range(1, len(rows) + 1):
        for start in range(max(0, end - max_rows), end):  # rows[start:end], padded to its last (longest) row
            c = best[start] + (end - start) * lengths[rows[end - 1]] + cost
            if c < best[end]:
                best[end], start_of[end] = c, start
    batches, end = [], len(rows)
    while end:
        batches.append(rows[start_of[end]:end])
        end = start_of[end]
    return batches[::-1]


def step_batches(examples, step, batch_size, grad_accum, seed, cost=SPLIT_COST, processes=1):
    """The micro-batches of optimizer step `step`: its batch_size x grad_accum rows of a seeded shuffle of the epoch
    (seed + epoch, so --resume recomputes them from the step), cut by length (split_by_length) into micro-batches of
    at most batch_size rows, and of at most 1 / processes of the step's rows, so that each torchrun process gets one
    (unless the step has fewer rows than processes)."""
    rows = batch_size * grad_accum
    epoch, i = divmod(step, math.ceil(len(examples) / rows))  # i: the step within its epoch
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
    mine = order[i * rows:(i + 1) * rows].tolist()
    lengths, max_rows = [len(ex["ids"]) for ex in examples], min(batch_size, max(1, len(mine) // processes))
    return [[examples[j] for j in batch] for batch in split_by_length(mine, lengths, max_rows, cost)]


# ----------------------------------------------------------------------------------------------
# Device and mixed precision

def resolve_device(name):
    """'auto' -> CUDA if there is one, else the CPU; every script comes here, so here fp32 matmuls get TF32 on a GPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here; use --device cpu (or auto)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's documented TF32 switch (allow_tf32 is legacy)
    return device


@functools.cache
def cpu_flags(path="/proc/cpuinfo"):
    """The feature flags the CPU reports in /proc/cpuinfo (none where there is no such file or line: not Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    line = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)  # x86 says flags, Arm says Features
    return frozenset(line[1].split() if line else ())


def cpu_has_bf16(flags, capability):
    """Whether a CPU computes in bf16 natively, from what it reports: AVX512-BF16 or AMX with torch's AVX512 kernels on
    x86, the BF16 feature on Arm. Elsewhere torch emulates bf16, 10-400x slower than fp32 (docs/experiments.md)."""
    return (bool(flags & {"avx512_bf16", "amx_bf16"}) and capability == "AVX512") or "bf16" in flags


@functools.cache
def announce(device, choice, why):
    """Print the choice of --precision auto once per script and device."""
    print0(f"[precision] auto on {device}: {choice} ({why})")


def resolve_precision(device, precision):
    """'auto' -> bf16 on GPUs of capability 8.0+ (is_bf16_supported() also counts emulation), else fp16; on the CPU
    bf16 where it computes in bf16 natively (cpu_has_bf16), else fp32."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            choice = "bf16" if capability >= (8, 0) else "fp16"
            announce(str(device), choice, f"compute capability {capability[0]}.{capability[1]}")
            return choice
        capability = torch.backends.cpu.get_cpu_capability()
        choice = "bf16" if device.type == "cpu" and cpu_has_bf16(cpu_flags(), capability) else "fp32"
        announce(device.type, choice, f"torch's CPU kernels {capability}, bf16 arithmetic "
                                      f"{'reported' if choice == 'bf16' else 'not reported'} by the CPU")
        return choice
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 here")
    return precision


def autocast(device, precision):
    """Mixed precision: matmuls in bf16 / fp16; weights, optimizer state, norms and the loss stay fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision))
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def make_scaler(device, precision):
    """A GradScaler, active only for fp16 (whose gradients underflow unless the loss is scaled up first)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=resolve_precision(device, precision) == "fp16")


# ----------------------------------------------------------------------------------------------
# Data parallelism. `torchrun --standalone --nproc_per_node=N script.py ...` starts N copies of a training script, one
# per GPU (gloo between CPU processes): each holds the whole model and runs its share of every step's rows, and DDP
# adds up their gradients in backward, so a step is the one-process step. Rank 0 alone writes files and prints.
# Without torchrun (no WORLD_SIZE) there is no process group, and every helper below leaves the code as it was.

def setup_distributed(device_name):
    """-> (rank, world size, device) of this process: (0, 1, the device) without torchrun (no WORLD_SIZE), with no
    process group. Under torchrun: one group (NCCL between GPUs, gloo on the CPU) and GPU LOCAL_RANK for this process.
    Called again, as when train_dpo.py trains several stages, it returns the same."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device_name}: under torchrun each process takes GPU LOCAL_RANK; pass --device "
                             f"cuda (or auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # "cuda" now means this GPU, in every later call
    if not dist.is_initialized():
        # The others wait in a collective while rank 0 alone builds data or evaluates: an hour, not NCCL's 10 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    """Leave the process group at the end of a script run by torchrun (nothing without it)."""
    if dist.is_initialized():
        gc.collect()  # DDP wrappers sit in reference cycles that hold the group: gloo can abort if they outlive it
        dist.destroy_process_group()


def distributed():
    """(rank, world size) of this process: (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*args):
    """print, on rank 0 alone."""
    if distributed()[0] == 0:
        print(*args)


def data_parallel(model):
    """The model in DDP under torchrun (it starts every process from rank 0's weights and averages the gradients over
    the processes in backward), else the model itself. Wrap it after freezing: DDP syncs what requires grad then."""
    if distributed()[1] == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(tensor):
    """The tensor summed over the processes (itself without torchrun); stack numbers to send them in one call."""
    if distributed()[1] > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj):
    """[process 0's obj, process 1's, ...] on every process ([obj] without torchrun); obj: anything picklable."""
    world = distributed()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone, as for files it writes; the others wait for it and get its result too."""
    rank, world = distributed()
    if world == 1:
        return fn(*args, **kwargs)
    out = [fn(*args, **kwargs) if rank == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]


# ----------------------------------------------------------------------------------------------
# The learning-rate schedule, the optimizer and one training step

def lr_lambda(step, warmup, total, min_ratio):
    """The lr multiplier at step `step` (from 0): linear warmup, then cosine down to min_ratio (nanoGPT's get_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@functools.cache
def matmul_peak(device, precision):
    """FLOP/s of a 1024^3 (CPU) or 8192^3 (GPU) matmul in the training dtype, best of 10: the peak that a stage's share
    is taken against (what this device gives one large dense product, not the datasheet's number)."""
    device, n = torch.device(device), 8192 if torch.device(device).type == "cuda" else 1024
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision), torch.float32)
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # not random: the probe leaves the RNG as it was
    best = float("inf")
    for _ in range(11):  # the first is a warm-up
        start = time.perf_counter()
        (a @ a).sum().item()  # .item(): waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops(model, tokens, images):
    """A training step's model FLOPs (Kaplan et al.'s estimate, nanoGPT's estimate_mfu without attention): per weight
    and input, 2 forward and 4 more backward if it trains; text weights see the real tokens, vision weights the
    image patches."""
    vision = {id(p) for p in model.vision_model.parameters()}
    patches = images * (model.config.vision.image_size // model.config.vision.patch_size) ** 2
    return sum((6 if p.requires_grad else 2) * p.numel() * (patches if id(p) in vision else tokens)
               for p in model.parameters())


def make_optimizer(model, cfg):
    """AdamW, decay on matrices only and one peak lr per part (fused on CUDA: VLM.configure_optimizers)."""
    return model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.lr_vision or cfg.lr, cfg.lr_projector or cfg.lr,
                                      freeze_vision=cfg.freeze_vision)


def to_device(batch, device):
    """The tensors but attention_mask (the causal mask hides right pads, and SDPA takes its fused causal path) on the
    device; on CUDA the copies come from pinned memory and do not block, so they overlap the GPU's work."""
    cuda = device.type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda)
            for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}


def optimizer_step(model, optimizer, scaler, max_norm, metrics, check=None):
    """Unscale and clip; read `metrics` (scalar tensors) and the grad norm in one transfer (a GPU runs ahead until then)
    for `check`, which may raise before the weights change; step and free the gradients -> {name: float}."""
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    values = torch.stack([t.detach().float() for t in (*metrics.values(), grad_norm)]).tolist()
    out = dict(zip([*metrics, "grad_norm"], values))
    if check is not None:
        check(out)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as we can
    return out


def halt_if_diverged(m, scaler, where, kept, device, precision):
    """optimizer_step's check for SFT and DPO: a NaN / inf loss or grad norm raises (fp16's scaler skips overflowed
    steps itself, so there only the loss counts); fp32 is suggested only when the run does not already use it."""
    if math.isfinite(m["loss"]) and (scaler.is_enabled() or math.isfinite(m["grad_norm"])):
        return
    fix = "a lower --lr" + ("" if resolve_precision(device, precision) == "fp32" else " or --precision fp32")
    raise FloatingPointError(f"loss {m['loss']:.4g}, grad norm {m['grad_norm']:.4g} at {where}: training halted; "
                             f"{kept}; try {fix}")


def train_step(forward, scaler, batches, device, precision):
    """Backward over a step's micro-batches, each weighted by its share of target tokens (= one big batch) -> loss.
    Under torchrun process r runs micro-batches r, r + N, ... (forward is in DDP), and the loss is summed over all."""
    rank, world = distributed()
    total, step_targets = 0, sum(b["n_targets"] for b in batches)
    # An epoch's last step may have fewer micro-batches than processes: DDP needs every process in every backward, so
    # a process without one runs the first with weight 0.
    mine = [(b, b["n_targets"]) for b in batches[rank::world]] or [(batches[0], 0)]
    for i, (batch, n) in enumerate(mine):
        batch = to_device(batch, device)
        if world > 1:  # DDP syncs the gradients once a step, in the backward of the process's last micro-batch
            forward.require_backward_grad_sync = i == len(mine) - 1
        with autocast(device, precision):
            _, loss = forward(batch["input_ids"], batch["pixel_values"], targets=batch["targets"])
        weighted = loss * (n / step_targets)
        scaler.scale(weighted * world).backward()  # x N: DDP's mean over the N processes is then their sum
        total = total + weighted.detach()
    return all_reduce_sum(total)


# ----------------------------------------------------------------------------------------------
# The loop, with its validation loss and the checkpoints that --resume continues exactly

@torch.no_grad()
def evaluate(model, examples, cfg, device, pad_id):
    """Mean loss per target token over all examples (not a mean of batch means); under torchrun each process scores
    every N-th batch, and the sums are added up."""
    rank, world = distributed()
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # float64, as Python floats sum
    for i in range(rank * cfg.batch_size, len(examples), world * cfg.batch_size):
        batch = collate(examples[i:i + cfg.batch_size], pad_id)
        n, batch = batch["n_targets"], to_device(batch, device)
        with autocast(device, cfg.precision):
            _, loss = model(batch["input_ids"], batch["pixel_values"], targets=batch["targets"])
        total, count = total + loss.double() * n, count + n
    model.train()
    total, count = all_reduce_sum(torch.stack([total, total.new_tensor(count)])).tolist()
    return total / count if count else float("nan")


def save_checkpoint(model, optimizer, scaler, step, cfg, out_dir):
    """save_pretrained, plus train_state.pt for --resume with its own weights: a crash never mixes two steps."""
    model.save_pretrained(out_dir)
    device = next(model.parameters()).device  # the training GPU's generator only: a resume may see fewer GPUs
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "config": asdict(cfg), "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    def write(path):  # through a file object: torch.save rejects the dot-named path atomic_write gives
        with open(path, "wb") as f:
            torch.save(state, f)
    atomic_write(os.path.join(out_dir, "train_state.pt"), write)


def load_train_state(model, optimizer, scaler, cfg, out_dir):
    """Restore a train_state.pt in place -> the number of optimizer steps already done."""
    path = os.path.join(out_dir, "train_state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: nothing to resume; run without --resume")
    with reading_checkpoint(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("batch_size", "grad_accum", "seed", "freeze_vision"):  # the data order and the optimizer's groups
        if state["config"].get(key) != getattr(cfg, key):
            raise ValueError(f"{path} was trained with --{key.replace('_', '-')} {state['config'].get(key)}, "
                             f"not {getattr(cfg, key)}: resume with the same value")
    for part, key in ((model, "model"), (optimizer, "optimizer"), (scaler, "scaler")):
        part.load_state_dict(state[key])
    torch.set_rng_state(state["rng_cpu"])
    device = next(model.parameters()).device
    if isinstance(state["rng_cuda"], torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["step"]


def train_loop(model, train_examples, val_examples, cfg, out_dir, log_path, desc):
    """Train `model` in place; checkpoints to out_dir, metrics to log_path -> a summary. Ctrl-C saves first. Under
    torchrun every process trains (train_step) and rank 0 alone writes the log and checkpoints."""
    device, master = resolve_device(cfg.device), distributed()[0] == 0
    model.to(device).train()
    pad_id = data.special_ids(model.tokenizer)["pad"] if model.tokenizer is not None else 0
    optimizer = make_optimizer(model, cfg)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = make_scaler(device, cfg.precision)
    forward = torch.compile(model, dynamic=True) if cfg.compile else model  # dynamic: each batch has its own length
    forward = data_parallel(forward)  # after make_optimizer, which froze what it does not train
    steps_per_epoch = math.ceil(len(train_examples) / (cfg.batch_size * cfg.grad_accum))
    val_examples = sorted(val_examples, key=lambda ex: len(ex["ids"]))  # fewer pads; the val loss is a sum anyway
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else round(cfg.warmup_steps * total)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    done, elapsed_before = 0, 0.0  # elapsed_before: wall seconds of the run(s) this one resumes
    if cfg.resume:
        done = load_train_state(model, optimizer, scaler, cfg, out_dir)
        if done >= total:  # nothing left to train, so no losses to report
            raise ValueError(f"{out_dir}/train_state.pt is at step {done} of {total}: nothing to resume; run without "
                             f"--resume to train again, or resume with more --max-steps / --epochs")
        if master and os.path.exists(log_path):  # drop lines of steps after the checkpoint (a crash may log them)
            kept = [line for line in Path(log_path).read_text().splitlines(True) if json.loads(line)["step"] <= done]
            atomic_write(log_path, lambda p: Path(p).write_text("".join(kept)))
            elapsed_before = json.loads(kept[-1]).get("elapsed_s", 0.0) if kept else 0.0
    elif master and os.path.exists(log_path):
        os.remove(log_path)
    flops_peak = matmul_peak(device, cfg.precision) * distributed()[1]  # every process's device
    saved, train_loss, val_loss, t_start = done, float("nan"), float("nan"), time.time()
    tokens, padded, images = 0, 0, 0  # real tokens, tokens computed (with the pads), images, since t_start
    bar = tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True, disable=not master)
    try:
        while done < total:
            scale = lr_lambda(done, warmup, total, cfg.min_lr_ratio)
            for group, peak in zip(optimizer.param_groups, peak_lrs):
                group["lr"] = peak * scale
            # The whole step, on every process: it counts the step's tokens, and train_step picks its micro-batches.
            batches = [collate(rows, pad_id)
                       for rows in step_batches(train_examples, done, cfg.batch_size, cfg.grad_accum, cfg.seed,
                                                cfg.split_cost, distributed()[1])]
            tokens += sum(b["n_tokens"] for b in batches)
            padded += sum(b["input_ids"].numel() for b in batches)
            images += sum(len(b["pixel_values"]) for b in batches)
            loss = train_step(forward, scaler, batches, device, cfg.precision)
            kept = (f"the last good checkpoint (step {saved}) is in {out_dir}" if saved or cfg.resume else
                    "no checkpoint was saved before it")  # a resumed run's first checkpoint counts, even at step 0
            m = optimizer_step(model, optimizer, scaler, cfg.grad_clip or float("inf"), {"loss": loss},
                               lambda m: halt_if_diverged(m, scaler, f"step {done + 1}", kept, device, cfg.precision))
            train_loss, done, seconds = m["loss"], done + 1, time.time() - t_start
            # Throughput counts real tokens only; pad_share is the part of the computed tokens that were pads.
            record = {"step": done, "loss": train_loss, "lr": cfg.lr * scale, "grad_norm": m["grad_norm"],
                      "tok_s": tokens / seconds, "pad_share": 1 - tokens / padded,
                      "peak_share": model_flops(model, tokens, images) / seconds / flops_peak}
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:
                val_loss = record["val_loss"] = evaluate(model, val_examples, cfg, device, pad_id)
            record["elapsed_s"] = elapsed_before + time.time() - t_start  # the stage's wall time, across --resume
            if master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", lr=f"{record['lr']:.1e}",
                            tok_s=f"{record['tok_s']:.0f}", pad=f"{record['pad_share']:.1%}")
            if (cfg.save_every and done % cfg.save_every == 0) or done == total:
                on_rank0(save_checkpoint, model, optimizer, scaler, done, cfg, out_dir)  # the others wait for it
                saved = done
    except KeyboardInterrupt:
        if master:  # every process holds the same weights
            save_checkpoint(model, optimizer, scaler, done, cfg, out_dir)  # gradients of a half-done step are dropped
        bar.close()
        print0(f"interrupted: saved step {done}/{total} to {out_dir}; continue with --resume")
        raise
    bar.close()
    wall = time.time() - t_start
    return {"steps": done, "wall_s": wall, "train_loss": train_loss, "val_loss": val_loss,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0, "pad_share": 1 - tokens / max(padded, 1),
            "peak_share": model_flops(model, tokens, images) / wall / flops_peak if wall > 0 else 0.0}


# ----------------------------------------------------------------------------------------------
# The stages

# Vision pretraining, this world's SigLIP: on a random tower the base model read shape at chance (docs/experiments.md),
# so linear heads on each image token (one per grid cell) first learn its cell's shape, colour and size from base.jsonl.
VISION_LABELS = {"shape": list(data.SHAPES), "color": list(data.COLORS), "size": list(data.SIZES)}


def cell_labels(description):
    """A scene description -> (cells, 3): per cell 1 + the index of its shape, colour and size; 0 if empty."""
    labels = torch.zeros(len(data.CELLS), len(VISION_LABELS), dtype=torch.long)
    for o in data.read_description(description):
        labels[data.CELLS.index(o["cell"])] = torch.tensor([1 + VISION_LABELS[k].index(o[k]) for k in VISION_LABELS])
    return labels


def pretrain_vision(model, rows, val_rows, image_root, cfg, steps, batch_size=64, lr=1e-3):
    """Train model.vision_model in place on describe rows -> held-out accuracy per label (None: skipped)."""
    mcfg, device = model.config, resolve_device(cfg.device)
    if mcfg.tokens_per_image != len(data.CELLS) or not rows:
        print0(f"[train_sft] vision pretraining skipped: it needs describe rows and one image token per "
               f"grid cell ({len(data.CELLS)}; this model has {mcfg.tokens_per_image})")
        return None
    def load(rs):  # -> images (N, 3, H, W), labels (N, cells, 3)
        images = [data.load_image(os.path.join(image_root, r["image"]), mcfg.vision.image_size) for r in rs]
        return torch.stack(images), torch.stack([cell_labels(r["answer"]) for r in rs])
    images, labels = (t.to(device) for t in load(rows))  # moved once, not every step
    width = mcfg.vision.hidden_size * mcfg.scale_factor**2  # one pixel-shuffled token per cell
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 1 + len(v)) for v in VISION_LABELS.values()]).to(device)
    vision = model.vision_model.to(device).train()
    optimizer = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    scaler = make_scaler(device, cfg.precision)  # fp16 gradients underflow without loss scaling, here too
    def logits(x):  # (N, 3, H, W) -> one (N, cells, classes) per label
        with autocast(device, cfg.precision):
            tokens = pixel_shuffle(vision(x.to(device)), mcfg.scale_factor)  # (N, cells, width)
        return [head(tokens.float()) for head in heads]
    for _ in tqdm(range(steps), desc="vision pretraining", leave=False, disable=distributed()[0] > 0):
        idx = torch.randint(len(rows), (batch_size,), generator=generator).to(device)
        y = labels[idx]  # (B, cells, 3)
        loss = sum(F.cross_entropy(out.flatten(0, 1), y[..., k].flatten()) for k, out in enumerate(logits(images[idx])))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)  # the frozen tower's last gradients would join every later step's clip norm
    vision.eval()
    with torch.no_grad():
        x, y = load(val_rows) if val_rows else (images[:batch_size], labels[:batch_size])
        accuracy = {k: (out.argmax(-1).cpu() == y[..., i].cpu()).float().mean().item()
                    for i, (k, out) in enumerate(zip(VISION_LABELS, logits(x)))}
    print0(f"[train_sft] vision tower pretrained: {steps} steps on the cells of {len(rows)} scene descriptions; "
           f"held-out cell accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return accuracy


def run_stage(stage, cfg):
    """`python train_sft.py --stage STAGE` -> the checkpoint dir; cfg's None fields take the stage's defaults. Under
    torchrun every process encodes the rows and trains; rank 0 writes the checkpoint, and the others wait for it."""
    rank = distributed()[0]
    spec = STAGES[stage]
    cfg = replace(cfg, stage=stage, epochs=spec["epochs"] if cfg.epochs is None else cfg.epochs,
                  lr=spec["lr"] if cfg.lr is None else cfg.lr)
    data_dir, out_dir = os.path.join(cfg.out, "data"), stage_dir(cfg.out, stage)
    if cfg.resume and os.path.isfile(os.path.join(out_dir, STAGE_DONE)):  # resuming would overwrite its summary
        raise ValueError(f"{out_dir} is already finished ({STAGE_DONE} is there): nothing to resume; run without "
                         f"--resume to train it again")
    path = os.path.join(data_dir, cfg.data_file or spec["data"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `python data.py --out {data_dir}` first")
    init = cfg.init or (stage_dir(cfg.out, spec["init"]) if spec["init"] else None)
    if init and not os.path.isfile(os.path.join(init, "config.json")):
        out_flag = "" if cfg.out == "out" else f" --out {cfg.out}"
        command = f"run `python train_sft.py --stage {spec['init']}{out_flag}` first"
        raise FileNotFoundError(f"{init} not found: {'pass an existing checkpoint' if cfg.init else command}")
    data.writable_dir(out_dir)
    data.writable_dir(os.path.join(cfg.out, "logs"))
    torch.manual_seed(cfg.seed)
    if init:
        model = VLM.from_pretrained(init)
        if model.tokenizer is None:
            raise FileNotFoundError(f"{init} has no tokenizer.json: the rows cannot be tokenized")
    else:
        tok = data.load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
        model = VLM(get_config(cfg.preset, vocab_size=tok.get_vocab_size(),
                               image_token_id=data.special_ids(tok)["image"]))
        model.tokenizer = tok
    print0(f"[train_sft] {stage}: {spec['about']}; {model.num_params() / 1e6:.1f}M params from "
           f"{init or 'scratch (' + cfg.preset + ')'}, data {path} -> {out_dir}")
    # Every row is encoded once, up front (the world is small); held-out images make the val set: none is trained on.
    task, required = spec["task"], ("image", "question", "answer") + (() if spec["task"] else ("task",))
    examples, skipped, images = [], 0, {}
    for row in tqdm(data.read_jsonl(path, required=required), desc=f"encoding {os.path.basename(path)}", leave=False,
                    disable=rank > 0):
        ex = encode_row(row, model.tokenizer, model.config, data_dir, task)
        if not (ex["targets"] != -100).any():
            raise ValueError(f"{path}: row {row.get('id')!r} has no assistant text to learn "
                             f"(task {task or row['task']!r} with chain {row.get('chain')!r})")
        if len(ex["ids"]) > cfg.max_len:  # a cut-off target would teach the model to end mid-sentence
            skipped += 1
            continue
        ex["image"] = images.setdefault(row["image"], ex["image"])  # rows of one scene share one tensor
        examples.append((row["image"], ex))
    if skipped:
        print0(f"{path}: skipped {skipped} rows longer than --max-len {cfg.max_len}")
    if not examples:
        raise ValueError(f"{path}: no training rows: {skipped} dropped by --max-len {cfg.max_len}")
    names = sorted(images)
    n_val = min(len(names) - 1, max(1, round(cfg.val_fraction * len(names)))) if cfg.val_fraction > 0 else 0
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held_out = {names[j] for j in order[:n_val]}
    train = [ex for name, ex in examples if name not in held_out]
    val = [ex for name, ex in examples if name in held_out]
    if not init and cfg.vision_pretrain_steps and not cfg.resume:  # resumed: the tower is in the checkpoint
        describe = [r for r in data.read_jsonl(path) if r.get("task") == "describe"]
        pretrain_vision(model, [r for r in describe if r["image"] not in held_out],
                        [r for r in describe if r["image"] in held_out], data_dir, cfg, cfg.vision_pretrain_steps)
    if rank == 0:
        Path(out_dir, STAGE_DONE).unlink(missing_ok=True)  # an earlier run's marker must not outlive this one
    summary = train_loop(model, train, val, cfg, out_dir, os.path.join(cfg.out, "logs", f"{stage}.jsonl"), desc=stage)
    print0(f"[train_sft] {stage}: {summary['steps']} steps in {summary['wall_s']:.0f}s, train loss "
           f"{summary['train_loss']:.3f}, val loss {summary['val_loss']:.3f} ({len(train)} train / {len(val)} "
           f"val rows), {summary['tokens_per_s']:.0f} real tokens/s ({summary['pad_share']:.1%} padding, "
           f"{summary['peak_share']:.0%} of this device's matmul peak) -> {out_dir}")
    marker = {"stage": stage, **summary, "config": asdict(cfg)}  # written last: without it, the run was interrupted
    on_rank0(atomic_write, os.path.join(out_dir, STAGE_DONE), lambda f: write_json(marker, f))  # all wait for it
    return out_dir


def main(argv=None):
    cfg = data.parse_config(TrainConfig, argv, description=__doc__.strip().splitlines()[0])
    try:
        setup_distributed(cfg.device)  # a process group under torchrun; nothing without it
        run_stage(cfg.stage, cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(130)
    cleanup_distributed()


if __name__ == "__main__":
    main()
