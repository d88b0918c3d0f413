"""The package's layering, checked from its source (no extension needed).

- No import cycle inside python/sparsekern, counting imports inside functions too (a cycle hidden in a function-level
  import is still a cycle: it only moves the failure to the first call).
- The ops layer (sparsekern.ops.*) imports nothing from the layers built on it.
- Above the ops layer nobody calls torch.ops.sparsekern.* directly: the typed wrappers are the only door.
- One definition each of the rules issue 15 found written several times.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "sparsekern"
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """sparsekern modules that `name` imports explicitly, anywhere in the file (functions included)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "sparsekern":
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "sparsekern":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if color.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if color.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    # the checker itself must be able to fail
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_resolution_sees_function_level_and_relative_imports():
    g = _graph()
    assert "sparsekern.ops.core" in g["sparsekern.weight"]          # from .ops import core as _core
    assert "sparsekern.weight" in g["sparsekern.linear"]
    assert "sparsekern.ops.core" in g["sparsekern.quant"]           # a function-level import


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


ALLOWED_BELOW_OPS = {"sparsekern._ext", "sparsekern._fsutil"}


def test_ops_layer_imports_nothing_above_it():
    g = _graph()
    for name, deps in g.items():
        if name == "sparsekern.ops" or name.startswith("sparsekern.ops."):
            above = {d for d in deps if not d.startswith("sparsekern.ops") and d not in ALLOWED_BELOW_OPS}
            assert not above, f"{name} imports {sorted(above)} from the layers above the ops layer"


def test_format_and_ops_do_not_import_each_other():
    g = _graph()
    ops = {n for n in g if n.startswith("sparsekern.ops")}
    assert not any(d in ops for d in g["sparsekern.format"] if d != "sparsekern.ops")
    assert not any("sparsekern.format" in g[n] for n in ops)


def test_no_direct_torch_ops_calls_above_the_ops_layer():
    offenders = []
    for name, path in _modules().items():
        if name == "sparsekern.ops" or name.startswith("sparsekern.ops."):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"torch\.ops\.sparsekern\.\w+\s*\(", code):
                offenders.append(f"{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert not offenders, "call the typed wrappers in sparsekern.ops instead:\n" + "\n".join(offenders)


def _definitions(pattern: str, roots: list[Path], suffixes: tuple[str, ...]) -> list[str]:
    hits = []
    for root in roots:
        for p in root.rglob("*"):
            if p.suffix in suffixes and p.is_file():
                for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if re.search(pattern, line):
                        hits.append(f"{p}:{i}")
    return hits


@pytest.mark.parametrize("what,pattern", [
    ("the cuSPARSELt shape multiple (Python)", r"^\s*def (structured_multiple|cslt_multiple)\b"),
    ("the cuSPARSELt shape rule (Python)", r"^\s*def (cslt_shape_ok|shape_supported)\b"),
    ("the activation list", r"^\s*_?ACTIVATIONS\s*=\s*\("),
    ("the 2:4 code validity check", r"^\s*def (_check_codes|codes_violation)\b"),
    ("the atomic file write", r"os\.replace\("),
])
def test_one_definition_in_python(what, pattern):
    hits = _definitions(pattern, [PKG], (".py",))
    if what == "the atomic file write":
        assert all("_fsutil.py" in h for h in hits), f"{what} outside sparsekern/_fsutil.py: {hits}"
    else:
        assert len(hits) == 1, f"{what} must be defined once, found {hits}"


def test_cslt_shape_rule_numbers_once_in_cpp():
    hits = _definitions(r"cslt_structured_multiple\s*\(\s*(int|int64_t|size_t)", [CSRC], (".h", ".cpp", ".cu"))
    defs = [h for h in hits if "/core/" in h]
    assert len(defs) == 1, f"the C++ shape rule must live once in csrc/core: {hits}"
