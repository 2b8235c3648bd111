"""edgelm's module graph has no cycles, counting imports made inside functions.

A cycle hidden in a function still ties modules together: neither can be moved, tested or
batched without the other. The walk reads every `import` / `from ... import` statement with
`ast` (nothing is imported), resolves relative imports, and counts `from edgelm.x import y`
as an edge to `edgelm.x.y` when y is a submodule. Two layering rules keep the runtime's
lower levels free of what sits above them.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import edgelm

ROOT = Path(edgelm.__file__).resolve().parent
PACKAGE = "edgelm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name `from <dots><target>` means inside `module`."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's package is its parent
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in the tree refers to (external ones too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = resolve_relative(module, is_package, node.level, node.module)
            # `from pkg import x` depends on pkg.x when x is a submodule, else on pkg itself:
            # internal_target() resolves the name to the longest module that exists
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def internal_target(name: str, modules: dict[str, Path]) -> str | None:
    """The edgelm module an imported name loads last, or None for anything outside edgelm."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between edgelm modules, every name each module imports)."""
    modules = all_modules()
    edges: dict[str, set[str]] = {}
    raw: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = imported_names(tree, module, path.name == "__init__.py")
        raw[module] = names
        targets = {internal_target(n, modules) for n in names}
        edges[module] = {t for t in targets if t and t != module}
    return edges, raw


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so a deep chain cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def cycle_in(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through a group's first member, for a readable failure."""
    members = set(group)
    start = group[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(edges[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            # every neighbour seen: close the loop at the first one on the path
            loop_at = nxt[0]
            return path[path.index(loop_at):] + [loop_at]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    source = "from . import a\nfrom .b import c\ndef f():\n    import edgelm.errors\n    from ..x import y\n"
    names = imported_names(ast.parse(source), "edgelm.runtime.mod", False)
    assert {"edgelm.runtime.a", "edgelm.runtime.b.c", "edgelm.errors", "edgelm.x.y"} <= names
    modules = all_modules()
    assert internal_target("edgelm.runtime.core.generator.TextGenerator", modules) == "edgelm.runtime.core.generator"
    assert internal_target("edgelm.serve.constrained", modules) == "edgelm.serve.constrained"
    assert internal_target("numpy.typing", modules) is None
    assert resolve_relative("edgelm.runtime", True, 1, "llamacpp") == "edgelm.runtime.llamacpp"


def test_no_import_cycles():
    edges, _ = import_graph()
    groups = [g for g in strongly_connected(edges) if len(g) > 1]
    report = "\n".join(f"{len(g)} modules: {', '.join(g)}\n  e.g. {' -> '.join(cycle_in(g, edges))}" for g in groups)
    assert not groups, "import cycles:\n" + report


def reaches(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every edgelm module `start` imports directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def forbidden_imports(module: str, banned_internal, banned_external: set[str],
                      allowed: frozenset = frozenset()) -> list[str]:
    """What `module` reaches, directly or through other edgelm modules, that the rule bans;
    `allowed` holds (importer, imported) pairs the rule names as known exceptions."""
    edges, raw = import_graph()
    edges = {m: {t for t in targets if (m, t) not in allowed} for m, targets in edges.items()}
    reached = reaches(edges, module) | {module}
    bad = sorted(m for m in reached if banned_internal(m))
    for m in sorted(reached):
        bad += sorted(f"{m} imports {n}" for n in raw[m]
                      if n.split(".")[0] in banned_external and (m, n.split(".")[0]) not in allowed)
    return bad


HEADER_PARSER = ["edgelm.runtime.gguf", "edgelm.runtime.gguf.parser", "edgelm.runtime.gguf.metadata"]
def core_modules() -> list[str]:
    """Every module of the generation core package."""
    return sorted(m for m in all_modules() if m == "edgelm.runtime.core" or m.startswith("edgelm.runtime.core."))
BACKEND_PACKAGES = ("edgelm.runtime.ort", "edgelm.runtime.llamacpp")


def is_llama_module(name: str) -> bool:
    return name == "edgelm.runtime.llamacpp" or name.startswith("edgelm.runtime.llamacpp.")


def is_backend_module(name: str) -> bool:
    return any(name == pkg or name.startswith(pkg + ".") for pkg in BACKEND_PACKAGES)


def test_the_gguf_header_parser_imports_no_loader():
    # The parser checks bytes before llama.cpp sees them; a loader underneath it would make
    # reading a header pull in the backend it guards.
    for module in HEADER_PARSER:
        assert not forbidden_imports(module, is_llama_module, {"llama_cpp"}), module


def test_the_generation_core_imports_no_backend():
    # The loop, sampler, text and constraints are shared by every backend, and by a batched
    # engine next; they must load with neither llama.cpp nor onnxruntime installed.
    modules = core_modules()
    assert len(modules) >= 7  # the walk found the package
    for module in modules:
        bad = forbidden_imports(module, is_backend_module, {"llama_cpp", "onnxruntime"})
        assert not bad, module
