"""Supervised fine-tuning: one readable training loop, and every SFT stage of Insight-V.

Insight-V (Dong et al. 2024, arXiv 2411.14432, Sec. 3.3) fine-tunes two agents from one base MLLM (here the first
stage, or `--init DIR`): the reasoning agent writes a long structured chain; the summary agent answers from the question
and a chain that may be flawed. The loop: nanoGPT's train.py plus gradient accumulation, bf16 / fp16 mixed precision,
a val loss, exact `--resume`, a JSONL log, and data parallelism over N GPUs with torchrun (nanoGPT's DDP).

    python data.py --out out/data && python train_sft.py --stage base   # then the other STAGES, in order
    torchrun --standalone --nproc_per_node=4 train_sft.py --stage base  # 4 GPUs: each takes a share of every step
"""

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import checkpoint
import common
import data
import world
from model import PRESETS, VLM, get_config, pixel_shuffle

# ----------------------------------------------------------------------------------------------
# Stages: each reads an SFT file of data.py, from a fresh model (base) or another stage; `task` re-renders the rows
# for the paper's Table 5 ablations. Epochs and lr are chosen on val (docs/experiments.md); the vision tower is frozen.
# The summary stages train on train_dpo.py's larger set (`--data-file`: the teacher's rows and the agent's own chains).

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
    # The DPO rounds' controls (train_dpo.build_controls), at the lr the reasoning stage's schedule ended on.
    "reasoning-more": dict(data="reasoning_sft.jsonl", init="reasoning", task=None, epochs=8, lr=1e-4, after_rl=True,
                           about="control: the reasoning agent trained on, on its own set"),
    "reasoning-teacher-hard": dict(data="reasoning_teacher_hard.jsonl", init="reasoning", task=None, epochs=8,
                                   lr=1e-4, after_rl=True, about="control: the reasoning agent trained on the "
                                   "teacher's chains for hard questions"),
}
SPLIT_COST = 512  # a forward and backward pass's fixed cost, in tokens, on a 2-core CPU (docs/experiments.md)


@dataclass
class TrainConfig:
    stage: str = common.option("base", "what to train", choices=[s for s, v in STAGES.items() if not v.get("after_rl")])
    data_file: str = common.option(None, "train on this JSONL of OUT/data instead of the stage's (see train_dpo.py)")
    out: str = common.option("out", "run directory: data in OUT/data, checkpoints in OUT/<stage>", compared=False)
    init: str = common.option(None, "start from this checkpoint, not the stage's default")
    preset: str = common.option("tiny", "model shape from scratch", choices=list(PRESETS))
    epochs: float = common.option(None, "passes over the data (default: the stage's)", type=float, above=0)
    max_steps: int = common.option(0, "optimizer steps; 0 = from --epochs", min=0)
    batch_size: int = common.option(32, "rows per step (x --grad-accum) and at most per micro-batch", min=1)
    grad_accum: int = common.option(1, "a step is --batch-size x --grad-accum rows, in micro-batches of at most "
                                    "--batch-size rows, shared by the torchrun processes", min=1)
    lr: float = common.option(None, "peak lr of the language model (default: the stage's)", type=float, above=0)
    lr_vision: float = common.option(None, "peak lr of the vision tower (default: --lr)", type=float, above=0)
    lr_projector: float = common.option(None, "peak lr of the projector (default: --lr)", type=float, above=0)
    weight_decay: float = common.option(0.1, "AdamW weight decay, on matrices only", min=0)
    warmup_steps: float = common.option(0.05, "linear warmup: steps, or a fraction of all steps if < 1", min=0)
    min_lr_ratio: float = common.option(0.1, "cosine decay ends at this fraction of the peak lr", min=0, max=1)
    grad_clip: float = common.option(1.0, "clip the global grad norm to this; 0 = off", min=0)
    precision: str = common.option("auto", "auto = bf16 (fp16 on older GPUs; fp32 on a CPU without bf16 arithmetic)",
                                   choices=["auto", "bf16", "fp16", "fp32"])
    device: str = common.option("auto", "auto, cpu, cuda, cuda:1, ...", compared=False)
    eval_every: int = common.option(100, "validation loss every N steps (and at the end); 0 = end only", min=0,
                                    compared=False)
    save_every: int = common.option(200, "checkpoint every N steps (and at the end); 0 = end only", min=0,
                                    compared=False)
    resume: bool = common.option(False, "continue from OUT/<stage>/train_state.pt", compared=False)
    compile: bool = common.option(False, "torch.compile the model (worth it on GPU)", compared=False)
    freeze_vision: bool = common.option(True, "train only the projector and the LM (see STAGES)")
    vision_pretrain_steps: int = common.option(100, "from scratch only: vision tower pretraining steps before the "
                                               "stage (pretrain_vision); 0 = off", min=0)
    seed: int = common.option(1337, "seeds the initial weights, the val split and the data order")
    max_len: int = common.option(1024, "skip samples longer than this many tokens", min=1)
    split_cost: int = common.option(SPLIT_COST, "cut each step into micro-batches of similar length where that saves "
                                    "more pad tokens than this per cut (split_by_length)", min=0)
    val_fraction: float = common.option(0.05, "fraction of the images held out for the validation loss", min=0, max=1)



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


def to_device(batch, device):
    """The tensors but attention_mask (the causal mask hides right pads, and SDPA takes its fused causal path) on the
    device; on CUDA the copies come from pinned memory and do not block, so they overlap the GPU's work."""
    cuda = device.type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda)
            for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}


def split_by_length(rows, lengths, max_rows, cost=SPLIT_COST):
    """A step's rows (indices) sorted by length and cut into micro-batches of at most max_rows, where the cuts give the
    fewest padded tokens plus `cost` per micro-batch (a forward pass's fixed cost, in tokens): a dynamic program over
    the cut points. The step's gradient is their token-weighted sum (train_loop), whatever the cuts."""
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
    (seed + epoch: --resume recomputes them), cut by length (split_by_length) into micro-batches of at most batch_size
    rows and 1 / processes of the step's rows, so that each torchrun process gets one."""
    rows = batch_size * grad_accum
    epoch, i = divmod(step, math.ceil(len(examples) / rows))  # i: the step within its epoch
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
    mine = order[i * rows:(i + 1) * rows].tolist()
    lengths, max_rows = [len(ex["ids"]) for ex in examples], min(batch_size, max(1, len(mine) // processes))
    return [[examples[j] for j in batch] for batch in split_by_length(mine, lengths, max_rows, cost)]


# ----------------------------------------------------------------------------------------------
# The optimizer, and the loop with its validation loss and the checkpoints that --resume continues exactly

def make_optimizer(model, cfg):
    """AdamW, decay on matrices only and one peak lr per part (fused on CUDA: VLM.configure_optimizers)."""
    return model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.lr_vision or cfg.lr, cfg.lr_projector or cfg.lr,
                                      freeze_vision=cfg.freeze_vision)


@torch.no_grad()
def evaluate(model, examples, cfg, device, pad_id):
    """Mean loss per target token over all examples (not a mean of batch means); under torchrun each process scores
    every N-th batch, and the sums are added up."""
    rank, n_procs = common.distributed()
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # float64, as Python floats sum
    for i in range(rank * cfg.batch_size, len(examples), n_procs * cfg.batch_size):
        batch = collate(examples[i:i + cfg.batch_size], pad_id)
        n, batch = batch["n_targets"], to_device(batch, device)
        with common.autocast(device, cfg.precision):
            _, loss = model(batch["input_ids"], batch["pixel_values"], targets=batch["targets"])
        total, count = total + loss.double() * n, count + n
    model.train()
    total, count = common.all_reduce_sum(torch.stack([total, total.new_tensor(count)])).tolist()
    return total / count if count else float("nan")


def model_flops(model, tokens, images):
    """A training step's model FLOPs (Kaplan et al.'s estimate, nanoGPT's estimate_mfu without attention): per weight
    and input, 2 forward and 4 more backward if it trains; text weights see the real tokens, vision weights the
    image patches."""
    vision = {id(p) for p in model.vision_model.parameters()}
    patches = images * (model.config.vision.image_size // model.config.vision.patch_size) ** 2
    return sum((6 if p.requires_grad else 2) * p.numel() * (patches if id(p) in vision else tokens)
               for p in model.parameters())


def save_checkpoint(model, optimizer, scaler, step, provenance, out_dir):
    """save_pretrained, plus train_state.pt for --resume with its own copy of the weights and the stage's provenance."""
    model.save_pretrained(out_dir)
    checkpoint.save_train_state(os.path.join(out_dir, "train_state.pt"), model, optimizer, scaler, step, provenance)


def train_loop(model, train_examples, val_examples, cfg, out_dir, log_path, desc, provenance=None):
    """Train `model` in place; checkpoints to out_dir, metrics to log_path -> a summary. Ctrl-C saves first. Under
    torchrun every process runs its share of each step's micro-batches, and rank 0 alone writes. provenance: the
    stage's (stage_record), which --resume must match."""
    provenance = provenance or checkpoint.provenance(cfg, cfg.out, [])
    device, (rank, n_procs) = common.resolve_device(cfg.device), common.distributed()
    model.to(device).train()
    pad_id = data.special_ids(model.tokenizer)["pad"] if model.tokenizer is not None else 0
    optimizer = make_optimizer(model, cfg)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = common.make_scaler(device, cfg.precision)
    forward = torch.compile(model, dynamic=True) if cfg.compile else model  # dynamic: each batch has its own length
    forward = common.data_parallel(forward)  # after make_optimizer, which froze what it does not train
    steps_per_epoch = math.ceil(len(train_examples) / (cfg.batch_size * cfg.grad_accum))
    val_examples = sorted(val_examples, key=lambda ex: len(ex["ids"]))  # fewer pads; the val loss is a sum anyway
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else round(cfg.warmup_steps * total)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    done = 0
    if cfg.resume:  # every option and input as the run resumed had them, but its length: it may be trained longer
        same = {**provenance, "options": {k: v for k, v in provenance["options"].items()
                                          if k not in ("max_steps", "epochs")}}
        done = checkpoint.load_train_state(os.path.join(out_dir, "train_state.pt"), model, optimizer, scaler, same,
                                           f"start over (train_sft.py without --resume; the main job: add --rebuild "
                                           f"{cfg.stage})")
        if done >= total:  # nothing left to train, so no losses to report
            raise ValueError(f"{out_dir}/train_state.pt is at step {done} of {total}: nothing to resume; run without "
                             f"--resume to train again, or resume with more --max-steps / --epochs")
    elapsed_before = common.start_log(log_path, done if cfg.resume else None)  # seconds of the run(s) resumed
    flops = model_flops(model, 1, 0), model_flops(model, 0, 1)  # per real token, per image
    flops_peak = common.matmul_peak(device, cfg.precision) * n_procs  # every process's device
    saved, train_loss, val_loss, t_start = done, float("nan"), float("nan"), time.time()
    tokens, padded, images = 0, 0, 0  # real tokens, tokens computed (with the pads), images, since t_start
    bar = tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True, disable=rank > 0)
    try:
        while done < total:
            scale = common.lr_scale(done, warmup, total, cfg.min_lr_ratio)
            common.set_lr(optimizer, peak_lrs, scale)
            # The step's rows, cut by length into micro-batches; process r runs micro-batches r, r + N, ... An epoch's
            # last step may have fewer than N: DDP needs every process in every backward, so one runs with weight 0.
            rows = step_batches(train_examples, done, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.split_cost, n_procs)
            batches = [collate(micro, pad_id) for micro in rows]
            step_targets = sum(b["n_targets"] for b in batches)
            loss = torch.zeros((), device=device)
            mine = batches[rank::n_procs] or [dict(batches[0], n_targets=0)]
            for i, batch in enumerate(mine):
                if n_procs > 1:  # DDP syncs the gradients once a step: in the backward of the last micro-batch
                    forward.require_backward_grad_sync = i == len(mine) - 1
                x = to_device(batch, device)
                with common.autocast(device, cfg.precision):
                    _, micro_loss = forward(x["input_ids"], x["pixel_values"], targets=x["targets"])
                micro_loss = micro_loss * (batch["n_targets"] / step_targets)  # weighted by tokens: one big batch
                scaler.scale(micro_loss * n_procs).backward()  # x N: DDP's mean over the N processes is then their sum
                loss += micro_loss.detach()
            # The end of the step (common.optimizer_step is the same, as one call, for DPO and GRPO).
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            train_loss, grad_norm = torch.stack([common.all_reduce_sum(loss), grad_norm]).tolist()  # one GPU read
            if common.diverged(train_loss, grad_norm, scaler):  # halt before the bad update
                kept = (f"the last good checkpoint (step {saved}) is in {out_dir}" if saved or cfg.resume else
                        "no checkpoint was saved before it")  # a resumed run's first checkpoint counts, even at step 0
                raise common.divergence_error(train_loss, grad_norm, f"step {done + 1}", kept, device, cfg.precision)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as we can
            done += 1

            # Throughput counts real tokens only; pad_share is the part of the computed tokens that were pads.
            tokens += sum(b["n_tokens"] for b in batches)
            padded += sum(b["input_ids"].numel() for b in batches)
            images += sum(len(b["pixel_values"]) for b in batches)
            seconds = time.time() - t_start
            record = {"step": done, "loss": train_loss, "lr": cfg.lr * scale, "grad_norm": grad_norm,
                      "tok_s": tokens / seconds, "pad_share": 1 - tokens / padded,
                      "peak_share": (flops[0] * tokens + flops[1] * images) / seconds / flops_peak}
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:
                val_loss = record["val_loss"] = evaluate(model, val_examples, cfg, device, pad_id)
            record["elapsed_s"] = elapsed_before + time.time() - t_start  # the stage's wall time, across --resume
            common.log_record(log_path, record)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", lr=f"{record['lr']:.1e}",
                            tok_s=f"{record['tok_s']:.0f}", pad=f"{record['pad_share']:.1%}")
            if (cfg.save_every and done % cfg.save_every == 0) or done == total:
                common.on_rank0(save_checkpoint, model, optimizer, scaler, done, provenance, out_dir)  # the others wait
                saved = done
    except KeyboardInterrupt:
        if rank == 0:  # every process holds the same weights
            save_checkpoint(model, optimizer, scaler, done, provenance, out_dir)  # a half-done step's grads: dropped
        bar.close()
        raise KeyboardInterrupt(f"saved step {done}/{total} to {out_dir}") from None  # main says how to continue
    bar.close()
    wall = time.time() - t_start  # this run's; wall_s: the stage's, across --resume (train_dpo.build_controls)
    return {"steps": done, "wall_s": elapsed_before + wall, "train_loss": train_loss, "val_loss": val_loss,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0, "pad_share": 1 - tokens / max(padded, 1),
            "peak_share": (flops[0] * tokens + flops[1] * images) / wall / flops_peak if wall > 0 else 0.0}


# ----------------------------------------------------------------------------------------------
# The stages

# Vision pretraining, this world's SigLIP: on a random tower the base model read shape at chance (docs/experiments.md),
# so linear heads on each image token (a grid cell) first learn its shape, colour and size (world.cell_labels).


def pretrain_vision(model, rows, val_rows, image_root, cfg, steps, batch_size=64, lr=1e-3):
    """Train model.vision_model in place on describe rows -> held-out accuracy per label (None: skipped)."""
    mcfg, device = model.config, common.resolve_device(cfg.device)
    if mcfg.tokens_per_image != len(world.CELLS) or not rows:
        common.print0(f"[train_sft] vision pretraining skipped: it needs describe rows and one image token per "
                      f"grid cell ({len(world.CELLS)}; this model has {mcfg.tokens_per_image})")
        return None
    def load(rs):  # -> images (N, 3, H, W), labels (N, cells, 3)
        images = [data.load_image(os.path.join(image_root, r["image"]), mcfg.vision.image_size) for r in rs]
        return torch.stack(images), torch.tensor([world.cell_labels(r["answer"]) for r in rs])
    images, labels = (t.to(device) for t in load(rows))  # moved once, not every step
    width = mcfg.vision.hidden_size * mcfg.scale_factor**2  # one pixel-shuffled token per cell
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 1 + len(v)) for v in world.VISION_LABELS.values()]).to(device)
    vision = model.vision_model.to(device).train()
    optimizer = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    scaler = common.make_scaler(device, cfg.precision)  # fp16 gradients underflow without loss scaling, here too
    def logits(x):  # (N, 3, H, W) -> one (N, cells, classes) per label
        with common.autocast(device, cfg.precision):
            tokens = pixel_shuffle(vision(x.to(device)), mcfg.scale_factor)  # (N, cells, width)
        return [head(tokens.float()) for head in heads]
    for _ in tqdm(range(steps), desc="vision pretraining", leave=False, disable=common.distributed()[0] > 0):
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
                    for i, (k, out) in enumerate(zip(world.VISION_LABELS, logits(x)))}
    common.print0(f"[train_sft] vision tower pretrained: {steps} steps on the cells of {len(rows)} scene descriptions; "
                  f"held-out cell accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return accuracy


def stage_config(stage, cfg):  # cfg for this stage, its None fields set to the stage's defaults
    spec = STAGES[stage]
    return replace(cfg, stage=stage, epochs=spec["epochs"] if cfg.epochs is None else cfg.epochs,
                   lr=spec["lr"] if cfg.lr is None else cfg.lr)


def stage_record(cfg, extra=None, inputs=()):
    """What a stage (cfg from stage_config) records and --resume checks: its options, with the caller's `extra` (how
    train_dpo.py sampled a data file), and the ids of the run's world, of its init stage and of `inputs`."""
    init = STAGES[cfg.stage]["init"]
    names = ["data", *([init] if init and not cfg.init else []), *inputs]
    return checkpoint.provenance(cfg, cfg.out, names, extra)


def run_stage(stage, cfg, extra=None, inputs=()):
    """`python train_sft.py --stage STAGE` -> the checkpoint dir; cfg's None fields take the stage's defaults; extra
    and inputs go to stage_record. Under torchrun every process encodes the rows and trains; rank 0 writes the
    checkpoint, and the others wait for it."""
    rank, spec = common.distributed()[0], STAGES[stage]
    cfg = stage_config(stage, cfg)
    record = stage_record(cfg, extra, inputs)
    data_dir, out_dir = os.path.join(cfg.out, "data"), checkpoint.stage_dir(cfg.out, stage)
    if cfg.resume and checkpoint.marker(out_dir):  # resuming would overwrite its summary
        raise ValueError(f"{out_dir} is already finished ({checkpoint.STAGE_DONE} is there): nothing to resume; run "
                         f"without --resume to train it again")
    path = os.path.join(data_dir, cfg.data_file or spec["data"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `python data.py --out {data_dir}` first")
    init = cfg.init or (checkpoint.stage_dir(cfg.out, spec["init"]) if spec["init"] else None)
    if init and not os.path.isfile(os.path.join(init, "config.json")):
        out_flag = "" if cfg.out == "out" else f" --out {cfg.out}"
        command = f"run `python train_sft.py --stage {spec['init']}{out_flag}` first"
        raise FileNotFoundError(f"{init} not found: {'pass an existing checkpoint' if cfg.init else command}")
    common.writable_dir(out_dir)
    common.writable_dir(os.path.join(cfg.out, "logs"))
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
    common.print0(f"[train_sft] {stage}: {spec['about']}; {model.num_params() / 1e6:.1f}M params from "
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
        common.print0(f"{path}: skipped {skipped} rows longer than --max-len {cfg.max_len}")
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
        Path(out_dir, checkpoint.STAGE_DONE).unlink(missing_ok=True)  # an earlier run's marker must not outlive it
    summary = train_loop(model, train, val, cfg, out_dir, os.path.join(cfg.out, "logs", f"{stage}.jsonl"), stage,
                         record)
    common.print0(f"[train_sft] {stage}: {summary['steps']} steps in {summary['wall_s']:.0f}s, train loss "
                  f"{summary['train_loss']:.3f}, val loss {summary['val_loss']:.3f} ({len(train)} train / {len(val)} "
                  f"val rows), {summary['tokens_per_s']:.0f} real tokens/s ({summary['pad_share']:.1%} padding, "
                  f"{summary['peak_share']:.0%} of this device's matmul peak) -> {out_dir}")
    marker = {"stage": stage, **summary, "config": asdict(cfg), **record}  # last: without it, it was interrupted
    marker_path = os.path.join(out_dir, checkpoint.STAGE_DONE)
    common.on_rank0(common.atomic_write, marker_path, lambda f: common.write_json(marker, f))  # all wait for it
    return out_dir


def main(argv=None):
    cfg = common.parse_config(TrainConfig, argv, description=__doc__.strip().splitlines()[0])
    try:
        common.setup_distributed(cfg.device)  # a process group under torchrun; nothing without it
        with common.run_lock(cfg.out, os.path.join(cfg.out, "data")):  # one run per directory
            run_stage(cfg.stage, cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line: what was saved, how to continue
        common.interrupted(f"{e}; continue: the same command with --resume" if str(e) else "nothing saved")
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
