"""GRPO on the reasoning agent: on-policy RL with verifiable rewards, side by side with iterative DPO (train_dpo.py).

    python train_grpo.py
    torchrun --standalone --nproc_per_node=4 train_grpo.py   # the same run on 4 GPUs

builds whatever earlier stage is missing as train_dpo.py does, then trains the SFT reasoning agent with GRPO (Shao et
al. 2024, DeepSeekMath, arXiv 2402.03300). Each step samples G chains per question on scenes larger than SFT saw; the
assessment rewards each (0 for a wrong answer, else by step score); a chain's advantage is its reward against its
group's mean (a group whose chains are all, or none, sound and right is skipped), and a token-level policy gradient
raises the chains above the mean. The summary agent stays as SFT'd. The result, OUT/reasoning_grpo, is eval.py's arm
two_agent_grpo. Under torchrun every process samples its share of each step's questions and trains on its share.
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import agents
import checkpoint
import common
import data
import eval as evaluation
import plots
import train_dpo
import train_sft
from model import VLM


# ----------------------------------------------------------------------------------------------
# Configuration. The budget: about half the chains the three DPO rounds sample, in less than their time.

@dataclass
class GRPOConfig(train_dpo.JobConfig):  # and the options it shares with train_dpo.py
    steps: int = common.option(60, "policy-gradient steps (60 x 32 x 8 = 15,360 chains; DPO's rounds: 28,800)", min=1)
    questions_per_step: int = common.option(32, "questions per step", min=1)
    group_size: int = common.option(8, "G chains sampled per question, its group (advantages need 2)", min=2)
    fresh_pool: bool = common.option(True, "steps x questions on new scenes; --no-fresh-pool: the SFT questions")
    process_weight: float = common.option(0.5, "--reward additive: 1 if the answer filter passes, + this x step score "
                                          "/ 100; <= 1 keeps every right answer above every wrong one", min=0, max=1)
    reward: str = common.option("gated", "gated: 0 for a wrong answer, else 0.2 + 0.8 x step score / 100 (answer-"
                                "gated, docs/experiments.md); additive: --process-weight's",
                                choices=["additive", "gated"], absent="additive")
    std: bool = common.option(True, "advantage (r - mean) / std per group (GRPO); --no-std: r - mean (Dr.GRPO)")
    ppo_epochs: int = common.option(1, "updates on each step's samples; > 1 clips the ratio as PPO does", min=1)
    clip_eps: float = common.option(0.2, "PPO's clip range of the ratio (with --ppo-epochs > 1)", above=0, max=1)
    kl_coef: float = common.option(0.0, "weight of a k3 KL to the SFT agent (0 = off, as in Dr.GRPO and DAPO)", min=0)
    lr: float = common.option(3e-5, "peak learning rate (chosen on hard val: docs/experiments.md)", above=0)
    warmup_steps: int = common.option(5, "linear warmup updates, then cosine to 0.1 x lr (as DPO)", min=0)
    micro_batch: int = common.option(64, "sequences per forward / backward; they add up to the step's gradient", min=1)
    eval_every: int = common.option(20, "val report every N steps, and at the start and end", min=0, compared=False)
    save_every: int = common.option(10, "train_state.pt every N steps, for --resume; 0 = never", min=0, compared=False)
    resume: bool = common.option(True, "continue an interrupted run from its train_state.pt", compared=False)


# ----------------------------------------------------------------------------------------------
# Advantages and the loss, pure functions of tensors

def group_advantages(rewards, std=True, eps=1e-4):
    """rewards (N, G), one row per question -> (advantages (N, G), trained (N,) bool). GRPO's outcome advantage
    (r - mean) / (std + eps) per group (eps as TRL's); std=False: r - mean (Dr.GRPO, Liu et al. 2025; nanochat), which
    does not blow up groups whose rewards barely differ. A group of equal rewards carries no signal: advantage 0, and
    trained False, so it costs no forward or backward."""
    trained = rewards.amax(1) > rewards.amin(1)
    centred = rewards - rewards.mean(1, keepdim=True)
    advantages = centred / (rewards.std(1, keepdim=True) + eps) if std else centred
    return torch.where(trained[:, None], advantages, 0.0), trained  # where, not *: 0 / 0 would give nan


def kl_k3(logps, ref_logps, mask):
    """Per-token KL(policy || reference) estimate k3 = exp(d) - d - 1, d = ref - logp (Schulman 2020; DeepSeekMath
    eq. 4): >= 0, 0 where the two agree; 0 off the mask. All (B, T-1)."""
    d = (ref_logps - logps).masked_fill(~mask, 0)
    return d.exp() - d - 1


def grpo_loss(logps, old_logps, advantages, mask, n_tokens, clip_eps=0.2, ref_logps=None, kl_coef=0.0):
    """Token-level clipped policy gradient (PPO, Schulman et al. 2017, as GRPO uses it) -> (loss, kl (B, T-1) or None).
    logps, old_logps, ref_logps (B, T-1) fp32; advantages (B,), one per chain, for each of its tokens; mask (B, T-1)
    the chain tokens. Dividing by n_tokens, the chain tokens of the whole step, weighs every token alike, not every
    chain (DAPO, Yu et al. 2025; Dr.GRPO). old_logps = logps.detach() makes the ratio 1: the gradient is -A grad log p.
    Where the ratio has left [1 - eps, 1 + eps] in the advantage's direction, min() takes the constant clipped term."""
    ratio = (logps - old_logps).masked_fill(~mask, 0).exp()  # 0 off the chain: no overflow there
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logps, ref_logps, mask) if kl_coef else None
    if kl_coef:
        per_token = per_token + kl_coef * kl
    return (per_token * mask).sum() / max(1, n_tokens), kl


# ----------------------------------------------------------------------------------------------
# One step: sample and reward the groups, then update

def reward(correct, score, rule="additive", weight=0.5):
    """One chain's verifiable reward from the assessment, the same rule for every family. additive: 1 for a right
    answer + weight x step score / 100; gated (Zhang, Neubig, Yue 2025): 0 for a wrong answer, else 0.2 + 0.8 x step
    score / 100, so a wrong chain earns nothing whatever its steps and a right one through wrong steps less."""
    return (0.2 + 0.8 * score / 100 if correct else 0.0) if rule == "gated" else correct + weight * score / 100


def question_pool(cfg, data_dir):
    """The questions of every step, in order: steps x questions_per_step on new scenes made once (no question twice),
    or the SFT training questions shuffled (in turn, again from the start when they run out)."""
    if cfg.fresh_pool:  # --hard-pool: scenes as large as the hard splits'
        return data.extra_split(data_dir, f"grpo-seed{cfg.seed}{'-hard' * cfg.hard_pool}", cfg.steps *
                                cfg.questions_per_step, **(data.hard_scenes(data_dir) if cfg.hard_pool else {}))
    rows = data.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    random.Random(cfg.seed).shuffle(rows)
    return rows


def rollout(policy, rows, data_dir, cfg, seed, judges):
    """G chains per question from the policy, rewarded and grouped -> ([(encoded chain, advantage)] of the trained
    groups, stats). Chains are encoded from their text, as DPO's are (a cut-off chain gets its end token here), and
    scored under the model itself though drawn at --temperature / --top-p: a small off-policy gap, left as it is."""
    chains = agents.sample_chains(policy, rows, data_dir, cfg, seed, k=cfg.group_size, desc="GRPO")
    ranked = [agents.rank_samples(r, chains[r["id"]], *judges) for r in rows]
    rewards = torch.tensor([[reward(s["correct"], s["score"], cfg.reward, cfg.process_weight) for s in rs]
                            for rs in ranked])
    advantages, trained = group_advantages(rewards, cfg.std)  # (N, G), (N,)
    if cfg.pass_filter:  # only the groups at the edge train: some, not all, chains right and High
        high = data.world_config(data_dir).high
        trained &= torch.tensor([agents.at_the_edge(rs, high) for rs in ranked])
    tok, mcfg = policy.tokenizer, policy.config
    examples = [(train_sft.encode_row({**r, "chain": s["text"]}, tok, mcfg, data_dir, task="reasoning"), a)
                for r, rs, adv, keep in zip(rows, ranked, advantages.tolist(), trained.tolist()) if keep
                for s, a in zip(rs, adv)]
    texts = [s["text"] for rs in ranked for s in rs]
    stats = {"chains": len(texts), "reward": rewards.mean().item(),
             "solved": sum(any(s["correct"] for s in rs) for rs in ranked) / len(rows),  # a right chain in the group
             "sample_correct": sum(s["correct"] for rs in ranked for s in rs) / len(texts),
             "skipped_groups": int((~trained).sum()),
             "adv_abs": advantages[trained].abs().mean().item() if trained.any() else 0.0,
             "chain_tokens": sum(len(e.ids) for e in tok.encode_batch(texts)) / len(texts)}
    return examples, stats


def micro_batches(examples, size, pad_id, device):
    """[(encoded chain, advantage)] -> ([(batch on the device, advantages (b,))], the step's chain tokens: the loss's
    denominator, counted on the host as collate counts them). Under torchrun process r takes chains r, r + N, ...; the
    tokens are every process's, as every token weighs alike."""
    rank, world = common.distributed()
    n_tokens = sum(int((e["targets"][1:] != -100).sum()) for e, _ in examples)
    mine = examples[rank::world]
    if examples and not mine:
        # Fewer chains than processes: DDP needs every process in every backward, so this one runs a chain with no
        # target token, which adds nothing.
        e, _ = examples[0]
        mine = [({**e, "targets": torch.full_like(e["targets"], -100)}, 0.0)]
    mine.sort(key=lambda example: len(example[0]["ids"]))  # the step's gradient is their sum: sorted, fewer pads
    chunks = []
    for i in range(0, len(mine), size):
        part = mine[i:i + size]
        batch = train_sft.collate([e for e, _ in part], pad_id)
        chunks.append((train_sft.to_device(batch, device), torch.tensor([a for _, a in part], device=device)))
    return chunks, n_tokens


def update(policy, opt, scaler, chunks, n_tokens, cfg, device, where, kept):
    """One optimizer step over the step's micro-batches [(batch, advantages (b,), old logps, ref logps)]: each loss is
    already divided by the step's n_tokens, so the gradients add up to the whole step's -> metrics (floats). Under
    torchrun policy is in DDP and chunks are this process's: gradients and metrics are summed over the processes."""
    world, totals = common.distributed()[1], {}
    for i, (batch, adv, old, ref) in enumerate(chunks):
        if world > 1:  # DDP syncs the gradients once an update, in the backward of the process's last micro-batch
            policy.require_backward_grad_sync = i == len(chunks) - 1
        with common.autocast(device, cfg.precision), train_dpo.same_kernels(device):
            logps, mask = train_dpo.token_logps(policy, batch)  # (b, T-1) fp32, (b, T-1)
        loss, kl = grpo_loss(logps, logps.detach() if old is None else old, adv, mask, n_tokens, cfg.clip_eps, ref,
                             cfg.kl_coef)
        scaler.scale(loss * world).backward()  # x N: DDP's mean over the N processes is then their sum
        parts = {"loss": loss.detach(), "token_logp": (logps.detach() * mask).sum() / n_tokens}
        if kl is not None:
            parts["kl"] = (kl.detach() * mask).sum() / n_tokens
        for k, v in parts.items():
            totals[k] = totals.get(k, 0) + v
    totals = dict(zip(totals, common.all_reduce_sum(torch.stack(list(totals.values())))))  # every process's chains
    return common.optimizer_step(policy, opt, scaler, cfg.grad_clip, totals, where, kept, device, cfg.precision)


def grpo_step(policy, ref, opt, scaler, examples, step, cfg, device, pad_id, kept):
    """The --ppo-epochs updates on one step's trained groups -> their metrics, averaged ({} when every group tied)."""
    chunks, n_tokens = micro_batches(examples, cfg.micro_batch, pad_id, device)
    with torch.no_grad(), common.autocast(device, cfg.precision), train_dpo.same_kernels(device):
        # Old log-probs once, before the updates (PPO); with one update the ratio is 1 and they are not needed.
        olds = [train_dpo.token_logps(policy, b)[0] if cfg.ppo_epochs > 1 else None for b, _ in chunks]
        refs = [train_dpo.token_logps(ref, b)[0] if ref is not None else None for b, _ in chunks]
    metrics = {}
    for epoch in range(cfg.ppo_epochs if chunks else 0):
        scale = common.lr_scale(step * cfg.ppo_epochs + epoch, cfg.warmup_steps, cfg.steps * cfg.ppo_epochs)
        common.set_lr(opt, [cfg.lr] * len(opt.param_groups), scale)  # every group's peak is --lr (vision is frozen)
        m = update(policy, opt, scaler, [(b, a, o, r) for (b, a), o, r in zip(chunks, olds, refs)], n_tokens, cfg,
                   device, f"GRPO step {step + 1}", kept)
        metrics = {**{k: metrics.get(k, 0) + v / cfg.ppo_epochs for k, v in m.items()}, "lr": cfg.lr * scale}
    return metrics


# ----------------------------------------------------------------------------------------------
# The run, with its checkpoint for --resume

def train(cfg, device, out_dir, record):
    """GRPO from the SFT reasoning agent -> out_dir (save_pretrained, then grpo.json with record, which --resume must
    match). Under torchrun every process samples and trains its share; rank 0 alone writes, logs and evaluates."""
    rank = common.distributed()[0]
    data_dir, log_path = os.path.join(cfg.out, "data"), os.path.join(cfg.out, "logs", "grpo.jsonl")
    state_path = os.path.join(out_dir, "train_state.pt")
    policy = VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "reasoning")).to(device).eval()
    summary = VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "summary")).to(device).eval()
    ref = None  # the KL's reference, only when on (Dr.GRPO and DAPO drop it: a checked answer cannot be gamed)
    if cfg.kl_coef:  # frozen, in train mode as the policy's passes are: the same attention kernels
        ref = VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "reasoning")).to(device).train().requires_grad_(False)
    val_rows = data.read_jsonl(os.path.join(data_dir, "val.jsonl"))[:cfg.val_size]
    pool, judges = common.on_rank0(question_pool, cfg, data_dir), (data.AnswerFilter(), data.SceneStepScorer())
    opt = policy.configure_optimizers(weight_decay=0.0, lr_text=cfg.lr, lr_vision=0.0, lr_projector=cfg.lr,
                                      freeze_vision=True)
    scaler = common.make_scaler(device, cfg.precision)
    pad_id = data.special_ids(policy.tokenizer)["pad"]
    common.writable_dir(out_dir)
    common.writable_dir(os.path.dirname(log_path))
    if rank == 0:
        Path(out_dir, checkpoint.GRPO_DONE).unlink(missing_ok=True)  # an earlier run's marker must not outlive this one
    done, resumed = 0, cfg.resume and not cfg.force and os.path.isfile(state_path)
    if resumed:  # on every process
        done = checkpoint.load_train_state(state_path, policy, opt, scaler, record, "start over with --no-resume")
        common.print0(f"[grpo] resuming at step {done}/{cfg.steps} from {state_path}")
    elapsed_before = common.start_log(log_path, done if resumed else None)  # seconds of GRPO before this run
    model = common.data_parallel(policy)  # DDP under torchrun, after the vision tower is frozen
    t_start = time.time()

    def log(record):  # elapsed_s: seconds of GRPO, across --resume
        common.log_record(log_path, {**record, "elapsed_s": round(elapsed_before + time.time() - t_start, 3)})

    def report(step):
        val = common.on_rank0(evaluation.evaluate_two_agent, policy.eval(), summary, val_rows, data_dir,
                              precision=cfg.precision)
        log({"event": "eval", "step": step, "val/chain_correct": val["chain_correct"], "val/two_agent": val["overall"]})

    if done == 0:
        report(0)
    bar = tqdm(total=cfg.steps, initial=done, desc="GRPO", dynamic_ncols=True, disable=rank > 0)
    try:
        while done < cfg.steps:
            rows = [pool[(done * cfg.questions_per_step + i) % len(pool)] for i in range(cfg.questions_per_step)]
            examples, stats = rollout(policy.eval(), rows, data_dir, cfg, cfg.seed + 1000 * (done + 1), judges)
            kept = f"the last train_state.pt is in {out_dir}" if os.path.isfile(state_path) else "none was saved"
            metrics = grpo_step(model.train(), ref, opt, scaler, examples, done, cfg, device, pad_id, kept)
            done += 1
            log({"step": done, **stats, **metrics, "trained_chains": len(examples)})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", solved=f"{stats['solved']:.2f}",
                            skipped=stats["skipped_groups"])
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                report(done)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps and rank == 0:
                checkpoint.save_train_state(state_path, policy, opt, scaler, done, record, rng=False)
    except KeyboardInterrupt:
        if rank == 0:  # every process holds the same weights
            checkpoint.save_train_state(state_path, policy, opt, scaler, done, record, rng=False)  # no half-done step
        bar.close()
        raise KeyboardInterrupt(f"saved step {done}/{cfg.steps} to {state_path}") from None
    bar.close()
    report(cfg.steps)
    if rank > 0:  # rank 0 alone writes the checkpoint and the summary
        return None
    policy.eval().save_pretrained(out_dir)
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    steps, evals = [r for r in records if "event" not in r], [r for r in records if r.get("event") == "eval"]
    sft = dict(VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "reasoning")).to(device).named_parameters())
    moved = train_dpo.weight_change(policy, {n: sft[n] for n, p in policy.named_parameters() if p.requires_grad})
    summary_row = {"steps": done, "chains": sum(r["chains"] for r in steps), "weight_change": moved,
                   "skipped_groups": sum(r["skipped_groups"] for r in steps), "wall_s": records[-1]["elapsed_s"],
                   "val/chain_correct": evals[-1]["val/chain_correct"], "val/two_agent": evals[-1]["val/two_agent"],
                   "config": asdict(cfg), **record}
    marker = os.path.join(out_dir, checkpoint.GRPO_DONE)
    common.atomic_write(marker, lambda f: common.write_json(summary_row, f))  # last: the run is done
    Path(state_path).unlink(missing_ok=True)  # nothing left to resume
    print("\nGRPO, per val report:\n" + "\n".join(plots.grpo_table(steps, evals)))
    print(f"[grpo] {done} steps, {summary_row['chains']} chains sampled, {summary_row['skipped_groups']} groups "
          f"skipped, weights moved {summary_row['weight_change']:.1e}, {summary_row['wall_s']:.0f}s -> {out_dir}")
    return summary_row


def run(cfg):
    """The whole job for a GRPOConfig: missing stages (train_dpo's), GRPO, the evaluation -> eval.run_eval's results."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    _, _, device = common.setup_distributed(cfg.device)
    common.writable_dir(cfg.out)
    train_dpo.build_missing_stages(cfg)  # the shared options build the stages exactly as the DPO job would
    out_dir = checkpoint.stage_dir(cfg.out, "reasoning_grpo")
    record = train_dpo.job_record(cfg, ["reasoning"])
    if not checkpoint.cached(out_dir, "GRPO", record, "add --rebuild grpo", cfg.force or "grpo" in (cfg.rebuild or ())):
        common.print0(f"[stage] GRPO: {cfg.steps} steps x {cfg.questions_per_step} questions x {cfg.group_size} "
                      f"chains")
        train(cfg, device, out_dir, record)
    return train_dpo.evaluate_run(cfg, device, t0)


def main(argv=None):
    cfg = common.parse_config(GRPOConfig, argv, description=__doc__.splitlines()[0])
    try:
        with common.run_lock(cfg.out, os.path.join(cfg.out, "data")):  # one run per directory
            results = run(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line: what was saved, how to continue
        again = "without --force / --rebuild" if cfg.force or cfg.rebuild else "again"  # not to rebuild them again
        common.interrupted(f"{str(e) or 'finished stages are kept'}; continue: the same command {again}")
    common.cleanup_distributed()
    return results


if __name__ == "__main__":
    main()
