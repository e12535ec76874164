"""plots.py: the two pictures, drawn with Pillow alone, and the markdown tables. Skip it on a first read. results.png:
accuracy per arm with 95% Wilson intervals, and chain correctness per DPO round (and GRPO); training.png: the loss of
every training stage against step; the tables of results.md and of eval.py --summarize.
"""

import functools
import json
import math
import os
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import common
import data
import train_sft

GROUPS = {"overall": (66, 103, 172), "reasoning": (230, 140, 30), "perception": (80, 160, 90)}  # bar colours
ROUNDS, GRPO, TRAIN, VAL = (120, 80, 160), (200, 50, 50), (150, 170, 210), (220, 90, 40)
INK, GREY, GRID, WHITE = (40, 40, 40), (150, 150, 150), (222, 222, 222), (255, 255, 255)
TITLE, SMALL = 16, 13  # font sizes, px
RESULTS_SIZE, PANEL = (1000, 750), (333, 250)  # results.png; one stage of training.png (3 to a row)


@functools.cache
def font(size):
    """Pillow's own font: scalable from Pillow 10.1; before it, one small bitmap size."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text(draw, xy, s, size=SMALL, anchor="lt"):
    """Draw s placed by its box: anchor = l/m/r then t/m/b. Pillow's own anchors need a scalable font."""
    left, top, right, bottom = draw.textbbox((0, 0), s, font=font(size))
    x = xy[0] - left - {"l": 0, "m": (right - left) / 2, "r": right - left}[anchor[0]]
    y = xy[1] - top - {"t": 0, "m": (bottom - top) / 2, "b": bottom - top}[anchor[1]]
    draw.text((round(x), round(y)), s, font=font(size), fill=INK, align="center")


def wrap(name, width):
    """Break an arm's name after an underscore wherever a line would be wider than width px."""
    lines = []
    for part in name.split("_"):
        if lines and font(SMALL).getlength(f"{lines[-1]}_{part}") <= width:
            lines[-1] += "_" + part
        else:
            lines.append(part)
    return "_\n".join(lines)  # every break is at an underscore


def legend(draw, right, y, entries):
    """Colour swatches and their names [(name, colour)] in one row that ends at x = right."""
    widths = [font(SMALL).getlength(name) + 36 for name, _ in entries]
    x = right - sum(widths)
    for (name, colour), width in zip(entries, widths):
        draw.rectangle([x, y - 6, x + 12, y + 6], fill=colour)
        text(draw, (x + 18, y), name, anchor="lm")
        x += width


def ticks(lo, hi, log=False):
    """Round values that cover [lo, hi] -> (axis low, axis high, ticks): 1-3-10 steps on a log axis, about five
    steps of 1, 2 or 5 x 10^k on a linear one."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        marks = [m * 10.0 ** e for e in decades for m in (1, 3)]
        lo, hi = max(m for m in marks if m <= lo), min(m for m in marks if m >= hi)
        return lo, hi, [m for m in marks if lo <= m <= hi]
    raw = ((hi - lo) or abs(hi) or 1) / 5
    e = 10 ** math.floor(math.log10(raw))
    step = next(m * e for m in (1, 2, 5, 10) if m * e >= raw)
    lo = math.floor(lo / step) * step
    hi = max(math.ceil(hi / step) * step, lo + step)  # a flat line still gets a range
    return lo, hi, [round(lo + i * step, 10) for i in range(round((hi - lo) / step) + 1)]


def y_axis(draw, box, lo, hi, marks, unit, log=False):
    """Grid lines and labels at marks, the axes and the unit above them, in box = (left, top, right, bottom), the
    plot area in px -> value -> pixel row."""
    left, top, right, bottom = box
    f = math.log if log else float

    def to_y(v):
        return round(bottom - (f(v) - f(lo)) / (f(hi) - f(lo)) * (bottom - top))
    for m in marks:
        draw.line([(left, to_y(m)), (right, to_y(m))], fill=GRID)
        text(draw, (left - 6, to_y(m)), f"{m:g}", anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK)
    text(draw, (left - 6, top - 14), unit, anchor="rb")
    return to_y


def whisker(draw, x, ci, to_y):
    """A 95% interval (shares) as a capped vertical line -> its top row, where the value's label goes."""
    high, low = to_y(100 * ci[1]), to_y(100 * ci[0])
    draw.line([(x, high), (x, low)], fill=INK)
    for y in (high, low):
        draw.line([(x - 4, y), (x + 4, y)], fill=INK)
    return high


def bar_panel(draw, box, arms):
    """Overall / reasoning / perception accuracy of every arm, in the results' order, each with its interval."""
    left, top, right, bottom = box
    to_y = y_axis(draw, box, 0, 100, range(0, 101, 20), "%")
    step = (right - left) / len(arms)  # px per arm: its three bars, then a gap
    width = round(step * 0.8 / len(GROUPS))
    size = next((s for s in (SMALL, 12, 11, 10) if font(s).getlength("88.8") <= width), 9)  # values fit their bars
    for i, (name, m) in enumerate(arms.items()):
        for j, (group, colour) in enumerate(GROUPS.items()):
            x = round(left + step * (i + 0.1)) + width * j
            if m.get(group) is not None:  # a benchmark without kinds has no reasoning / perception share
                draw.rectangle([x, to_y(100 * m[group]), x + width - 1, bottom], fill=colour)
                high = whisker(draw, x + width // 2, m[f"{group}_ci"], to_y)
                text(draw, (x + width // 2, high - 3), f"{100 * m[group]:.1f}", size, "mb")
        text(draw, (left + step * (i + 0.5), bottom + 8), wrap(name, step - 6), anchor="mt")


def dpo_arms(arms):
    """The DPO rounds' arms (two_agent_dpo<T>) -> [(T, arm)], by round (eval.py's paired tests use it too)."""
    return sorted((int(m[1]), a) for a in arms if (m := re.fullmatch(r"two_agent_dpo(\d+)", a)))


def round_panel(draw, box, arms):
    """Chain correct of the reasoning agent after SFT (round 0) and each DPO round, joined; GRPO's apart."""
    left, top, right, bottom = box
    points = [("round 0\n(SFT)", arms.get("two_agent"))] + [(f"round {t}", arms[a]) for t, a in dpo_arms(arms)]
    points = [(label, m) for label, m in points + [("GRPO", arms.get("two_agent_grpo"))]
              if m and m.get("chain_correct") is not None]
    if not points:  # e.g. a --data benchmark of one model
        text(draw, ((left + right) / 2, (top + bottom) / 2), "no two-agent arm in these results", anchor="mm")
        return
    lo, hi, marks = ticks(min(100 * m["chain_correct_ci"][0] for _, m in points),
                          max(100 * m["chain_correct_ci"][1] for _, m in points))
    to_y = y_axis(draw, box, lo, hi, marks, "%")  # points, not bars: the axis may start above 0
    step = (right - left) / len(points)
    xy = [(round(left + step * (i + 0.5)), to_y(100 * m["chain_correct"])) for i, (_, m) in enumerate(points)]
    draw.line([p for p, (label, _) in zip(xy, points) if label != "GRPO"], fill=ROUNDS, width=2)
    for (x, y), (label, m) in zip(xy, points):
        whisker(draw, x, m["chain_correct_ci"], to_y)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=GRPO if label == "GRPO" else ROUNDS)
        text(draw, (x + 8, y - 5), f"{100 * m['chain_correct']:.1f}", anchor="lb")  # above the joining line
        text(draw, (x, bottom + 8), label, anchor="mt")


def results_chart(results):
    """results.json -> results.png (RESULTS_SIZE): accuracy per arm above, chain correct per DPO round below."""
    image = Image.new("RGB", RESULTS_SIZE, WHITE)
    draw, (w, _) = ImageDraw.Draw(image), RESULTS_SIZE
    arms, split = results["arms"], results.get("meta", {}).get("split")  # no split: a --data benchmark
    questions = f"{next(iter(arms.values()))['n']}{' ' + split if split else ''} questions"
    text(draw, (20, 14), f"Accuracy (%) per arm on {questions}, with 95% Wilson intervals", TITLE)
    legend(draw, w - 20, 50, [(f"{g} questions" if g != "overall" else g, c) for g, c in GROUPS.items()])
    bar_panel(draw, (60, 90, w - 20, 390), arms)
    text(draw, (20, 470), "Reasoning agent's chain correct (%): SFT = round 0, then each DPO round; GRPO apart", TITLE)
    legend(draw, w - 20, 506, [("DPO rounds", ROUNDS)] + [("GRPO", GRPO)] * ("two_agent_grpo" in arms))
    round_panel(draw, (60, 530, w - 20, 700), arms)
    return image


def read_log(path):
    """A training log (JSONL) -> (train losses [(step, loss)], val losses [(step, loss)], steps where a DPO round
    begins). Steps are counted in the log's order: train_dpo.py starts its count again every round."""
    def finite(v):  # GRPO logs no loss when every group ties; a diverged step's NaN has no place on an axis
        return isinstance(v, (int, float)) and math.isfinite(v)
    try:
        steps = [r for r in data.read_jsonl(path) if "step" in r and "event" not in r]  # events: checks, val reports
        train = [(i, r["loss"]) for i, r in enumerate(steps, 1) if finite(r.get("loss"))]
        val = [(i, r["val_loss"]) for i, r in enumerate(steps, 1) if finite(r.get("val_loss"))]
    except (AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a training log of this project ({e})") from None
    starts = [i for i in range(2, len(steps) + 1) if steps[i - 1].get("round") != steps[i - 2].get("round")]
    return train, val, starts


def loss_panel(draw, corner, stage, log):
    """One stage's train (and val) loss against step, in the PANEL-sized cell at corner (x, y)."""
    (train, val, starts), (x0, y0) = log, corner
    left, top, right, bottom = x0 + 60, y0 + 52, x0 + PANEL[0] - 15, y0 + PANEL[1] - 42
    losses, n = [v for _, v in train + val], max(s for s, _ in train + val)
    log_y = min(losses) > 0 and max(losses) / min(losses) > 10  # SFT's loss falls by decades: see its tail too
    rounds = f", {len(starts) + 1} rounds" if starts else ""
    text(draw, ((left + right) / 2, y0 + 10), f"{stage}: {n} steps{rounds}" + " (log scale)" * log_y, anchor="mt")
    to_y = y_axis(draw, (left, top, right, bottom), *ticks(min(losses), max(losses), log_y), "loss", log_y)

    def to_x(step):
        return round(left + step / n * (right - left))
    for s in [t for t in ticks(0, n)[2] if t <= n]:
        text(draw, (to_x(s), bottom + 4), f"{s:g}", anchor="mt")
    text(draw, ((left + right) / 2, bottom + 22), "step", anchor="mt")
    for s in starts:  # a DPO round begins: its policy's loss starts again near log 2
        draw.line([(to_x(s), top), (to_x(s), bottom)], fill=GREY)
    for points, colour, width in ((train, TRAIN, 1), (val, VAL, 2)):
        draw.line([(to_x(s), to_y(v)) for s, v in points], fill=colour, width=width)
    for s, v in val:
        draw.ellipse([to_x(s) - 3, to_y(v) - 3, to_x(s) + 3, to_y(v) + 3], fill=VAL)


def training_chart(logs_dir):
    """Every stage's log in logs_dir -> (training.png: a panel per stage, 3 to a row, in the order the job trains
    them; the stages drawn)."""
    order = [*train_sft.STAGES, "dpo", "grpo"]
    names = sorted((p.stem for p in Path(logs_dir).glob("*.jsonl")),
                   key=lambda s: (order.index(s) if s in order else len(order), s))
    logs = {s: log for s in names if (log := read_log(os.path.join(logs_dir, f"{s}.jsonl")))[0]}
    if not logs:
        raise FileNotFoundError(f"no training logs in {logs_dir}: train first (python train_dpo.py --iters 3 "
                                f"writes them to out/logs)")
    image = Image.new("RGB", (3 * PANEL[0], 50 + PANEL[1] * math.ceil(len(logs) / 3)), WHITE)
    draw = ImageDraw.Draw(image)
    text(draw, (20, 14), "Training loss per stage", TITLE)
    legend(draw, image.width - 20, 24, [("train loss (each step)", TRAIN), ("val loss", VAL)])
    for i, (stage, log) in enumerate(logs.items()):
        loss_panel(draw, (PANEL[0] * (i % 3), 50 + PANEL[1] * (i // 3)), stage, log)
    return image, list(logs)


def save_png(image, path):
    """Write the picture atomically, its folder made if need be, and say where."""
    common.writable_dir(os.path.dirname(path) or ".", "--plot-out")
    common.atomic_write(path, lambda f: image.save(f, format="PNG"))
    print(f"[eval] wrote {path}")
    return path


# ----------------------------------------------------------------------------------------------
# eval.py --plot and --plot-logs: the pictures again, from what a run wrote

def results_file(run):
    """A run directory (its results.json) or a results JSON file itself -> the file's path."""
    return run if run.endswith(".json") else os.path.join(run, "results.json")


def read_results(run):
    """A run's results.json (or another results JSON file) -> its dict; missing or unreadable: one error naming it."""
    path = results_file(run)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: evaluate the run first (python eval.py writes it)")
    try:
        with open(path) as f:
            results = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: unreadable ({e})") from None
    hard = results.get("hard", results) if isinstance(results, dict) else None  # the hard split's arms, if any
    for part in (results, hard):  # valid JSON of another shape: one error
        arms, tests = (part.get("arms"), part.get("paired", {})) if isinstance(part, dict) else (None, None)
        if not (isinstance(arms, dict) and arms and all(isinstance(m, dict) and all(
                isinstance(m.get(k), (int, float, type(None))) for k in SHARES) for m in arms.values())
                and isinstance(tests, dict) and all(isinstance(t, dict) and {"arms", "metric", "b", "c", "diff"}
                                                    <= t.keys() for t in tests.values())):
            raise ValueError(f"{path}: not a results.json of eval.py (no arms, or not the arms and tests it writes)")
    return results


def plot_results(run, path=None):
    """--plot: a run's results.png (or path) redrawn from its results.json; evaluates nothing."""
    results = read_results(run)
    try:
        image = results_chart(results)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # valid JSON of another shape
        raise ValueError(f"{results_file(run)}: not a results.json of eval.py ({type(e).__name__}: {e})") from None
    return save_png(image, path or os.path.splitext(results_file(run))[0] + ".png")


def plot_logs(logs_dir, path=None):
    """--plot-logs: the loss of every stage logged in logs_dir -> path (default: training.png beside logs_dir)."""
    image, stages = training_chart(logs_dir)
    save_png(image, path or os.path.join(os.path.dirname(os.path.normpath(logs_dir)), "training.png"))
    return stages


# ----------------------------------------------------------------------------------------------
# The tables of results.md and of eval.py --summarize

def fmt(value, ci=None):
    """A share as a percentage, with its interval when given: 61.2 [58.1, 64.2]; - when undefined."""
    return "-" if value is None else f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown_table(header, rows):
    """A markdown table's lines: the header, the rule under it, then one line per row of cells."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(header), "|---" * len(header) + "|"] + [line(cells) for cells in rows]


def results_markdown(results):
    """results.json -> markdown: accuracy per arm, per family, chain vs final answer, and the run."""
    arms, run = results["arms"], results["meta"]  # run: how these numbers were made
    lines = ["Accuracy (%) with 95% Wilson intervals", "", *accuracy_table(arms)]
    families = sorted({(f["kind"] or "", name) for m in arms.values() for name, f in m["families"].items()})
    if families:
        rows = [[family, kind, *(fmt(m["families"].get(family, {}).get("accuracy")) for m in arms.values())]
                for kind, family in families]
        lines += ["", "Accuracy (%) per family", "", *markdown_table(["family", "kind", *arms], rows)]
    chained = {name: m["chain_vs_final"] for name, m in arms.items() if "chain_vs_final" in m}
    if chained:
        pairs = [(c, f) for c in ("right", "wrong") for f in ("right", "wrong")]  # the keys of chain_vs_final
        rows = [[name, *(t[f"chain_{c}_final_{f}"] for c, f in pairs)] for name, t in chained.items()]
        lines += ["", "Chain vs final answer (counts): does the final answer follow, fix or spoil the chain?", "",
                  *markdown_table(["arm", *(f"chain {c}, final {f}" for c, f in pairs)], rows)]
        rows = [[family, *(override_repair(arms[name]["families"].get(family, {})) for name in chained)]
                for _, family in families]
        lines += ["", "Per family: % of questions whose right chain the final answer overrides / whose wrong chain "
                  "it repairs", "", *markdown_table(["family", *chained], rows)]
    if results.get("paired"):
        lines += ["", "Paired comparisons (exact McNemar test on the same questions)", "",
                  *paired_table(results["paired"])]
    if results.get("hard"):  # eval.run_eval: the two agents' arms on scenes larger than any SFT set's
        hard = results["hard"]
        lines += ["", f"The hard test split ({hard['data']}): accuracy (%) with 95% Wilson intervals", "",
                  *accuracy_table(hard["arms"])]
        if hard.get("paired"):
            lines += ["", "Paired comparisons on the hard test split", "", *paired_table(hard["paired"])]
    m = run["machine"]
    lines += ["", f"Command: `{run['command']}` on {run['data']} ({run['n_questions']} questions); {run['decoding']}.",
              f"Machine: {m['platform']}, {m['cpus']} CPUs, accelerator {m['accelerator']}, torch {m['torch']}; "
              f"wall time {run['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def accuracy_table(arms):
    """Each arm's accuracy overall, per kind and of its chains, with their intervals -> markdown lines."""
    return markdown_table(["arm", "overall", "reasoning", "perception", "chain correct", "n"], [
        [name, *(fmt(m[k], m[f"{k}_ci"]) for k in ("overall", "reasoning", "perception")),
         fmt(m.get("chain_correct"), m.get("chain_correct_ci")), m["n"]] for name, m in arms.items()])


def override_repair(family):
    """A family's metrics -> "overridden / repaired" as % of its questions ("-" where the arm has no chains)."""
    t, n = family.get("chain_vs_final"), family.get("n")
    if not t or not n:
        return "-"
    return f"{100 * t['chain_right_final_wrong'] / n:.1f} / {100 * t['chain_wrong_final_right'] / n:.1f}"


def paired_table(tests, pooled=False):
    """Paired tests (paired_comparisons's, or summarize's pooled over runs) -> markdown lines."""
    header = ["comparison", "metric", "A - B (points)", "A right / B wrong (b)", "A wrong / B right (c)", "p"]
    rows = [[key, t["metric"], f"{100 * t['diff']:+.1f}", t["b"], t["c"], f"{t['p']:.3f}" if t["p"] >= 1e-3
             else "< 0.001", *([f"{t['ahead']} of {t['runs']}"] if pooled else [])] for key, t in tests.items()]
    return markdown_table(header + ["A ahead in runs"] * pooled, rows)


def cell(value):  # a training table's cell: 3 decimals, "-" where the row has no such value
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def rounds_table(rows):
    """train_dpo.py's rows per round (the SFT agent's, then each round's; val) -> markdown lines."""
    keys = ["pairs", "rewards/accuracies", "rewards/margins", "weight_change", "sample_correct", "val/chain_correct",
            "val/two_agent"]
    show = lambda r, k: f"{r[k]:.1e}" if k == "weight_change" and k in r else cell(r.get(k))  # noqa: E731, tiny
    return markdown_table(["round", "pairs", "reward acc", "margin", "weight change", "samples correct",
                           "chain correct", "two-agent acc"], [[r["round"], *(show(r, k) for k in keys)] for r in rows])


def grpo_table(steps, evals):
    """train_grpo.py's log: each val report beside the reward of the step before it -> markdown lines."""
    by_step = {r["step"]: r for r in steps}
    return markdown_table(["step", "reward", "solved", "skipped groups", "chain correct", "two-agent acc"], [
        [e["step"], *(cell(by_step.get(e["step"], {}).get(k)) for k in ("reward", "solved", "skipped_groups")),
         cell(e["val/chain_correct"]), cell(e["val/two_agent"])] for e in evals])


SHARES = ("overall", "reasoning", "perception", "chain_correct")  # what --summarize compares per arm


def summary_markdown(summary):
    """summarize's dict -> markdown: accuracy per run and arm, mean (min..max) over runs, pooled paired tests."""
    span = lambda s: "-" if s is None else f"{fmt(s['mean'])} ({fmt(s['min'])}..{fmt(s['max'])})"  # noqa: E731
    header = ["overall", "reasoning", "perception", "chain correct"]
    lines = ["Accuracy (%) per run", "", *markdown_table(["run", "arm", *header], [
        [d, arm, *(fmt(m[k]) for k in SHARES)] for d, arms in summary["runs"].items() for arm, m in arms.items()])]
    rows = [[arm, s["runs"], *(span(s[k]) for k in SHARES)] for arm, s in summary["mean"].items()]
    lines += ["", f"Accuracy (%) over {len(summary['runs'])} runs: mean (min..max)", "",
              *markdown_table(["arm", "runs", *header], rows)]
    if summary["pooled"]:
        lines += ["", "Paired comparisons pooled over runs (exact McNemar test on the summed b and c)", "",
                  *paired_table(summary["pooled"], pooled=True)]
    if summary.get("hard"):  # the two agents' arms on both test splits, and the hard split's pooled tests
        lines += ["", "Both test splits, mean over runs; chains against the compute-matched SFT, pooled", "",
                  *edge_table(summary), "", "Hard test split: paired comparisons pooled over runs", "",
                  *paired_table(summary["hard"]["pooled"], pooled=True)]
    return "\n".join(lines + ["", *summary["notes"]])


def edge_table(summary):  # both test splits: chains right, the two agents, chains paired with the compute-matched SFT

    rows, splits = [], (summary, summary["hard"])
    for arm in summary["hard"]["mean"]:
        means = [(s["mean"].get(arm, {}).get(k) or {}).get("mean") for s in splits for k in ("chain_correct",
                                                                                            "overall")]
        tests = [s["pooled"].get(f"{arm} vs two_agent_sft_more (chain)") for s in splits]
        rows.append([arm, *map(fmt, means), *("-" if t is None else f"{100 * t['diff']:+.1f} (p = {t['p']:.3f})"
                                              for t in tests)])
    return markdown_table(["arm", "chains right", "two agents", "hard: chains right", "hard: two agents",
                           "chains vs SFT more", "hard: chains vs SFT more"], rows)
