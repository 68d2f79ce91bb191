"""The package layout: imports flow one way (no circle, not even through a function-level import),
modules stay small, tests mirror the sub-packages, and ``import cifar_tune`` loads neither torch nor Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cifar_tune

PACKAGE_DIR = Path(cifar_tune.__file__).resolve().parent
TESTS_DIR = Path(__file__).resolve().parent
MAX_MODULE_LINES = 600


def module_name(path: Path, package_dir: Path) -> str:
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions and classes, except under
    ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a import b`` names module ``a.b`` if it is one)."""
    files = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    top = package_dir.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases = [(a.name, []) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                bases = [(base, [a.name for a in node.names])]
            for base, names in bases:
                if base != top and not base.startswith(top + "."):
                    continue
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in files]
                targets.update(subs or [base])
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def long_modules(package_dir: Path, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    sizes = {module_name(p, package_dir): len(p.read_text().splitlines()) for p in package_dir.rglob("*.py")}
    return {m: n for m, n in sorted(sizes.items()) if n > limit}


def test_find_cycle_reports_the_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg.sub import high\n")
    (pkg / "sub" / "high.py").write_text("from ..low import f\nfrom typing import TYPE_CHECKING\n"
                                         "if TYPE_CHECKING:\n    from pkg import other\n")
    (pkg / "other.py").write_text("")
    graph = import_graph(pkg)
    assert graph["pkg.low"] == {"pkg.sub.high"} and graph["pkg.sub.high"] == {"pkg.low"}
    assert find_cycle(graph) == ["pkg.low", "pkg.sub.high", "pkg.low"]


def test_no_import_circle() -> None:
    """Module-level and function-level imports alike: a function-level import only hides a circle."""
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_layers_keep_the_data_flow() -> None:
    """spec never imports the tuning layer; engine (training) never imports tuning or Ray."""
    graph = import_graph(PACKAGE_DIR)
    for name, targets in graph.items():
        if name.startswith(("cifar_tune.spec", "cifar_tune.engine")):
            assert not {t for t in targets if t.startswith("cifar_tune.tuning")}, name
    for path in (PACKAGE_DIR / "engine").rglob("*.py"):
        for node in _imports(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not [m for m in mods if m == "ray" or m.startswith("ray.")], path


def test_no_module_over_the_limit() -> None:
    assert long_modules(PACKAGE_DIR) == {}


def test_tests_mirror_the_package() -> None:
    """A test file lives at the top of tests/ or in the directory of an existing sub-package."""
    misplaced = []
    for path in TESTS_DIR.rglob("test_*.py"):
        rel = path.parent.relative_to(TESTS_DIR)
        if rel.parts and not (PACKAGE_DIR.joinpath(*rel.parts) / "__init__.py").is_file():
            misplaced.append(str(path.relative_to(TESTS_DIR)))
    assert misplaced == []


def test_import_cifar_tune_is_cheap() -> None:
    code = ("import sys, cifar_tune\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
