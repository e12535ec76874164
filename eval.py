"""Evaluation: does the two-agent system beat a direct answer and a single model that reasons, and does RL improve it
beyond what the same compute spent on SFT does, without losing perception? The arms (the paper's Table 1 and Table 5
ablation, arXiv 2411.14432) are checkpoints from train_sft.py / train_dpo.py / train_grpo.py:

    direct                  base                    the base model answers at once ("base model")
    vanilla                 vanilla                 one model writes the chain, then the answer, in one reply
    summary_only            summary-only            the summary agent trained without chains answers at once
    two_agent               reasoning + summary     the two agents after SFT ("+ multi-agent")
    two_agent_dpoT          reasoning_dpoT          after DPO round T ("+ iterative DPO"), with the same summary agent
    two_agent_grpo          reasoning_grpo          after train_grpo.py (GRPO instead of DPO)
    two_agent_sft_more      reasoning-more          controls: SFT on, as long as the DPO rounds took, on the agent's
    two_agent_teacher_hard  reasoning-teacher-hard    own set / on the teacher's chains for hard questions

Each arm runs on the held-out test split (no training scene), and the two agents' arms also on the hard test split
when the world has one (scenes larger than any SFT set's): accuracy overall, on reasoning and perception and per
family, with 95% Wilson intervals (Wilson 1927), which stay inside [0, 1] near 0 or 1 where p +- z sqrt(p(1-p)/n)
does not. Arms with a chain add `chain_correct` and the 2x2 table of chain against final answer: how often the summary
agent fixes a flawed chain or spoils a sound one. Arms are compared on the same questions with the exact McNemar test
(paired_comparisons): pairing removes the questions' shared difficulty from the noise. results.png draws both.

    python eval.py                                        # every arm whose checkpoints exist in out/
    python eval.py --arms direct,two_agent --limit 200  # a part: out/results_test_limit200_direct+two_agent.md
    python eval.py --data bench.jsonl --reasoning DIR --summary DIR   # JSONL rows: image, question, answer[, choices]
    python eval.py --data bench.jsonl --model DIR                      # one model, direct answer
    python eval.py --summarize out out_seed1 out_seed2     # runs (seeds) side by side, means, pooled paired tests
    python eval.py --plot out                              # redraw out/results.png from out/results.json
    python eval.py --plot-logs out/logs                    # loss against step of every stage -> out/training.png
"""

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import agents
import checkpoint
import common
import data
import plots
import train_sft
from common import option  # the config has a field named data


Z95 = 1.959963984540054  # the standard normal quantile at 0.975


# ----------------------------------------------------------------------------------------------
# Metrics

def wilson_interval(successes, n, z=Z95):
    """Wilson score interval of a proportion successes / n -> (low, high); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def mcnemar(b, c):
    """Exact two-sided McNemar test (McNemar 1947) of two arms on the same questions -> p. Only discordant questions
    count: b where A is right and B wrong, c the reverse; if A and B are equally accurate, b ~ Binomial(b + c, 1/2).
    Exact (binomial) rather than chi-square: b + c is often a few dozen or fewer, where chi-square is poor."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def rate(flags):
    """Booleans -> (share true, its Wilson interval); (None, None) for no items."""
    if not flags:
        return None, None
    return sum(flags) / len(flags), list(wilson_interval(sum(flags), len(flags)))


def chain_vs_final(chain_right, final_right):
    """The 2x2 table of chain-correct against final-answer-correct, as counts."""
    table = {f"chain_{c}_final_{f}": 0 for c in ("right", "wrong") for f in ("right", "wrong")}
    for c, f in zip(chain_right, final_right):
        table[f"chain_{'right' if c else 'wrong'}_final_{'right' if f else 'wrong'}"] += 1
    return table


def right(prediction, row):
    return prediction is not None and data.is_correct(prediction, row["answer"], row.get("choices"))


def score(rows, predictions):
    """Gold rows and an arm's predictions ({answer, chain_answer, ...} per row) -> metrics."""
    final = [right(p["answer"], r) for r, p in zip(rows, predictions)]
    metrics = {"n": len(rows), "correct": "".join("01"[f] for f in final)}  # per row, for paired tests: "1101..."
    for name, keep in (("overall", lambda r: True), ("reasoning", lambda r: r.get("kind") == "reasoning"),
                       ("perception", lambda r: r.get("kind") == "perception")):
        metrics[name], metrics[f"{name}_ci"] = rate([f for f, r in zip(final, rows) if keep(r)])
    metrics["families"] = {}
    for family in sorted({r["family"] for r in rows if r.get("family")}):
        flags = [f for f, r in zip(final, rows) if r.get("family") == family]
        accuracy, ci = rate(flags)
        kind = next(r.get("kind") for r in rows if r.get("family") == family)
        metrics["families"][family] = {"kind": kind, "accuracy": accuracy, "ci": ci, "n": len(flags)}
    if any(p["chain"] is not None for p in predictions):
        chain = [right(p["chain_answer"], r) for r, p in zip(rows, predictions)]
        metrics["chain_correct"], metrics["chain_correct_ci"] = rate(chain)
        metrics["chain_vs_final"] = chain_vs_final(chain, final)
        metrics["chain_right"] = "".join("01"[c] for c in chain)
        for family, m in metrics["families"].items():  # where the final answer overrides or repairs the chain
            m["chain_vs_final"] = chain_vs_final(*zip(*[(c, f) for c, f, r in zip(chain, final, rows)
                                                        if r.get("family") == family]))
    return metrics


def paired_comparisons(arms, rows):
    """Arms' per-row flags ("correct", "chain_right") -> {"A vs B[ (metric)]": {arms: [A, B], metric, n: questions,
    b: A right and B wrong, c: the reverse, diff: (b - c) / n = A's accuracy minus B's, p: mcnemar(b, c)}}, wherever
    both ran: each later two-agent arm against the SFT two agents, each RL arm against the compute-matched SFT (answer
    and chain); the two agents and the last DPO round against vanilla (overall) and direct (reasoning, perception
    apart); GRPO against the last DPO round."""
    rounds = plots.dpo_arms(arms)  # [(T, arm)], by round
    plan = [(a, "two_agent", m) for a in arms if a.startswith("two_agent_") for m in ("overall", "chain")]
    plan += [(a, b, m) for a in ["two_agent"] + [a for _, a in rounds[-1:]]
             for b, m in (("vanilla", "overall"), ("direct", "reasoning"), ("direct", "perception"))]
    plan += [("two_agent_grpo", a, m) for _, a in rounds[-1:] for m in ("overall", "chain")]
    plan += [(a, "two_agent_sft_more", m) for a in [a for _, a in rounds] + ["two_agent_grpo"]
             for m in ("overall", "chain")]
    tests = {}
    for a, b, metric in plan:
        key = "chain_right" if metric == "chain" else "correct"
        if key not in arms.get(a, {}) or key not in arms.get(b, {}):
            continue
        pairs = [(x, y) for x, y, r in zip(arms[a][key], arms[b][key], rows)
                 if metric in ("overall", "chain") or r.get("kind") == metric]
        if pairs:
            n_b, n_c = pairs.count(("1", "0")), pairs.count(("0", "1"))
            tests[f"{a} vs {b}" + ("" if metric == "overall" else f" ({metric})")] = {
                "arms": [a, b], "metric": metric, "n": len(pairs), "b": n_b, "c": n_c,
                "diff": (n_b - n_c) / len(pairs), "p": mcnemar(n_b, n_c)}
    return tests


# ----------------------------------------------------------------------------------------------
# Arms: which checkpoints answer, and how

def arm_checkpoints(out_dir, rounds=None):
    """Every arm whose stages are all finished (their marker, checkpoint.finished: an interrupted stage is no arm) ->
    {arm: (task, [checkpoint dirs])}, in table order; DPO rounds 1..rounds only, when given."""
    stages = {"direct": ["base"], "vanilla": ["vanilla"], "summary_only": ["summary-only"],
              "two_agent": ["reasoning", "summary"], "two_agent_sft_more": ["reasoning-more", "summary"]}
    dpo = checkpoint.dpo_rounds(out_dir, rounds)
    stages |= {f"two_agent_dpo{t}": [os.path.basename(path), "summary"] for t, path in dpo.items()}
    last = f"reasoning_dpo{max(dpo, default=0)}"  # the rounds a control must be matched to
    # train_grpo.py's reasoning agent beside the DPO rounds, and the upper bound of both; the same summary agent
    stages |= {"two_agent_grpo": ["reasoning_grpo", "summary"],
               "two_agent_teacher_hard": ["reasoning-teacher-hard", "summary"]}
    arms = {arm: (arm if len(names) == 1 else "two_agent", [checkpoint.stage_dir(out_dir, s) for s in names])
            for arm, names in stages.items()}  # a single model answers as its arm's task
    return {name: (task, dirs) for name, (task, dirs) in arms.items() if checkpoint.finished(dirs[0], last if train_sft
            .STAGES.get(stages[name][0], {}).get("after_rl") else None) and all(map(checkpoint.finished, dirs[1:]))}


def predict(task, vlms, rows, image_root, batch_size=64, desc=None, precision="auto", margin=agents.OVERRIDE_MARGIN):
    """An arm's answers: the two agents in turn (task "two_agent"; margin: agents.SummaryAgent's), or one model."""
    if task == "two_agent":
        reasoner = agents.ReasoningAgent(vlms[0], precision=precision)
        summarizer = agents.SummaryAgent(vlms[1], precision=precision, override_margin=margin)
        return agents.TwoAgentSystem(reasoner, summarizer, batch_size).answer(rows, image_root, desc)
    return agents.answer_direct(vlms[0], rows, image_root, task, batch_size, desc=desc, precision=precision)


def evaluate_two_agent(reasoner_vlm, summary_vlm, rows, image_root, batch_size=64, precision="auto"):
    """Metrics of two loaded agents on rows (train_dpo.py calls this on val after every round)."""
    return score(rows, predict("two_agent", [reasoner_vlm, summary_vlm], rows, image_root, batch_size,
                               "two-agent eval", precision))


def evaluate_arms(arm_specs, rows, image_root, batch_size, device=None, precision="auto",
                  margin=agents.OVERRIDE_MARGIN):
    """{arm: (task, dirs)} -> {arm: metrics + checkpoints + wall_s}, with a progress bar per arm."""
    results, loaded = {}, {}
    for name, (task, dirs) in arm_specs.items():
        # Only this arm's models stay in memory; a summary agent shared by consecutive arms is loaded once.
        loaded = {d: loaded[d] if d in loaded else agents.load_vlm(d, device) for d in dirs}
        start = time.time()
        answers = predict(task, [loaded[d] for d in dirs], rows, image_root, batch_size, name, precision, margin)
        metrics = score(rows, answers)
        results[name] = {**metrics, "checkpoints": dirs, "wall_s": round(time.time() - start, 1)}
        print(f"[eval] {name}: overall {plots.fmt(metrics['overall'])}, reasoning {plots.fmt(metrics['reasoning'])}, "
              f"perception {plots.fmt(metrics['perception'])} ({results[name]['wall_s']:.0f}s)")
    return results


def finish(arms, rows, meta, path_stem, start, hard=None):
    """Add the paired tests, the hard split's arms (hard) and the run's description, write <stem>.json, <stem>.md
    (results.md: the README's table) and <stem>.png (its chart) atomically, print."""
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
    margin = meta.get("override_margin", agents.OVERRIDE_MARGIN)
    meta = {**meta, "n_questions": len(rows), "ids": [r.get("id", i) for i, r in enumerate(rows)],
            "kinds": [r.get("kind") for r in rows]}  # in row order, as the arms' per-question flags
    results = {"arms": arms, "paired": paired_comparisons(arms, rows), **({"hard": hard} if hard else {}),
               "meta": {"command": "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                        "machine": machine, "wall_s": round(time.time() - start, 1), **meta,
                        "decoding": f"greedy; chain <= {agents.CHAIN_TOKENS} tokens, answer <= "
                                    f"{agents.ANSWER_TOKENS} tokens; summary agent's override margin "
                                    + ("off (its answers as decoded)" if margin is None else f"{margin:g} nats")}}
    markdown = plots.results_markdown(results)
    common.atomic_write(path_stem + ".json", lambda f: common.write_json(results, f))
    common.atomic_write(path_stem + ".md", lambda f: Path(f).write_text(markdown))
    print("\n" + markdown)
    plots.save_png(plots.results_chart(results), path_stem + ".png")
    return results


def read_questions(path, limit=None, skip_bad=False):
    """A question file's first `limit` rows, checked as by data.py --real before any model runs; none is an error."""
    rows = data.read_jsonl(path, skip_bad, ("image", "question", "answer"), check_images=True)[:limit]
    if not rows:
        raise ValueError(f"{path}: no questions to evaluate")
    return rows


def results_stem(out_dir, split="test", limit=None, arms=None):
    """out_dir/results for every arm on the whole test split (the job's table); a part of it (another split, --limit,
    --arms) goes to its own file, results_<split>[_limit<N>][_<arms>], and never replaces the whole."""
    whole = split == "test" and not limit and not arms
    parts = [] if whole else [split] + [f"limit{limit}"] * bool(limit) + ["+".join(arms or [])] * bool(arms)
    return os.path.join(out_dir, "_".join(["results", *parts]))


def run_eval(out_dir="out", arms=None, split="test", limit=None, batch_size=64, device=None, precision="auto",
             margin=agents.OVERRIDE_MARGIN, rounds=None):
    """The arms (default: all whose checkpoints exist) on out_dir/data/<split>.jsonl -> <results_stem>.{json,md,png}."""
    start = time.time()
    path = os.path.join(out_dir, "data", f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: build the data first (python train_dpo.py --iters 3 builds everything)")
    rows = read_questions(path, limit)
    available = arm_checkpoints(out_dir, rounds)
    missing = [a for a in arms or () if a not in available]
    if missing:
        raise FileNotFoundError(f"no checkpoints in {out_dir} for arm(s) {', '.join(missing)}; "
                                f"available: {', '.join(available) or 'none'}")
    chosen = {a: available[a] for a in arms} if arms else available
    if not chosen:
        raise FileNotFoundError(f"no checkpoints in {out_dir}: train them first (python train_dpo.py --iters 3)")
    common.writable_dir(out_dir)  # before the work, not at the save after it
    results = evaluate_arms(chosen, rows, os.path.dirname(path), batch_size, device, precision, margin)
    hard, path_hard = None, os.path.join(out_dir, "data", "hard_test.jsonl")
    two = {a: spec for a, spec in chosen.items() if spec[0] == "two_agent"}  # on scenes larger than any SFT set's
    if split == "test" and two and os.path.isfile(path_hard):
        rows_hard = read_questions(path_hard, limit)
        print(f"[eval] the hard test split ({len(rows_hard)} questions):")
        arms_hard = evaluate_arms(two, rows_hard, os.path.dirname(path_hard), batch_size, device, precision, margin)
        hard = {"arms": arms_hard, "paired": paired_comparisons(arms_hard, rows_hard), "data": path_hard}
    meta = {"data": path, "split": split, "override_margin": margin}
    return finish(results, rows, meta, results_stem(out_dir, split, limit, arms), start, hard)


def run_benchmark(data_path, reasoning=None, summary=None, model=None, task="direct", out_dir="out",
                  limit=None, batch_size=64, device=None, precision="auto", skip_bad=False,
                  margin=agents.OVERRIDE_MARGIN):
    """A JSONL benchmark for the two agents or one `model` (answering as `task`) -> out_dir/results_<file>.{json,md}."""
    start = time.time()
    if not (model or (reasoning and summary)):
        raise ValueError("pass --reasoning and --summary for the two agents, or --model for one model")
    specs = {task: (task, [model])} if model else {"two_agent": ("two_agent", [reasoning, summary])}
    rows = read_questions(data_path, limit, skip_bad)
    common.writable_dir(out_dir)
    image_root = os.path.dirname(os.path.abspath(data_path))
    results = evaluate_arms(specs, rows, image_root, batch_size, device, precision, margin)
    stem = os.path.join(out_dir, "results_" + os.path.splitext(os.path.basename(data_path))[0])
    return finish(results, rows, {"data": data_path, "override_margin": margin}, stem, start)


# ----------------------------------------------------------------------------------------------
# Several runs (seeds) together

def summarize(dirs):
    """Run directories (one per seed) -> pool_runs of their results.json, with "hard": the same of their hard test
    split where every run has one."""
    if not dirs:
        raise ValueError("--summarize: no run directories given")
    loaded = {d: plots.read_results(d) for d in dirs}  # each checked to be what eval.py writes
    summary = pool_runs(loaded)
    if all("hard" in r for r in loaded.values()):
        summary["hard"] = pool_runs({d: r["hard"] for d, r in loaded.items()})
    elif any("hard" in r for r in loaded.values()):
        summary["notes"].append("Not every run has the hard test split: its tables are left out.")
    if len({json.dumps(r.get("meta", {}).get("ids")) for r in loaded.values()}) > 1:
        summary["notes"].append("The runs were evaluated on different questions.")
    return summary


def pool_runs(loaded):
    """{run: its results (arms, paired)} -> {runs: {run: {arm: {share: value}}}, mean: {arm: {runs, share: {mean,
    min, max}}}, pooled: {comparison: {..., b, c summed over runs, p = mcnemar(b, c), diff: mean, ahead: runs where A
    beat B, runs}}, notes}. Runs on the same questions are not independent (a hard question stays hard), so the pooled
    p is optimistic: read it beside `ahead`."""
    runs = {d: {arm: {k: m.get(k) for k in plots.SHARES} for arm, m in r["arms"].items()} for d, r in loaded.items()}
    mean = {arm: {"runs": sum(arm in arms for arms in runs.values())} for arms in runs.values() for arm in arms}
    for arm, k in [(arm, k) for arm in mean for k in plots.SHARES]:
        v = [arms[arm][k] for arms in runs.values() if arm in arms and arms[arm][k] is not None]
        mean[arm][k] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} if v else None
    paired, notes = {}, []
    for d, r in loaded.items():  # an older results.json without "paired": from its per-question flags, if any
        rows = [{"kind": k} for k in r.get("meta", {}).get("kinds", [])]
        paired[d] = r["paired"] if "paired" in r else paired_comparisons(r["arms"], rows)
        if not paired[d]:
            notes.append(f"{os.path.join(d, 'results.json')}: no paired tests; left out of the pooled ones")
            del paired[d]
    pooled = {}
    for key in [k for k in next(iter(paired.values()), {}) if all(k in p for p in paired.values())]:
        tests = [p[key] for p in paired.values()]
        b, c = sum(t["b"] for t in tests), sum(t["c"] for t in tests)
        pooled[key] = {"arms": tests[0]["arms"], "metric": tests[0]["metric"], "b": b, "c": c, "p": mcnemar(b, c),
                       "diff": sum(t["diff"] for t in tests) / len(tests), "ahead": sum(t["diff"] > 0 for t in tests),
                       "runs": len(tests)}
    return {"runs": runs, "mean": mean, "pooled": pooled, "notes": notes}


# ----------------------------------------------------------------------------------------------
# CLI

@dataclass
class EvalConfig:
    out: str = option("out", "run directory: checkpoints, data/<split>.jsonl, results")
    arms: str = option(None, "comma-separated arms (default: all whose checkpoints exist)")
    split: str = option("test", "which split of <out>/data to evaluate on")
    limit: int = option(None, "evaluate only the first N questions", type=int, min=1)
    batch_size: int = option(64, "questions decoded together", min=1)
    data: str = option(None, "a JSONL benchmark (image, question, answer[, choices]) instead of the arms")
    skip_bad: bool = option(False, "with --data: skip and count bad lines, as data.py does")
    reasoning: str = option(None, "with --data: reasoning agent checkpoint")
    summary: str = option(None, "with --data: summary agent checkpoint")
    model: str = option(None, "with --data: one model that answers alone")
    task: str = option("direct", "with --model: how it answers", choices=["direct", "summary_only", "vanilla"])
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    override_margin: float = common.option_of(agents.AgentsConfig, "override_margin")
    precision: str = option("auto", "decoding precision: auto = bf16 on a GPU (fp16 before Ampere), fp32 on "
                            "the CPU", choices=["auto", "bf16", "fp16", "fp32"])
    summarize: str = option(None, "run directories (seeds): their results.json side by side, the mean per arm "
                            "and the paired tests pooled over runs; evaluates nothing", nargs="+")
    plot: str = option(None, "a run directory (or a results JSON file): redraw its results.png from results.json; "
                       "evaluates nothing")
    plot_logs: str = option(None, "a logs directory (out/logs): loss against step for every training stage, in one "
                            "PNG (default: training.png beside the directory)")
    plot_out: str = option(None, "with one of --plot, --plot-logs: the PNG to write instead of the default")


def main(argv=None):
    cfg = common.parse_config(EvalConfig, argv, description="Accuracy of every arm, with confidence intervals.")
    try:
        if cfg.plot_out and (cfg.plot is None) == (cfg.plot_logs is None):
            raise ValueError("--plot-out names the PNG of either --plot or --plot-logs: pass one of them with it")
        if cfg.plot is not None or cfg.plot_logs is not None:  # either or both; nothing is evaluated
            if cfg.plot is not None:
                plots.plot_results(cfg.plot, cfg.plot_out)
            if cfg.plot_logs is not None:
                plots.plot_logs(cfg.plot_logs, cfg.plot_out)
            return None
        if cfg.summarize is not None:
            summary = summarize(cfg.summarize)
            print(plots.summary_markdown(summary))
            return summary
        device = common.resolve_device(cfg.device)
        if cfg.override_margin == -math.inf:  # the paper's rule: recorded as null, not as JSON's nonstandard -Infinity
            cfg.override_margin = None
        if cfg.data:
            return run_benchmark(cfg.data, cfg.reasoning, cfg.summary, cfg.model, cfg.task, cfg.out, cfg.limit,
                                 cfg.batch_size, device, cfg.precision, cfg.skip_bad, cfg.override_margin)
        with common.run_lock(cfg.out):  # not while a training writes there
            return run_eval(cfg.out, cfg.arms.split(",") if cfg.arms else None, cfg.split, cfg.limit, cfg.batch_size,
                            device, cfg.precision, cfg.override_margin)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # results are written only at the end
        common.interrupted("no results were written; run the command again")


if __name__ == "__main__":
    main()
