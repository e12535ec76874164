"""assignment.py and the graders' strength.

make writes a faithful copy in which nothing of a blanked function's solution is left; for every assignment the
reference scores 100% on its graded tests (with every other assignment blanked, so the graders are independent), the
blanked copy 0%, and each wrong version in MUTANTS (the reference source with one plausible mistake made by a text
replacement) fails at least one graded test; a blanked copy runs the micro job up to its first missing function.

Graded tests run in this process (pytester), on the live modules with the functions under test swapped for the
copy's or the mutant's versions, compiled from their source text: a pytest subprocess per variant would cost seconds
each. One test runs the real `grade` command and one the job in a real copy, in subprocesses.
"""

import ast
import difflib
import io
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

import agents
import assignment
import train_dpo
import train_grpo  # and with it every module whose functions are swapped: they must be loaded before any swap
from test_dpo import micro_run, teacher_sampler

ROOT = assignment.ROOT

# Wrong versions: (what is wrong, file, reference text, wrong text). The reference text must occur once in the file,
# inside one of the assignment's functions, or the test fails: a mutant cannot silently stop applying.
MUTANTS = {
    "kv_cache": [
        ("rotary positions not offset by the cache", "model.py",
         "(cache.length, cache.pos[:, None])", "(cache.length, 0)"),
        ("attends to the new chunk only", "model.py",
         "return self.k[layer, :, :, :end], self.v[layer, :, :, :end]", "return k, v"),
        ("causal mask aligned top-left", "model.py",
         "q_slot = torch.arange(start, start + T, device=x.device)", "q_slot = torch.arange(T, device=x.device)"),
        ("padding slots not hidden", "model.py", "(k_slot <= q_slot)[None] & key_real[:, None, :]",
         "(k_slot <= q_slot)[None]"),
    ],
    "assessment": [
        ("High needs more than the threshold", "data.py",
         '"high" if score >= high else "mid" if score >= mid', '"high" if score > high else "mid" if score > mid'),
        ("a wrong answer not penalised", "data.py", "(1.0 if right else 0.5)", "1.0"),
        ("an unreadable step skipped, not counted false", "data.py",
         'claims = [world.parse_claim(s) for s in path["steps"]]',
         'claims = [c for c in map(world.parse_claim, path["steps"]) if c is not None]'),
        ("answers compared without normalising", "data.py",
         "pred, gold = normalize_answer(pred), normalize_answer(gold)",
         'pred, gold = str(pred or "").strip().lower(), str(gold).strip().lower()'),
    ],
    "sampling": [
        ("top-p keeps the wrong side", "generate.py",
         "outside = probs.cumsum(dim=-1) - probs >= top_p", "outside = probs.cumsum(dim=-1) - probs < top_p"),
        ("the nucleus drops the token that reaches top-p", "generate.py",
         "outside = probs.cumsum(dim=-1) - probs >= top_p", "outside = probs.cumsum(dim=-1) >= top_p"),
        ("temperature applied after the softmax", "generate.py",
         "logits = logits.float() / temperature", "logits = logits.float().softmax(-1) / temperature"),
        ("top-k drops the k-th best too", "generate.py",
         "logits.masked_fill(logits < kth_best", "logits.masked_fill(logits <= kth_best"),
    ],
    "two_agents": [
        ("the override margin inverted", "agents.py",
         "if m < self.override_margin:", "if m > self.override_margin:"),
        ("the chain shown without its format", "agents.py",
         'data.task_messages("summary", q, data.render_chain(s))',
         'data.task_messages("summary", q, " ".join(x["content"] for x in s))'),
        ("the summary agent answers without the image", "agents.py",
         'summarize(questions, [c["steps"] for c in chains], images)',
         'summarize(questions, [c["steps"] for c in chains], None)'),
    ],
    "stats": [
        ("one-sided p", "eval.py", "min(1.0, 2 * sum(", "min(1.0, sum("),
        ("the observed count left out of the tail", "eval.py", "range(min(b, c) + 1)", "range(min(b, c))"),
        ("the interval centred on p", "eval.py", "centre = (p + z * z / (2 * n)) / denominator", "centre = p"),
    ],
    "dpo": [
        ("chosen and rejected swapped", "train_dpo.py",
         "h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)",
         "h = (policy_rejected_logps - ref_rejected_logps) - (policy_chosen_logps - ref_chosen_logps)"),
        ("logits not shifted", "generate.py",
         "logits, targets = logits[:, :-1].float(), targets[:, 1:]", "logits, targets = logits.float(), targets"),
        ("prompt not masked", "train_dpo.py", "logps = (logps * mask).sum(-1)", "logps = logps.sum(-1)"),
        ("the NLL term subtracted", "train_dpo.py",
         "losses = losses + nll_weight * chosen_nll", "losses = losses - nll_weight * chosen_nll"),
    ],
    "grpo": [
        ("advantages not normalised per group", "train_grpo.py",
         "centred = rewards - rewards.mean(1, keepdim=True)", "centred = rewards - rewards.mean()"),
        ("the clip on the wrong side", "train_grpo.py", "per_token = -torch.min(", "per_token = -torch.max("),
        ("the KL estimate's direction reversed", "train_grpo.py",
         "d = (ref_logps - logps).masked_fill", "d = (logps - ref_logps).masked_fill"),
        ("the loss averaged per chain, not per token", "train_grpo.py",
         "(per_token * mask).sum() / max(1, n_tokens)", "((per_token * mask).sum(-1) / mask.sum(-1)).mean()"),
    ],
}


def functions(name):
    """[(file, qualname)] of an assignment."""
    return [tuple(spec.split(":")) for spec in assignment.ASSIGNMENTS[name].functions]


def source_of(text, qualname):
    """The source of a function in a module's text, decorators included, dedented."""
    fn = assignment.find_function(ast.parse(text), qualname)
    start = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
    return textwrap.dedent("".join(text.splitlines(keepends=True)[start - 1:fn.end_lineno]))


def swap_in(monkeypatch, texts, name):
    """Replace the live functions of assignment `name` by their versions in texts ({file: module text}), compiled in
    their module's namespace, wherever the live ones are bound (a `from x import f` elsewhere too)."""
    project = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None)
               and Path(m.__file__).resolve().parent in (ROOT, ROOT / "tests")]
    for path, qualname in functions(name):
        module = sys.modules[path.removesuffix(".py")]
        namespace = {}
        exec(compile(source_of(texts[path], qualname), f"{path}:{qualname}", "exec"), vars(module), namespace)
        owner, _, attr = qualname.rpartition(".")
        if owner:
            monkeypatch.setattr(getattr(module, owner), attr, namespace[attr])
            continue
        live = getattr(module, attr)
        for m in project:
            for key, value in list(vars(m).items()):
                if value is live:
                    monkeypatch.setattr(m, key, namespace[attr])


def read(root, path):
    return (Path(root) / path).read_text(encoding="utf-8")


def mutated(name, mutant):
    """{file: text} of the assignment's files with one mutant applied; fails if its text no longer matches."""
    what, path, old, new = mutant
    texts = {p: read(ROOT, p) for p, _ in functions(name)}
    assert texts[path].count(old) == 1, f"{name} mutant {what!r}: its text is not once in {path}: update MUTANTS"
    texts[path] = texts[path].replace(old, new)
    assert any(source_of(texts[p], q) != source_of(read(ROOT, p), q) for p, q in functions(name) if p == path), \
        f"{name} mutant {what!r}: the text it changes is in none of the assignment's functions: update MUTANTS"
    return texts


def score(pytester, name):
    """(passed, total) of assignment name's graded tests on the live modules, in this process."""
    result = pytester.inline_run(str(ROOT / "tests" / f"grade_{name}.py"), "-p", "no:cacheprovider")
    passed, skipped, failed = result.listoutcomes()
    total = len(passed) + len(skipped) + len(failed) + len(result.getfailedcollections())
    return len(passed), total


@pytest.fixture(scope="module")
def blanked(tmp_path_factory):
    """{assignment: a copy made with only that assignment blanked}."""
    root = tmp_path_factory.mktemp("copies")
    for name in assignment.ASSIGNMENTS:
        assert assignment.main(["make", name, "--out", str(root / name)]) is None
    return {name: root / name for name in assignment.ASSIGNMENTS}


# ----------------------------------------------------------------------------------------------
# make


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def comments(source):
    return [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]


def signature(fn):
    return ast.dump(fn.args), [ast.dump(d) for d in fn.decorator_list], fn.returns and ast.dump(fn.returns)


@pytest.mark.parametrize("name", assignment.ASSIGNMENTS)
def test_make_changes_only_the_bodies_of_the_named_functions(name, blanked):
    copy = all_files(blanked[name])
    assert set(copy) == {p for p in assignment.tracked_files() if (ROOT / p).is_file()} - assignment.LEFT_OUT
    targets = {path for path, _ in functions(name)}
    assert all(copy[p] == (ROOT / p).read_bytes() for p in set(copy) - targets), "another file differs"
    for path in targets:
        ref_text, text = read(ROOT, path), copy[path].decode()
        ref_tree, tree = ast.parse(ref_text), ast.parse(text)
        mine = [q for p, q in functions(name) if p == path]
        # Every line of the reference that the copy changes lies inside one of the blanked functions.
        inside = {i for q in mine for fn in [assignment.find_function(ref_tree, q)] for i in range(fn.lineno - 1,
                                                                                                  fn.end_lineno)}
        ops = difflib.SequenceMatcher(None, ref_text.splitlines(), text.splitlines(), autojunk=False).get_opcodes()
        assert all(set(range(i1, max(i2, i1 + 1))) <= inside for tag, i1, i2, _, _ in ops if tag != "equal"), path
        for qualname in mine:
            fn, ref_fn = assignment.find_function(tree, qualname), assignment.find_function(ref_tree, qualname)
            assert signature(fn) == signature(ref_fn), qualname
            contract = ast.get_docstring(ref_fn) or assignment.CONTRACTS[f"{path}:{qualname}"]
            assert ast.get_docstring(fn).split() == contract.split(), qualname  # the docstring, or the contract
            [raise_] = fn.body[1:]
            assert ast.literal_eval(raise_.exc.args[0]) == f"{name}: implement {path}:{qualname} (docs/assignments.md)"
            after_signature = assignment.signature_end(text.splitlines(keepends=True), fn)
            left = [t.string for t in comments(text) if after_signature < t.start[0] <= fn.end_lineno]
            assert not left, f"{qualname}: comments of the body are left: {left}"


def test_no_line_of_a_solution_is_left_in_any_copy(blanked):
    for name, copy in blanked.items():
        assert not list(copy.rglob("__pycache__")) and not list(copy.rglob("*.pyc"))
        for path, qualname in functions(name):
            lines = read(ROOT, path).splitlines()
            fn = assignment.find_function(ast.parse(read(ROOT, path)), qualname)
            first = fn.body[ast.get_docstring(fn) is not None]  # the first statement after the docstring
            solution = {line.strip() for line in lines[first.lineno - 1:fn.end_lineno] if len(line.strip()) > 3}
            blank = {line.strip() for line in source_of(read(copy, path), qualname).splitlines()}
            assert not solution & blank, (name, qualname, solution & blank)


def test_a_contract_for_each_function_without_a_docstring_and_no_other():
    bare = {spec for a in assignment.ASSIGNMENTS.values() for spec in a.functions if ast.get_docstring(
        assignment.find_function(ast.parse(read(ROOT, spec.split(":")[0])), spec.split(":")[1])) is None}
    assert set(assignment.CONTRACTS) == bare


def test_make_is_deterministic_and_idempotent(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert assignment.main(["make", "stats", "grpo", "--out", str(first)]) is None
    (first / "__pycache__").mkdir()
    (first / "__pycache__" / "eval.cpython-311.pyc").write_bytes(b"compiled solution")
    (first / "notes.txt").write_text("the student's own file")
    assert assignment.main(["make", "grpo", "stats", "--out", str(first)]) is None  # again, into the same folder
    assert assignment.main(["make", "stats", "grpo", "--out", str(second)]) is None
    again = all_files(first)
    assert again.pop("notes.txt") == b"the student's own file"  # left alone; the compiled code is gone
    assert again == all_files(second)


@pytest.mark.parametrize("argv, message", [
    (["make", "nope", "--out", "X"], "assignment.py: unknown assignment 'nope': choose from kv_cache, "),
    (["grade", "nope"], "assignment.py: unknown assignment 'nope': choose from kv_cache, "),
    (["make", "dpo", "--out", str(ROOT / "copy")], "assignment.py: --out "),
    (["grade", "dpo", "--repo", "X"], "assignment.py: --repo "),
], ids=["make-unknown", "grade-unknown", "out-inside", "repo-missing"])
def test_a_wrong_command_is_one_line_and_status_2(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / "x") if a == "X" else a for a in argv]
    assert assignment.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (ROOT / "copy").exists()


def test_a_function_that_no_longer_exists_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(assignment.ASSIGNMENTS, "dpo", assignment.Assignment("idea", ("train_dpo.py:dpo_gone",)))
    assert assignment.main(["make", "dpo", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == ("assignment.py: train_dpo.py has no function dpo_gone (assignment dpo): update "
                                       "its entry in ASSIGNMENTS in assignment.py\n")
    assert not (tmp_path / "x").exists()


def test_list_names_every_assignment(capsys):
    assignment.main(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(assignment.ASSIGNMENTS)


# ----------------------------------------------------------------------------------------------
# The graders


# Each grader takes seconds: one in the default suite, the others with -m slow.
@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name == "two_agents" else pytest.mark.slow)
                                  for name in assignment.ASSIGNMENTS])
def test_the_grader_passes_the_reference_and_fails_the_blank_and_every_mutant(name, blanked, pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # graded tests need no plugin; some take a second to load
    with monkeypatch.context() as m:  # the reference, every other assignment blanked: the graders are independent
        for other in set(assignment.ASSIGNMENTS) - {name}:
            swap_in(m, {p: read(blanked[other], p) for p, _ in functions(other)}, other)
        passed, total = score(pytester, name)
        assert total >= 5 and passed == total, f"{name}: the reference scores {passed}/{total}"
    with monkeypatch.context() as m:
        swap_in(m, {p: read(blanked[name], p) for p, _ in functions(name)}, name)
        assert score(pytester, name)[0] == 0, f"{name}: the blanked copy passes some graded tests"
    assert len(MUTANTS[name]) >= 2
    for mutant in MUTANTS[name]:
        with monkeypatch.context() as m:
            swap_in(m, mutated(name, mutant), name)
            passed, total = score(pytester, name)
            assert passed < total, f"{name}: the mutant {mutant[0]!r} passes every graded test"


def test_the_grade_command_scores_a_copy(blanked):
    done = subprocess.run([sys.executable, str(ROOT / "assignment.py"), "grade", "stats", "assessment", "--repo",
                           str(blanked["stats"])], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("stats: 0/") and line.endswith(" passed (0%)") for line in lines)
    assert any(line.startswith("assessment: ") and line.endswith(" passed (100%)") for line in lines)
    assert "  FAILED  test_mcnemar_hand_values" in lines and "  passed  test_buckets_at_their_edges" in lines


# ----------------------------------------------------------------------------------------------
# A blanked copy runs everything else


JOB = ["--max-chain-tokens", "8", "--val-size", "4", "--eval-limit", "4"]
DPO_JOB = ["--iters", "1", "--pool-size", "6", "--samples-per-question", "2", "--batch-size", "4", *JOB]
GRPO_JOB = ["--steps", "1", "--questions-per-step", "3", "--group-size", "2", "--micro-batch", "8", *JOB]


@pytest.fixture(scope="module")
def micro_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "out"
    micro_run(str(out), max_chain_tokens=8)
    return out


@pytest.mark.parametrize("name", assignment.ASSIGNMENTS)
def test_the_micro_job_stops_at_the_first_missing_function(name, blanked, micro_out, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(micro_out, out)
    monkeypatch.setattr(agents, "sample_chains", teacher_sampler(agents.sample_chains))
    swap_in(monkeypatch, {p: read(blanked[name], p) for p, _ in functions(name)}, name)
    job, options = (train_grpo.main, GRPO_JOB) if name == "grpo" else (train_dpo.main, DPO_JOB)
    with pytest.raises(NotImplementedError, match=f"^{name}: implement .* \\(docs/assignments.md\\)$"):
        job(["--out", str(out), *options])


def test_a_real_copy_runs_the_grpo_job_up_to_group_advantages(blanked, tmp_path):
    # The last piece the GRPO job reaches: data, loading, decoding, the agents, the assessment and the metrics of
    # the copy all run first.
    out = str(tmp_path / "out")
    script = ("import sys; sys.path.insert(0, 'tests'); import agents, train_dpo, train_grpo; "
              f"from test_dpo import micro_run, teacher_sampler; micro_run({out!r}, max_chain_tokens=8); "
              "agents.sample_chains = teacher_sampler(agents.sample_chains); "
              f"train_grpo.main(['--out', {out!r}, *{GRPO_JOB!r}])")
    done = subprocess.run([sys.executable, "-B", "-c", script], cwd=blanked["grpo"], capture_output=True, text=True)
    assert done.returncode == 1
    message = "NotImplementedError: grpo: implement train_grpo.py:group_advantages (docs/assignments.md)"
    assert message in done.stderr.splitlines(), done.stderr[-2000:]
