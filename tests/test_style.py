"""The codebase uses public PyTorch only, and its files import each other in one direction."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRIVATE = re.compile(r"\btorch\.(ops\.|_[a-z])|\btorch(\.\w+)*\._[a-z]\w*\(")


def test_no_private_torch_api():
    hits = [f"{path.name}:{n}: {line.strip()}" for path in sorted(ROOT.glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "private torch APIs:\n" + "\n".join(hits)


# Imports go one way: a file imports only files before it here (machinery first, then the reading path).
ORDER = ["common", "world", "checkpoint", "model", "data", "generate", "train_sft", "agents", "plots", "eval",
         "train_dpo", "train_grpo", "bench", "assignment"]


def test_imports_go_one_way():
    wrong = []
    for i, name in enumerate(ORDER):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        wrong += [f"{name} imports {m}" for m in imported & set(ORDER) if ORDER.index(m) >= i]
    assert not wrong, "imports against the order (a lower file never imports a higher one):\n" + "\n".join(wrong)
    assert sorted(ORDER) == sorted(p.stem for p in ROOT.glob("*.py")), "every script has its place in ORDER"
