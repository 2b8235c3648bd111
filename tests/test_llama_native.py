"""llama-cpp-python's private parts are touched in one module only: `edgelm/runtime/llamacpp/native.py`.

The names come from llama-cpp-python's own source (every `self._x` its `Llama` and internal
wrappers set), so a new private attribute in a later release is covered without editing this
test. Read with `ast`; nothing in edgelm is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llama_cpp

import edgelm

ROOT = Path(edgelm.__file__).resolve().parent
ALLOWED = ROOT / "runtime" / "llamacpp" / "native.py"


def llama_cpp_private_names() -> set[str]:
    """Every `self._name` llama-cpp-python's Llama and its internal wrappers assign or define."""
    package = Path(llama_cpp.__file__).resolve().parent
    names = {"_lib"}  # the loaded shared library, a module attribute of llama_cpp.llama_cpp
    for source in ("llama.py", "_internals.py"):
        for node in ast.walk(ast.parse((package / source).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
    return names


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a chain of names, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def private_uses(path: Path, names: set[str]) -> list[str]:
    """Where a module reads a llama-cpp-python private attribute or imports a private module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr in names and dotted(node.value) not in ("self", "cls"):
            found.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.Attribute) and dotted(node).startswith("llama_cpp.") and "._" in dotted(node):
            found.append(f"{where} {dotted(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_cpp"):
            parts = [*(node.module or "").split("."), *(alias.name for alias in node.names)]
            if any(part.startswith("_") for part in parts):
                found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.startswith("llama_cpp.") and "._" in f".{a.name}"]
    return found


def test_the_private_names_are_read_from_llama_cpp_python():
    names = llama_cpp_private_names()
    assert {"_ctx", "_model", "_batch", "_lib"} <= names


def test_only_llama_native_touches_llama_cpp_python_privates():
    names = llama_cpp_private_names()
    offenders = [use for path in sorted(ROOT.rglob("*.py")) if path != ALLOWED for use in private_uses(path, names)]
    assert offenders == []


def test_the_scan_finds_each_kind_of_access():
    names = llama_cpp_private_names()
    sample = ROOT / "runtime" / "llamacpp" / "native.py"  # the allowed module does all three kinds
    uses = private_uses(sample, names)
    assert any(u.endswith(" ._ctx") for u in uses)
    assert any("llama_cpp.llama_cpp._lib" in u for u in uses)
    assert any("import" in u for u in uses)
