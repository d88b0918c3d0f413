"""Structural rules of the Python package, checked on its source (no import of sparsekern needed)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "sparsekern"
MAX_FUNCTION_LINES = 100


def _long_functions(source: str, filename: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:line name (n lines)' of every function (methods and nested ones included) longer than `limit` lines,
    counted from its first decorator (or `def`) to its last line, docstring included."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > limit:
                found.append(f"{filename}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_longer_than_100_lines():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        too_long += _long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): "
                          + "; ".join(too_long))


def test_the_function_length_check_can_fail():
    def source(n):  # a decorated method of n lines in all
        body = "\n".join(f"        x{i} = {i}" for i in range(n - 2))
        return f"class C:\n    @staticmethod\n    def f():\n{body}\n"

    assert _long_functions(source(MAX_FUNCTION_LINES), "ok.py") == []
    n = MAX_FUNCTION_LINES + 1
    assert _long_functions(source(n), "long.py") == [f"long.py:3 f ({n} lines)"]
