"""The codebase uses public PyTorch only: no private or internal torch APIs in any script."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRIVATE = re.compile(r"\btorch\.(ops\.|_[a-z])|\btorch(\.\w+)*\._[a-z]\w*\(")


def test_no_private_torch_api():
    hits = [f"{path.name}:{n}: {line.strip()}" for path in sorted(ROOT.glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "private torch APIs:\n" + "\n".join(hits)
