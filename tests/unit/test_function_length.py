"""The house rule (notes: no function over 60 lines in butler_mqtt/), checked."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "butler_mqtt"
LIMIT = 60
#: Over the limit when the rule got this test, in rooms other work is changing; to be split there.
KNOWN = {"demo.py:_run", "sim/certs.py:_generate", "sim/data.py:demo_tasks"}


def long_functions() -> dict[str, int]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - first + 1
                if length > LIMIT:
                    found[f"{path.relative_to(PACKAGE).as_posix()}:{node.name}"] = length
    return found


def test_no_function_is_longer_than_60_lines():
    new = {name: n for name, n in long_functions().items() if name not in KNOWN}
    assert not new, f"functions over {LIMIT} lines (split them): {new}"
