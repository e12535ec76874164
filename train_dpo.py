"""Iterative DPO on the reasoning agent (Insight-V, Sec. 3.3), and the main job of this project.

    python train_dpo.py --iters 3
    torchrun --standalone --nproc_per_node=4 train_dpo.py --iters 3   # the same job on 4 GPUs

runs the whole method on the embedded synthetic world: it builds whatever earlier stage is missing (data, base
model, both agents, the ablation arms), runs N rounds of DPO and the same time of SFT as their control, evaluates.
In round t the reasoning agent M_t samples k chains per question on new scenes larger than SFT saw; the pipeline's
assessment ranks them, and where some but not all are sound and right (its edge) a sound one is preferred to the
worst (--rejected). Two epochs of DPO with the reference = M_t give M_{t+1}; the summary agent stays as SFT'd. DPO
(Rafailov et al. 2023) is written by hand: `dpo_loss` is a pure function of summed log-probabilities, which
`sequence_logps` computes in fp32 for the completion tokens only. Under torchrun every process trains on its share.
"""

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import agents
import checkpoint
import common
import data
import eval as evaluation
import generate
import plots
import train_sft
from model import VLM

# ----------------------------------------------------------------------------------------------
# The loss

class ReferenceMismatch(RuntimeError):
    """A round's first loss, with the policy equal to its reference, is not exactly ln 2 (IPO: 1 / (4 beta^2))."""


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0, nll_weight=0.0, chosen_nll=None):
    """DPO on summed sequence log-probs, all (B,) tensors -> (loss, chosen_rewards, rejected_rewards). With
    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the implicit reward margin / beta:
      sigmoid: -log sigmoid(beta h)                                  (Rafailov et al. 2023, eq. 7)
      label_smoothing eps (conservative DPO, Mitchell 2023): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo: (h - 1 / (2 beta))^2                                      (Azar et al. 2023, eq. 17)
    nll_weight w adds w * chosen_nll (B,), the chosen chain's mean per-token NLL: the released Insight-V trainer adds
    it with weight 1 to keep the policy fluent on the chosen chains."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # -(1-eps) log s(x) - eps log s(-x) == -log s(x) + eps x, since log s(x) - log s(-x) = x.
        # This form is exactly ln 2 at x = 0 for every eps, the invariant the round start checks.
        losses = -F.logsigmoid(beta * h) + label_smoothing * beta * h
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    if nll_weight:
        if chosen_nll is None:
            raise ValueError("dpo_loss: nll_weight needs chosen_nll, the chosen chains' mean token NLL (B,)")
        losses = losses + nll_weight * chosen_nll
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def token_logps(model, batch):
    """generate.token_logps on a collated batch -> (logps (B, T-1), mask (B, T-1)): mask True on the completion (the
    chain and its end token), False on prompt, image and padding tokens. DPO sums it per row, GRPO weighs it per
    token."""
    return generate.token_logps(model, batch["input_ids"], batch["targets"], batch["pixel_values"])


def sequence_logps(model, batch, return_counts=False):
    """Summed fp32 log-probs of each row's completion tokens -> (B,) (with their counts (B,) if return_counts)."""
    logps, mask = token_logps(model, batch)
    logps = (logps * mask).sum(-1)
    return (logps, mask.sum(-1)) if return_counts else logps


# ----------------------------------------------------------------------------------------------
# Preference pairs from ranked samples

def build_pairs(ranked, max_pairs_per_question=2, min_chosen_score=0, rejected="worst"):
    """(chosen, rejected) pairs for one question: best vs worst, second best vs second worst, ... `ranked` holds
    dicts with `text`, `correct` and a `key` (higher is better: (correct, step score)). A chosen chain must pass the
    answer filter and be sound, step score >= min_chosen_score: preferring a right answer reached through wrong steps
    teaches that an answer need not follow its steps (docs/experiments.md). rejected="closest" pairs with the
    best-ranked wrong chains (hard negatives) instead of the paper's worst. Ties give no pair."""
    unique = {}
    for s in sorted(ranked, key=lambda s: s["key"], reverse=True):
        unique.setdefault(s["text"], s)  # identical texts: keep one
    ordered = list(unique.values())
    rejects = ordered[::-1] if rejected == "worst" else [s for s in ordered if not s["correct"]]
    pairs = []
    for i in range(min(max_pairs_per_question, len(ordered) // 2, len(rejects))):
        best, worst = ordered[i], rejects[i]
        if not best["correct"] or best["key"][1] < min_chosen_score or best["key"] <= worst["key"]:
            break  # no sound chain left to prefer, or a tie (everything between is tied too)
        pairs.append((best, worst))
    return pairs


def aimed_pairs(candidates, greedy, max_pairs_per_question=2, min_chosen_score=0):
    """Pairs aimed at the mistake greedy decoding makes, the one evaluation sees: rejected = the policy's greedy chain
    when wrong, chosen = the best sound, correct candidates (distinct texts). With candidates continued from greedy's
    steps before its first wrong one (first_error_prefix), the shared prefix cancels in the margin: the preference
    falls on the first wrong step (Step-DPO, Lai et al. 2024)."""
    if greedy["correct"]:
        return []
    sound = {}
    for c in sorted(candidates, key=lambda c: c["key"], reverse=True):
        if c["correct"] and c["score"] >= min_chosen_score and c["text"] != greedy["text"]:
            sound.setdefault(c["text"], c)
    return [(c, greedy) for c in list(sound.values())[:max_pairs_per_question]]


def first_error_prefix(row, text, scorer):
    """The start of a wrong chain up to (not including) its first wrong step, open for the policy to continue."""
    steps = data.parse_chain(text)[:scorer.first_error(row, text) or 0]
    return data.render_chain(steps).removesuffix("</thoughts>")


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class JobConfig:
    """The options train_dpo.py and train_grpo.py share: where the run lives, how its stages are built, how chains are
    sampled, and the seeds."""
    out: str = common.option("out", "where data, checkpoints, logs and results go (train_dpo.py and train_grpo.py "
                                    "share it)", compared=False)
    init: str = common.option(None, "start the base stage from this checkpoint")
    force: bool = common.option(False, "rebuild every stage, and this job's own training, even if cached",
                                compared=False)
    rebuild: str = common.option(None, "build these again, and then what was built from them (a cached product built "
                                 "with other options is an error)", nargs="+", compared=False,
                                 choices=["data", *train_sft.STAGES, "dpo", "grpo"])
    temperature: float = common.option(0.9, "sampling temperature for the chains", min=0)
    top_p: float = common.option(0.95, "nucleus sampling for the chains (paper: 0.95)", above=0, max=1)
    sample_batch: int = common.option(1024, "sequences decoded together (lower it for a big model)", min=1)
    max_chain_tokens: int = common.option(160, "cap on a sampled chain's length", min=1)
    grad_clip: float = common.option(1.0, "gradient norm clip (0 would zero every update)", above=0)
    precision: str = common.option("auto", "mixed precision", choices=["auto", "bf16", "fp16", "fp32"])
    device: str = common.option("auto", "auto, cpu or cuda", compared=False)
    val_size: int = common.option(300, "val questions for the reports during training", min=1, compared=False)
    summary_chains: int = common.option(1, "the reasoning agent's own chains per training question added to the "
                                        "summary set (0 = the teacher's only)", min=0)
    summary_temperature: float = common.option(0.7, "sampling temperature of those chains", min=0)
    eval_limit: int = common.option(0, "evaluate on only this many test questions (0 = all)", min=0, compared=False)
    seed: int = common.option(0, "seed of the question pools and the sampling (and of DPO's pair order)")
    hard_pool: bool = common.option(True, "fresh pools of scenes as large as the hard splits' (data.py "
                                    "--hard-min-objects): where the SFT agent is at its edge", absent=False)
    pass_filter: bool = common.option(True, "learn only from the questions at the edge (agents.at_the_edge; sound: "
                                      "DPO's --min-chosen-score, GRPO's the world's High)", absent=False)
    sft_seed: int = common.option(1337, "seed of every SFT stage (weights, val split, data order; not the world): "
                                  "vary it, each with its own --out, to see the spread")


@dataclass
class DPOConfig(JobConfig):
    iters: int = common.option(3, "DPO rounds (the paper uses 3; 0 = evaluate the SFT agents)", min=0, compared=False)
    pool_size: int = common.option(1200, "questions sampled per round", min=1)
    fresh_pool: bool = common.option(True, "each round's questions on new scenes, not the SFT questions it has fitted")
    samples_per_question: int = common.option(8, "k chains sampled per question (a pair needs 2)", min=2)
    max_pairs_per_question: int = common.option(2, "at most this many pairs per question", min=1)
    min_chosen_score: float = common.option(90, "minimum step score of a chosen chain (90 = High)", min=0, max=100)
    rejected: str = common.option("worst", "the rejected chain: the worst sample (paper), the closest wrong one, the "
                                  "greedy chain when wrong, or it with a chosen one continued from before its first "
                                  "wrong step (Step-DPO)", choices=["worst", "closest", "greedy", "first_error"])
    beta: float = common.option(0.1, "DPO beta (paper: 0.1)", above=0)
    loss_type: str = common.option("sigmoid", "sigmoid or ipo", choices=["sigmoid", "ipo"])
    label_smoothing: float = common.option(0.0, "conservative DPO epsilon (above 0.5 it prefers the rejected chain)",
                                           min=0, max=0.5)
    nll_weight: float = common.option(0.2, "weight of the chosen chain's NLL (released trainer: 1)", min=0)
    epochs: int = common.option(2, "passes over each round's pairs", min=1)
    lr: float = common.option(1e-5, "peak learning rate of each round (docs/experiments.md)", above=0)
    batch_size: int = common.option(16, "pairs per step", min=1)
    warmup_steps: int = common.option(5, "linear warmup steps per round", min=0)
    sft_more: bool = common.option(True, "control: the SFT reasoning agent trained on, on its own set, as long as "
                                   "the rounds took (arm two_agent_sft_more)", compared=False)
    teacher_bound: bool = common.option(False, "control: the same on the teacher's chains for hard questions, what RL "
                                        "could at most recover (arm two_agent_teacher_hard)", compared=False)


# ----------------------------------------------------------------------------------------------
# One round

def encode_pairs(pairs, tok, cfg, image_root):
    """Each pair -> (chosen example, rejected example) through the SFT encoder (same prompt, two chains)."""
    return [[train_sft.encode_row({**row, "chain": s["text"]}, tok, cfg, image_root, task="reasoning")
             for s in (chosen, rejected)] for row, chosen, rejected in pairs]


def pair_batches(encoded, batch_size, pad_id, generator):
    """Shuffled batches of pairs -> (this process's part as ONE collated batch: chosen rows, then their rejected rows;
    its number of pairs; the batch's). Under torchrun process r takes pairs r, r + N, ...; one left with none runs the
    batch's first pair, counted as 0: DDP needs every process in every backward."""
    rank, world = common.distributed()
    order = torch.randperm(len(encoded), generator=generator).tolist()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        part = idx[rank::world] or idx[:1]
        yield (train_sft.collate([encoded[j][0] for j in part] + [encoded[j][1] for j in part], pad_id),
               len(idx[rank::world]), len(idx))


def same_kernels(device):
    """SDPA kernels giving the same numbers with and without gradients (reference and policy passes): on CUDA the
    choice can change with requires_grad (cuDNN, memory-efficient), so flash or math; on the CPU model.attention."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def dpo_round(policy, pairs, cfg, device, log, round_idx, image_root):
    """--epochs passes of DPO with the reference = the policy at the start of the round. Under torchrun every process
    has all the pairs, runs its part of each batch (pair_batches), and its gradients and metrics are the batch's."""
    rank, world = common.distributed()
    pad_id = data.special_ids(policy.tokenizer)["pad"]
    encoded = encode_pairs(pairs, policy.tokenizer, policy.config, image_root)
    g = torch.Generator().manual_seed(cfg.seed + round_idx)
    parts = pair_batches(encoded, cfg.batch_size, pad_id, g)
    batches = [(train_sft.to_device(b, device), n_part, n_pairs) for b, n_part, n_pairs in parts]

    # Reference log-probs once, from the round's starting policy on the same batches: no second model in memory. Train
    # mode (no dropout) and same_kernels pick the training forward's kernels, so the ln 2 check below is exact.
    policy.train()
    with torch.no_grad(), common.autocast(device, cfg.precision), same_kernels(device):  # no_grad: autocast's cache
        refs = [sequence_logps(policy, b).chunk(2)
                for b, _, _ in tqdm(batches, desc="  reference log-probs", leave=False, disable=rank > 0)]

    # --epochs > 1 revisits the same batches (their reference log-probs stay valid) in a new order.
    order = torch.cat([torch.randperm(len(batches), generator=g) for _ in range(cfg.epochs)]).tolist()
    opt = policy.configure_optimizers(weight_decay=0.0, lr_text=cfg.lr, lr_vision=0.0, lr_projector=cfg.lr,
                                      freeze_vision=True)
    peaks = [group["lr"] for group in opt.param_groups]
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}  # for weight_change
    model = common.data_parallel(policy)  # DDP under torchrun, after the vision tower is frozen
    scaler = common.make_scaler(device, cfg.precision)
    totals = {}
    bar = tqdm([(batches[i], refs[i]) for i in order], desc=f"  DPO round {round_idx}", leave=False, disable=rank > 0)
    for step, ((batch, n_part, n_pairs), (ref_c, ref_r)) in enumerate(bar):
        scale = common.lr_scale(step, cfg.warmup_steps, len(order))  # warmup, then cosine to 0.1 (as in SFT)
        common.set_lr(opt, peaks, scale)
        with common.autocast(device, cfg.precision), same_kernels(device):
            logps, counts = sequence_logps(model, batch, return_counts=True)  # chosen and rejected in one forward
        pol_c, pol_r = logps.chunk(2)
        chosen_nll = -pol_c / counts.chunk(2)[0].clamp(min=1)
        loss, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                  cfg.nll_weight, chosen_nll)
        if step == 0:
            # Before any update the policy IS the reference: the DPO part is exactly ln 2 (IPO: 1 / (4 beta^2)), a free
            # end-to-end check of masks, precision and batching.
            pure, _, _ = dpo_loss(pol_c.detach(), pol_r.detach(), ref_c, ref_r, cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing)
            expect, pure = math.log(2) if cfg.loss_type == "sigmoid" else 1 / (4 * cfg.beta**2), pure.item()
            if not abs(pure - expect) <= 1e-4 * max(1.0, expect):  # also NaN
                raise ReferenceMismatch(f"DPO round {round_idx}: the loss at policy == reference is {pure:.6f}, not "
                                        f"{expect:.6f}: the reference log-probs were not computed on these batches")
            log({"round": round_idx, "event": "start_check", "loss": pure, "expected": expect})
        # The process's part of the batch's mean, x N: DDP's mean over the N processes is then their sum (as in SFT).
        share = n_part / n_pairs
        scaler.scale(loss * share * world).backward()
        stats = {"loss": loss, "rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(),
                 "rewards/accuracies": (r_c > r_r).float().mean(), "rewards/margins": (r_c - r_r).mean(),
                 "logps/chosen": pol_c.mean(), "logps/rejected": pol_r.mean()}
        # The whole batch's means: each process's, weighted by its share of the pairs, summed over the processes.
        stats = dict(zip(stats, common.all_reduce_sum(torch.stack([v.detach() for v in stats.values()]) * share)))
        metrics = common.optimizer_step(policy, opt, scaler, cfg.grad_clip, stats, f"DPO round {round_idx} step "
                                        f"{step + 1}", f"nothing of round {round_idx} was saved", device, cfg.precision)
        metrics["pairs"] = n_pairs
        log({"round": round_idx, "step": step, "lr": cfg.lr * scale, **metrics})
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + (v if k == "pairs" else v * n_pairs)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}")
    policy.eval()
    n = max(1, totals.get("pairs", 0))  # pair-steps: each pair counts once per epoch
    return {**{k: (len(pairs) if k == "pairs" else v / n) for k, v in totals.items()},
            "weight_change": weight_change(policy, start)}


def weight_change(model, start):
    """||theta - theta_0|| / ||theta_0|| over the tensors start {name: theta_0} holds: how far training moved them
    (a change far below bf16's relative resolution, 2^-8, moves nothing a bf16 forward can see)."""
    params = dict(model.named_parameters())
    moved = sum(((params[n].detach().float() - p.float()) ** 2).sum() for n, p in start.items())
    return (moved / sum((p.float() ** 2).sum() for p in start.values())).sqrt().item()


def round_pairs(policy, pool, data_dir, cfg, seed, answer_filter, scorer):
    """Sample, assess and pair one round's pool -> (pairs [(row, chosen, rejected)], stats)."""
    def ranked(rows, **options):  # {row id: the assessed samples}
        chains = agents.sample_chains(policy, rows, data_dir, cfg, seed, **options)
        return {r["id"]: agents.rank_samples(r, chains[r["id"]], answer_filter, scorer) for r in rows}
    def share(flags):
        return sum(flags) / max(1, len(flags))
    def kept(rows):  # the questions a pair may come from: with --pass-filter, those at the edge
        return [r for r in rows if not cfg.pass_filter or agents.at_the_edge(samples[r["id"]], cfg.min_chosen_score)]
    if cfg.rejected in ("worst", "closest"):
        samples = ranked(pool)
        pairs = [(r, c, w) for r in kept(pool) for c, w in build_pairs(
            samples[r["id"]], cfg.max_pairs_per_question, cfg.min_chosen_score, cfg.rejected)]
        return pairs, {"sample_correct": share([s["correct"] for rs in samples.values() for s in rs]),
                       "kept_questions": len(kept(pool))}
    greedy = {i: rs[0] for i, rs in ranked(pool, k=1, temperature=0.0, desc="greedy").items()}
    wrong = [r for r in pool if not greedy[r["id"]]["correct"]]
    if cfg.rejected == "greedy":  # k fresh samples of the questions greedy gets wrong
        samples = ranked(wrong)
    else:  # first_error: k continuations of greedy's own steps from before its first mistake
        samples = ranked(wrong, prefixes={r["id"]: first_error_prefix(r, greedy[r["id"]]["text"], scorer)
                                          for r in wrong}, desc="continuing")
    pairs = [(r, c, w) for r in kept(wrong) for c, w in aimed_pairs(
        samples[r["id"]], greedy[r["id"]], cfg.max_pairs_per_question, cfg.min_chosen_score)]
    return pairs, {"greedy_correct": 1 - len(wrong) / max(1, len(pool)), "kept_questions": len(kept(wrong)),
                   "sample_correct": share([s["correct"] for rs in samples.values() for s in rs])}


# ----------------------------------------------------------------------------------------------
# The main job

def build_missing_stages(cfg, stages=None, steps=0):
    """Data, base, both agents and the ablation arms (or `stages`, the controls after the rounds: `steps` each), each
    reused when built with the same options from the same inputs (checkpoint.cached), built again on --force, --rebuild
    or a rebuilt input, continued when interrupted. Under torchrun rank 0 builds the data while the others wait, and
    every stage trains on all the processes."""
    data_dir, rebuild = os.path.join(cfg.out, "data"), set(cfg.rebuild or ())
    if cfg.hard_pool and not cfg.fresh_pool:  # the SFT questions are no hard pool
        raise ValueError("--hard-pool draws new scenes: pass --no-hard-pool with --no-fresh-pool")
    if stages is None and (cfg.force or "data" in rebuild or not checkpoint.finished(data_dir)):
        common.print0(f"[stage] data -> {data_dir}")
        common.on_rank0(data.build_world, data_dir)
    summary_file = None  # built once, when the first stage that reads it is trained
    sft = [s for s, spec in train_sft.STAGES.items() if not spec.get("after_rl")]  # base first: the rest start from it
    for stage in sft if stages is None else stages:
        tcfg, extra, inputs = stage_plan(cfg, stage, steps)
        stage_path = checkpoint.stage_dir(cfg.out, stage)
        done = checkpoint.marker(stage_path) if stages else None  # a control for other rounds, or interrupted: anew
        again = bool(stages) and not set(inputs) <= set((done or {}).get("inputs", {}))
        if checkpoint.cached(stage_path, stage, train_sft.stage_record(tcfg, extra, inputs), f"add --rebuild {stage}",
                             cfg.force or stage in rebuild or again):
            continue
        if "summary_set" in extra and summary_file is None:  # the on-policy summary set, from the reasoning agent
            summary_file = agents.on_policy_summary_set(cfg, data_dir, common.resolve_device(cfg.device))
        if "teacher_set" in extra:
            common.on_rank0(data.teacher_set, data_dir, f"teacher-seed{cfg.seed}-hard", train_sft.STAGES[stage]["data"],
                            extra["teacher_set"]["questions"])
        resume = os.path.isfile(os.path.join(stage_path, "train_state.pt"))  # interrupted: continue it exactly
        train_sft.run_stage(stage, replace(tcfg, resume=resume), extra, inputs)


STAGE_OPTIONS = ("init", "sft_seed", "summary_chains", "summary_temperature")  # what only the SFT stages depend on


def job_record(cfg, inputs):  # a DPO round's or GRPO run's: its options but the SFT stages' (its inputs name those)
    return checkpoint.provenance(cfg, cfg.out, inputs, leave_out=STAGE_OPTIONS)


def stage_plan(cfg, stage, steps=0):
    """How the job builds an SFT stage -> (its TrainConfig, the options it records beside that config's, its inputs
    beside its world and init stage): a summary stage on the on-policy set records how that set is sampled; a control
    its `steps` and the rounds it is matched to (and the teacher bound its set)."""
    on_policy = stage in ("summary", "summary-only") and cfg.summary_chains > 0
    tcfg = train_sft.stage_config(stage, train_sft.TrainConfig(  # --init: the base stage's start, not scratch
        out=cfg.out, init=cfg.init if stage == "base" else None, precision=cfg.precision, device=cfg.device,
        seed=cfg.sft_seed, data_file=agents.SUMMARY_SET if on_policy else None, max_steps=steps))
    if train_sft.STAGES[stage].get("after_rl"):
        teacher = {"teacher_set": {"questions": cfg.pool_size * cfg.iters, "seed": cfg.seed}}
        return tcfg, teacher if stage.endswith("hard") else {}, [f"reasoning_dpo{cfg.iters}"]
    if not on_policy:
        return tcfg, {}, []
    return tcfg, {"summary_set": {k: getattr(cfg, k) for k in agents.SUMMARY_SET_OPTIONS}}, ["reasoning"]


def run(cfg):
    """The whole job for a DPOConfig: missing stages, the DPO rounds, the evaluation -> eval.run_eval's results. Under
    torchrun rank 0 alone writes, logs, prints and evaluates; the others wait for its results."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rank, _, device = common.setup_distributed(cfg.device)
    common.writable_dir(cfg.out)
    build_missing_stages(cfg)
    data_dir = os.path.join(cfg.out, "data")
    train_rows = data.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    val_rows = data.read_jsonl(os.path.join(data_dir, "val.jsonl"))[:cfg.val_size]
    summary = VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "summary")).to(device).eval()
    policy = VLM.from_pretrained(checkpoint.stage_dir(cfg.out, "reasoning")).to(device).eval()
    answer_filter, scorer, rebuild = data.AnswerFilter(), data.SceneStepScorer(), set(cfg.rebuild or ())
    os.makedirs(os.path.join(cfg.out, "logs"), exist_ok=True)
    log_path, t_dpo = os.path.join(cfg.out, "logs", "dpo.jsonl"), time.time()

    def log(record):  # elapsed_s: seconds since the DPO part began
        common.log_record(log_path, {**record, "elapsed_s": round(time.time() - t_dpo, 3)})

    def report(name, stats):
        val = common.on_rank0(evaluation.evaluate_two_agent, policy, summary, val_rows, data_dir,
                              precision=cfg.precision)
        row = {"round": name, **stats, "val/chain_correct": val["chain_correct"], "val/two_agent": val["overall"]}
        log({"event": "round", **row})
        common.print0(f"[dpo] {name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in row.items() if k != "round"))
        return row

    table = [report("sft", {})]
    for t in range(1, cfg.iters + 1):
        round_dir = checkpoint.stage_dir(cfg.out, f"reasoning_dpo{t}")
        record = job_record(cfg, [f"reasoning_dpo{t - 1}" if t > 1 else "reasoning"])
        if checkpoint.cached(round_dir, f"DPO round {t}", record, "add --rebuild dpo", cfg.force or "dpo" in rebuild):
            policy = VLM.from_pretrained(round_dir).to(device).eval()
            table.append(checkpoint.marker(round_dir))
            continue
        common.print0(f"[stage] DPO round {t}/{cfg.iters}: sample {cfg.samples_per_question} chains x "
                      f"{cfg.pool_size} questions, rank, pair, train")
        t_round = time.time()
        if cfg.fresh_pool:  # new scenes for every round, each seed its own
            pool = common.on_rank0(data.extra_split, data_dir, f"dpo{t}-seed{cfg.seed}{'-hard' * cfg.hard_pool}",
                                   cfg.pool_size, **(data.hard_scenes(data_dir) if cfg.hard_pool else {}))
        else:  # fixed per round
            pool = random.Random(cfg.seed + t).sample(train_rows, min(cfg.pool_size, len(train_rows)))
        pairs, pair_stats = round_pairs(policy, pool, data_dir, cfg, cfg.seed + 1000 * t, answer_filter, scorer)
        if not pairs:
            raise SystemExit(f"error: round {t} produced no preference pairs (no sound, right sample above a worse "
                             f"one); raise --samples-per-question or --pool-size, or pass --no-pass-filter")
        stats = {**dpo_round(policy, pairs, cfg, device, log, t, data_dir), **pair_stats}
        stats["wall_s"] = round(time.time() - t_round, 1)  # sampling and training: what the controls are matched to
        row = report(f"dpo{t}", stats)
        common.on_rank0(policy.save_pretrained, round_dir)  # rank 0 writes, the others wait: the controls read it
        common.on_rank0(common.atomic_write, os.path.join(round_dir, checkpoint.ROUND_DONE),
                        lambda f: common.write_json({**row, **record}, f))
        table.append(row)

    common.print0("\nIterative DPO, per round (val):\n" + "\n".join(plots.rounds_table(table)))
    if cfg.iters and (cfg.sft_more or cfg.teacher_bound):
        build_controls(cfg)
    return evaluate_run(cfg, device, t0, rounds=cfg.iters)


def build_controls(cfg):
    """The rounds' controls: the SFT reasoning agent trained on for as many steps as its stage makes in the rounds'
    wall time, sampling included; without them a gain of RL may be only more training (arXiv 2512.07783)."""
    sft = checkpoint.marker(checkpoint.stage_dir(cfg.out, "reasoning"))
    rounds = [checkpoint.marker(checkpoint.stage_dir(cfg.out, f"reasoning_dpo{t}")) for t in range(1, cfg.iters + 1)]
    if any("wall_s" not in r for r in rounds):
        raise ValueError(f"{cfg.out}: DPO rounds built before their wall time was recorded: add --rebuild dpo")
    rl_s = sum(r["wall_s"] for r in rounds)
    steps = max(1, round(rl_s * sft["steps"] / sft["wall_s"]))
    common.print0(f"[stage] controls: {steps} SFT steps each, as long as the {cfg.iters} DPO rounds took ({rl_s:.0f}s)")
    build_missing_stages(cfg, [s for s, on in (("reasoning-more", cfg.sft_more),
                                               ("reasoning-teacher-hard", cfg.teacher_bound)) if on], steps)


def evaluate_run(cfg, device, t0, rounds=None):
    """Every arm of the run on the test split, DPO rounds 1..rounds (rank 0; under torchrun the others wait), and the
    job's last line."""
    results = common.on_rank0(evaluation.run_eval, cfg.out, limit=cfg.eval_limit or None, device=device,
                              precision=cfg.precision, rounds=rounds)
    stem = evaluation.results_stem(cfg.out, limit=cfg.eval_limit or None)
    common.print0(f"\ndone in {time.time() - t0:.0f}s; results in {stem}.md")
    return results


def main(argv=None):
    cfg = common.parse_config(DPOConfig, argv, description=__doc__.splitlines()[0])
    try:
        with common.run_lock(cfg.out, os.path.join(cfg.out, "data")):  # one run per directory
            results = run(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line: what was saved, how to continue
        again = "without --force / --rebuild" if cfg.force or cfg.rebuild else "again"  # not to rebuild them again
        common.interrupted(f"{str(e) or 'finished stages and rounds are kept'}; continue: the same command {again}")
    common.cleanup_distributed()
    return results


if __name__ == "__main__":
    main()
