"""The import graph of migsec/, read from the source (AST), never by importing it.

Rules (docs/ARCHITECTURE.md, "Layering"):
- no cycle between packages (``migsec.<pkg>``, or a top-level module such as ``migsec.config``),
  counting every import that runs, at module level or inside a function;
- no cycle between modules either, for the same imports;
- ``migsec.migration`` runs one migration below migsecd's servers: it imports nothing of
  ``migsec.daemon`` and no asyncio at run time (``TYPE_CHECKING`` imports of the wiring's
  types are fine);
- an import of ``migsec`` inside a function says why on its line or the comment lines above it
  (``# lazy: ...``, e.g. start time of ``migsec --help`` or of the libvirt hook); everything else
  is imported at the top of the module, where a cycle would show.

``python tests/test_layering.py`` prints the package graph, the TYPE_CHECKING-only edges and the
lazy imports with their reasons.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "migsec"

# Known exceptions: modules whose function-level imports are neither required to say why nor
# counted in the cycle checks, and modules of migsec.migration allowed to hold asyncio code.
# Both empty: kept so that a module in transit can be listed honestly, with its reason.
PENDING_HOIST: frozenset[str] = frozenset()
PENDING_ASYNCIO: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str   # module name, e.g. migsec.migration.source
    target: str     # module or package imported, e.g. migsec.virt.migrate
    line: int
    in_function: bool
    type_checking: bool
    lazy_reason: str | None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def package_of(module: str) -> str:
    """``migsec.migration.source`` -> ``migsec.migration``; top-level modules stand alone."""
    return ".".join(module.split(".")[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _lazy_reason(lines: list[str], lineno: int) -> str | None:
    """The ``# lazy: why`` on the import's line or in the comment block above its group of imports."""
    comments = [lines[lineno - 1].partition("#")[2]]
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("#", "from ", "import ")):
        if lines[i].strip().startswith("#"):
            comments.insert(0, lines[i].strip()[1:])
        i -= 1
    text = " ".join(c.strip() for c in comments if c.strip())
    return text.partition("lazy:")[2].strip() or None if "lazy:" in text else None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "migsec"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "migsec":
        return []
    # `from migsec import virt` imports the module migsec.virt; `from migsec.virt import x` the package
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]


def imports_of(module: str, path: Path) -> list[Import]:
    text = path.read_text()
    lines = text.splitlines()
    found: list[Import] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                reason = _lazy_reason(lines, child.lineno) if in_function else None
                for target in _targets(child, module, is_package):
                    found.append(Import(module, target, child.lineno, in_function, type_checking, reason))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                      type_checking)

    visit(ast.parse(text, str(path)), False, False)
    return list(dict.fromkeys(found))  # `from m import a, b` of one module is one import


def all_imports() -> list[Import]:
    return [imp for module, path in MODULES.items() for imp in imports_of(module, path)]


def _runtime_module(target: str) -> str:
    """The module file a target names (a package is its __init__)."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def graph(imports: list[Import], *, packages: bool, type_checking: bool = False) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.type_checking != type_checking:
            continue
        a, b = imp.importer, _runtime_module(imp.target)
        if packages:
            a, b = package_of(a), package_of(b)
        if a != b:
            edges[a].add(b)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    nodes = set(edges) | {w for ws in edges.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return found


def _where(imports: list[Import], component: list[str], packages: bool) -> list[str]:
    members = set(component)
    key = package_of if packages else (lambda m: m)
    return [f"{i.importer}:{i.line} -> {i.target}" for i in imports
            if not i.type_checking and key(i.importer) in members
            and key(_runtime_module(i.target)) in members and key(i.importer) != key(_runtime_module(i.target))]


IMPORTS = all_imports()
# what the cycle checks count: every run-time import, but the pending ones
CHECKED = [i for i in IMPORTS if not (i.in_function and i.importer in PENDING_HOIST)]


def test_the_graph_is_read_from_the_source():
    # the reader sees what it must: a real module-level edge and a real TYPE_CHECKING one
    edges = graph(IMPORTS, packages=True)
    assert "migsec.errors" in edges["migsec.protocol"]
    assert "migsec.migration" in edges["migsec.daemon"]
    typed = graph(IMPORTS, packages=True, type_checking=True)
    assert "migsec.daemon" in typed["migsec.migration"]


def test_no_cycle_between_packages():
    found = cycles(graph(CHECKED, packages=True))
    assert not found, "\n".join(f"cycle {' <-> '.join(c)}:\n  " + "\n  ".join(_where(CHECKED, c, True))
                                for c in found)


def test_no_cycle_between_modules():
    found = cycles(graph(CHECKED, packages=False))
    assert not found, "\n".join(f"cycle {' <-> '.join(c)}:\n  " + "\n  ".join(_where(CHECKED, c, False))
                                for c in found)


def test_migration_imports_no_server_code():
    bad = [f"{i.importer}:{i.line} imports {i.target}" for i in IMPORTS
           if package_of(i.importer) == "migsec.migration" and not i.type_checking
           and package_of(i.target) == "migsec.daemon"]
    assert not bad, "\n".join(bad)
    asyncio_users = []
    for module, path in MODULES.items():
        if package_of(module) != "migsec.migration" or module in PENDING_ASYNCIO:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "asyncio" for n in names):
                asyncio_users.append(f"{module}:{node.lineno}")
    assert not asyncio_users, f"asyncio in migsec.migration: {asyncio_users}"


def test_function_level_imports_say_why():
    bad = [f"{i.importer}:{i.line} imports {i.target}" for i in IMPORTS
           if i.in_function and not i.type_checking and i.lazy_reason is None
           and i.importer not in PENDING_HOIST]
    assert not bad, ("import these at module level, or say why not with a `# lazy: reason` comment:\n"
                     + "\n".join(bad))


def test_the_known_exceptions_are_still_needed():
    stale = sorted(m for m in PENDING_HOIST
                   if not any(i.importer == m and i.in_function and i.lazy_reason is None for i in IMPORTS))
    assert not stale, f"remove from PENDING_HOIST: {stale}"
    stale = sorted(m for m in PENDING_ASYNCIO if "asyncio" not in MODULES[m].read_text())
    assert not stale, f"remove from PENDING_ASYNCIO: {stale}"


def main() -> None:  # pragma: no cover - a report for the closing note
    edges = graph(IMPORTS, packages=True)
    print("package import graph (run-time imports, any depth):")
    for pkg in sorted(set(edges) | {package_of(m) for m in MODULES}):
        print(f"  {pkg} -> {', '.join(sorted(edges.get(pkg, ()))) or '-'}")
    typed = graph(IMPORTS, packages=True, type_checking=True)
    print("TYPE_CHECKING-only package edges:")
    for pkg in sorted(typed):
        only = sorted(typed[pkg] - edges.get(pkg, set()))
        if only:
            print(f"  {pkg} -> {', '.join(only)}")
    print("package cycles:", cycles(edges) or "none")
    print("module cycles:", cycles(graph(IMPORTS, packages=False)) or "none")
    if PENDING_HOIST:
        print("  without the pending (PENDING_HOIST) imports:", cycles(graph(CHECKED, packages=True)) or "none",
              cycles(graph(CHECKED, packages=False)) or "none")
    lazy = [i for i in IMPORTS if i.in_function and not i.type_checking]
    print(f"function-level imports: {len(lazy)}")
    for i in lazy:
        print(f"  {i.importer}:{i.line} -> {i.target}: {i.lazy_reason or 'NO REASON'}")


if __name__ == "__main__":  # pragma: no cover
    main()
