"""The house rule (notes: no function over 60 lines in butler_mqtt/), checked."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "butler_mqtt"
LIMIT = 60


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
    too_long = long_functions()
    assert not too_long, f"functions over {LIMIT} lines (split them): {too_long}"


CLASS_LIMIT = 250


def long_classes() -> dict[str, int]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "sim" in path.relative_to(PACKAGE).parts:
            continue  # the simulators are their own small worlds
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > CLASS_LIMIT:
                    found[f"{path.relative_to(PACKAGE).as_posix()}:{node.name}"] = length
    return found


def test_no_class_is_longer_than_250_lines():
    too_long = long_classes()
    assert not too_long, f"classes over {CLASS_LIMIT} lines (split them): {too_long}"
