"""The layout rules of ``lrft/``, checked from the source: one dependency direction (no import
cycle, counting imports inside functions), few loose modules, every package saying its role, no
function longer than a reader can hold (80 lines)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lrft"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the lrft modules it imports anywhere in its source (top level or in functions).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``;
    relative imports are resolved against the importing module's package.
    """
    paths = {module_name(p, root): p for p in root.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in paths else known(base) for a in node.names
                ]
            graph[mod] |= {t for t in targets if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "lrft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lrft.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("import lrft.a\n")
    (pkg / "d.py").write_text("from lrft import a\n")
    graph = import_graph(pkg)
    assert graph["lrft.a"] == {"lrft.sub.b"} and graph["lrft.sub.b"] == {"lrft.c"}
    assert cycles(graph) == [["lrft.a", "lrft.c", "lrft.sub.b"]]


def test_lrft_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 80 and graph["lrft.train.loop"]  # the walk saw the whole package
    assert cycles(graph) == []


def test_few_loose_modules_and_every_package_names_its_role() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 8, loose
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.parent.name}/__init__.py should say what the package is"
    for folder in PACKAGE.iterdir():
        if folder.is_dir() and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder.name} is not a package"


def imported_names(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import, including code held in strings (``python -c``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            with contextlib.suppress(SyntaxError):
                found += imported_names(ast.parse(node.value))
    return found


def test_every_lrft_import_names_a_module_and_name_that_exist() -> None:
    """An import inside a function (or a subprocess's code) runs only when used: a stale path fails late."""
    root = PACKAGE.parent
    sources = [*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "scripts").glob("*.py")]
    sources.remove(Path(__file__).resolve())  # its strings hold a made-up package
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    stale = []
    for path in sources:
        for module, names in imported_names(ast.parse(path.read_text())):
            if module.split(".")[0] != "lrft":
                continue
            if module not in paths:
                stale.append(f"{path.name}: {module}")
                continue
            tree = ast.parse(paths[module].read_text())
            defined = {
                n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            }
            defined |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {
                (a.asname or a.name).split(".")[0]
                for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names
            }
            if "__getattr__" in defined:  # a lazy package (PEP 562) answers its names on first use
                continue
            stale += [
                f"{path.name}: {module}.{n}"
                for n in names
                if n not in defined and f"{module}.{n}" not in paths and n != "*"
            ]
    assert stale == [], stale


MAX_FUNCTION_LINES = 80


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module:function (n lines)`` for each function or method longer than ``limit`` lines,
    decorators and docstring included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    found.append(f"{module_name(path, root)}:{node.name} ({lines} lines)")
    return found


def test_the_length_check_sees_a_long_method(tmp_path: Path) -> None:
    pkg = tmp_path / "lrft"
    pkg.mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(5))
    (pkg / "m.py").write_text(
        f"class A:\n    def short(self):\n        pass\n\n    def long(self):\n{body}\n"
    )
    assert long_functions(pkg, limit=5) == ["lrft.m:long (6 lines)"]


def test_no_function_in_lrft_is_over_80_lines() -> None:
    assert long_functions() == [], "split these into named phases"
