"""Course assignments: a copy of this repository with the method's key functions left for students to write.

Each assignment is a few functions that carry one idea of Insight-V. In a student copy each of them keeps its
signature, decorators and docstring (the contract: shapes, what to return, the paper's equation) and its body
becomes one `raise NotImplementedError` naming the assignment; the rest of the code runs as it is, up to the first
call of a missing function. tests/grade_<name>.py grades an assignment: it calls the functions through the copy's
own modules and compares them with values worked out by hand. What to read, how long it takes and an exercise for
each: docs/assignments.md.

    python assignment.py list                                 # the assignments
    python assignment.py make dpo grpo --out ../student       # a copy with these assignments blanked
    python assignment.py grade dpo --repo ../student          # score it (default --repo: this repository)

make copies the files git tracks, never .git, __pycache__ or out/, and leaves out tests/test_assignment.py (its
wrong versions of the functions quote the solution). --out may exist: every file of the copy is written again and
every __pycache__ in it removed (compiled code can hold a solution); nothing else there is touched, so the same
command twice gives the same bytes. grade runs this repository's graded tests (pytest, in a subprocess) on the code
at --repo, so editing the copy's tests changes no score, and exits 0 only when every test passes.
"""

import argparse
import ast
import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tokenize
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LEFT_OUT = {"tests/test_assignment.py"}  # the mutants in it are the solution with one thing changed


@dataclass(frozen=True)
class Assignment:
    idea: str
    functions: tuple  # "file.py:Class.method" or "file.py:function"


# In reading order (README's file tour).
ASSIGNMENTS = {
    "kv_cache": Assignment("attention with a preallocated KV cache: cached decoding equals a full forward",
                           ("model.py:KVCache.update", "model.py:LlamaAttention.forward",
                            "model.py:LlamaModel.forward")),
    "assessment": Assignment("multi-granularity assessment: the answer filter, the 1-100 step score, High/Mid/Low",
                             ("data.py:is_correct", "data.py:SceneStepScorer.score", "data.py:bucket")),
    "sampling": Assignment("decoding: greedy, temperature, top-k, then the top-p nucleus",
                           ("generate.py:sample_next_token",)),
    "two_agents": Assignment("the reasoning agent writes a chain, the summary agent answers from it, batch by batch",
                             ("agents.py:ReasoningAgent.reason", "agents.py:SummaryAgent.summarize",
                              "agents.py:TwoAgentSystem.answer_batch", "agents.py:TwoAgentSystem.answer")),
    "stats": Assignment("comparing arms honestly: Wilson intervals and the exact McNemar test",
                        ("eval.py:wilson_interval", "eval.py:mcnemar")),
    "dpo": Assignment("DPO: the completion's log-probs, the loss (ln 2 at policy == reference), the NLL term",
                      ("generate.py:token_logps", "train_dpo.py:sequence_logps", "train_dpo.py:dpo_loss")),
    "grpo": Assignment("GRPO: advantages within each group, the clipped token-level loss, the k3 KL",
                       ("train_grpo.py:group_advantages", "train_grpo.py:kl_k3", "train_grpo.py:grpo_loss")),
}

# The contract of the functions whose reference has no docstring (the core files are at their line budget): a copy
# gets it as their docstring, so no student starts from a bare signature.
CONTRACTS = {
    "model.py:KVCache.update":
        "Write the new chunk's keys and values, k and v (B, n_kv, T, hd), into layer `layer`'s buffers at slots "
        "length .. length + T, and return the layer's keys and values so far, (B, n_kv, length + T, hd) each. Leave "
        "`length` as it is: LlamaModel.forward moves it once every layer has written.",
    "model.py:LlamaAttention.forward":
        "x (B, T, D); cos, sin (B, 1, T, hd) from rotary_cos_sin; mask (B, 1, T, S) bool or None; cache a KVCache or "
        "None -> (B, T, D). Project x to q (B, H, T, hd) and k, v (B, KV, T, hd), rotate q and k (apply_rotary), "
        "and with a cache add k and v to it (cache.update) and attend over all its keys. attention() gets the mask, "
        "is_causal only when there is neither mask nor cache, enable_gqa when KV < H, training=self.training; then "
        "o_proj.",
    "model.py:LlamaModel.forward":
        "x (B, T, D) embeddings; attention_mask (B, T), 1 real and 0 left padding, or None; cache a KVCache or None "
        "-> the hidden states after the last layer and self.norm, (B, T, D). Rotary positions count real tokens "
        "only, from cache.pos (0 without a cache), so a left-padded row starts at 0 like an unpadded one. With a "
        "cache the T tokens take slots cache.length .. cache.length + T, and query i sees every key slot <= "
        "cache.length + i (a causal mask aligned bottom-right) but no padding slot (record this call's slots in "
        "cache.key_mask); a padding query sees itself, so no row is all masked. Then cache.length grows by T, "
        "cache.pos by each row's real tokens, and cache.padded is True once any slot is padding. A chunk that does "
        "not fit: ValueError naming max_len. Without padding or a cache, mask None gives plain causal attention.",
    "data.py:is_correct":
        "The answer filter's test -> bool: pred equals gold after normalize_answer (case, punctuation, \"the answer "
        "is\", articles, number words). With choices (the options' texts), an option letter, \"b. text\" and the "
        "option's text all stand for that option's letter. An empty prediction is never right.",
    "data.py:SceneStepScorer.score":
        "rec: a question row (objects, spec, answer); paths: path dicts or rendered chains (as_path) -> one int "
        "score per path, by the formula above. A claim is world.parse_claim of a step (None: unreadable); true "
        "claims pass world.check_claim against the reference, world.solve(objects, spec); recall counts the "
        "reference's facts (world.claim_key) that true claims establish; right = self.answer_filter.judge(rec, the "
        "path's final answer).",
    "data.py:bucket":
        "A step score -> \"high\" if score >= high, \"mid\" if mid <= score < high, else \"low\".",
    "agents.py:ReasoningAgent.reason":
        "questions (B strings), images (B, 3, H, W) -> one read_chain result per question, from one batched "
        "complete() call on data.task_messages(\"reasoning\", question) with this agent's decoding options.",
    "agents.py:SummaryAgent.summarize":
        "questions (B strings), steps (one list of step dicts per question), images (B, 3, H, W) -> B answers, from "
        "one batched complete() call on data.task_messages(\"summary\", question, data.render_chain(steps)). With "
        "an override_margin, an answer that differs (normalize_answer) from the chain's stated answer "
        "(data.chain_answer; a chain without one keeps the answer) becomes the stated one unless reply_logps gives "
        "it at least override_margin nats more than the stated one.",
    "agents.py:TwoAgentSystem.answer_batch":
        "questions (B strings), images (B, 3, H, W) -> B dicts {chain, steps, chain_answer, answer}: the reasoning "
        "agent writes every chain, then the summary agent answers from each chain's steps, on the same images.",
}


class Refusal(Exception):
    """A mistake on the command line: main prints it as one line and exits with status 2."""


# ----------------------------------------------------------------------------------------------
# Blanking a function: find it with ast, replace the lines after its signature and docstring.

def find_function(tree, qualname):
    """The FunctionDef of "function" or "Class.method" at the top of a module, or None."""
    node = tree
    for name in qualname.split("."):
        node = next((n for n in getattr(node, "body", []) if getattr(n, "name", None) == name), None)
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def signature_end(lines, fn):
    """Index of the line after the def's signature, which may span lines: the ':' outside any bracket."""
    depth, source = 0, "".join(lines[fn.lineno - 1:])
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            return fn.lineno - 1 + tok.start[0]


def body_lines(lines, fn):
    """[first, end) line indices of fn's body after its docstring, its comments included (a comment after the last
    statement, indented inside the function, is the function's too)."""
    has_doc = ast.get_docstring(fn, clean=False) is not None
    first = fn.body[0].end_lineno if has_doc else signature_end(lines, fn)
    end = fn.end_lineno
    while end < len(lines) and (not lines[end].strip() or lines[end].lstrip().startswith("#")
                                and len(lines[end]) - len(lines[end].lstrip()) > fn.col_offset):
        end += 1
    while not lines[end - 1].strip():  # blank lines after the function belong to the file
        end -= 1
    return first, end


def blank(text, path, targets):
    """text of file `path` with each (qualname, assignment) function's body replaced by a raise."""
    lines, tree = text.splitlines(keepends=True), ast.parse(text)
    spans = []
    for qualname, name in targets:
        fn = find_function(tree, qualname)
        if fn is None:
            raise Refusal(f"{path} has no function {qualname} (assignment {name}): update its entry in "
                          f"ASSIGNMENTS in assignment.py")
        if ast.get_docstring(fn) is None and f"{path}:{qualname}" not in CONTRACTS:
            raise Refusal(f"{path}:{qualname} has no docstring (assignment {name}): add its contract to CONTRACTS "
                          f"in assignment.py")
        spans.append((body_lines(lines, fn), fn, qualname, name))
    for (first, end), fn, qualname, name in sorted(spans, key=lambda s: s[0], reverse=True):  # bottom up
        indent = " " * fn.body[0].col_offset
        contract = CONTRACTS.get(f"{path}:{qualname}") if ast.get_docstring(fn) is None else None
        doc = [textwrap.fill(f'"""{contract}"""', 120, initial_indent=indent, subsequent_indent=indent) + "\n"]
        message = f"{name}: implement {path}:{qualname} (docs/assignments.md)"
        lines[first:end] = doc * bool(contract) + [f'{indent}raise NotImplementedError("{message}")\n']
    return "".join(lines)


# ----------------------------------------------------------------------------------------------
# The commands

def check_names(names):
    unknown = [n for n in names if n not in ASSIGNMENTS]
    if unknown:
        raise Refusal(f"unknown assignment {unknown[0]!r}: choose from {', '.join(ASSIGNMENTS)} "
                      f"(python assignment.py list)")


def list_assignments():
    for name, a in ASSIGNMENTS.items():
        files = dict.fromkeys(f.split(":")[0] for f in a.functions)
        where = "; ".join(f"{file}: " + ", ".join(f.split(":")[1] for f in a.functions if f.startswith(file + ":"))
                          for file in files)
        print(f"{name:<11} {where}  ({a.idea})")


def tracked_files():
    """The repository's files as git tracks them, relative paths."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise Refusal(f"make copies the files git tracks, and `git ls-files` failed in {ROOT}: run make in a git "
                      f"checkout of the repository") from None
    return sorted(p for p in out.split("\0") if p and "__pycache__" not in p.split("/") and not p.endswith(".pyc"))


def write_copy(out, blanked):
    """The tracked files under out, those of `blanked` ({path: text}) with its text; then no __pycache__ in out."""
    for rel in tracked_files():
        src, dst = ROOT / rel, out / rel
        if rel in LEFT_OUT or not src.is_file():  # a file deleted but not yet committed is not copied
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in blanked:
            dst.write_text(blanked[rel], encoding="utf-8")
            shutil.copymode(src, dst)
        else:
            shutil.copy(src, dst)  # the bytes and the permission bits
    for cache in sorted(out.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)


def make(names, out):
    check_names(names)
    out = Path(out).resolve()
    if out == ROOT or ROOT in out.parents:
        raise Refusal(f"--out {out} is inside the repository: choose a folder outside it")
    targets = {}  # file -> [(qualname, assignment)]
    for name in names:
        for spec in ASSIGNMENTS[name].functions:
            path, qualname = spec.split(":")
            targets.setdefault(path, []).append((qualname, name))
    missing = [path for path in targets if not (ROOT / path).is_file()]
    if missing:
        raise Refusal(f"{missing[0]} is missing: update ASSIGNMENTS in assignment.py to where its functions went")
    blanked = {path: blank((ROOT / path).read_text(encoding="utf-8"), path, t) for path, t in targets.items()}
    try:
        write_copy(out, blanked)
    except OSError as e:
        raise Refusal(f"cannot write {e.filename or out}: {e.strerror}: choose another --out") from None
    print(f"wrote {out} with {', '.join(names)} to implement; grade it with: python assignment.py grade "
          f"{' '.join(names)} --repo {out}")


def run_graded(names, repo):
    """pytest on the graded files of these assignments, importing the code at repo -> [(file stem, test, passed)]."""
    files = [str(ROOT / "tests" / f"grade_{name}.py") for name in names]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.xml")
        # This repository's pytest.ini and tests; the code at repo, whose folder heads sys.path (pythonpath). -B
        # writes no compiled file into the copy; no third-party plugin is needed, and some take seconds to load.
        command = [sys.executable, "-B", "-m", "pytest", *files, "-c", str(ROOT / "pytest.ini"), "-o",
                   f"pythonpath={repo}", "-p", "no:cacheprovider", "--tb=short", "--continue-on-collection-errors",
                   f"--junitxml={report}"]
        subprocess.run(command, cwd=repo, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        if not report.is_file():
            raise Refusal("pytest wrote no report: see its output above")
        results = []
        for case in ET.parse(report).getroot().iter("testcase"):  # a file that did not import: no classname
            module, test = case.get("classname") or case.get("name"), case.get("name")
            passed = not any(child.tag in ("failure", "error", "skipped") for child in case)
            results.append((module.split(".")[-1], test if case.get("classname") else "(did not import)", passed))
        return results


def grade(names, repo):
    check_names(names)
    repo = Path(repo).resolve()
    for name in names:
        for path in dict.fromkeys(spec.split(":")[0] for spec in ASSIGNMENTS[name].functions):
            if not (repo / path).is_file():
                raise Refusal(f"--repo {repo} has no {path}: give a copy made by python assignment.py make")
    results = run_graded(names, repo)
    perfect = True
    for name in names:
        mine = [(test, ok) for stem, test, ok in results if stem == f"grade_{name}"]
        print(f"\n{name} ({repo}):")
        for test, ok in mine:
            print(f"  {'passed' if ok else 'FAILED'}  {test}")
        passed = sum(ok for _, ok in mine)
        print(f"{name}: {passed}/{len(mine)} passed ({100 * passed // max(1, len(mine))}%)")
        perfect = perfect and bool(mine) and passed == len(mine)
    return 0 if perfect else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the assignments")
    p = commands.add_parser("make", help="a copy with these assignments' functions blanked")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--out", required=True, help="folder of the copy, outside this repository")
    p = commands.add_parser("grade", help="run these assignments' graded tests on a copy")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--repo", default=str(ROOT), help="the copy to grade (default: this repository)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return list_assignments()
        if args.command == "make":
            return make(args.names, args.out)
        return grade(args.names, args.repo)
    except Refusal as e:
        print(f"assignment.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
