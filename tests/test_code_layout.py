"""The code's shape: short files, no import cycles between modules, a README layout that names every module, and a
clean lint and format (ruff, configured in pyproject.toml). The family boundary (the core reaches families only
through the protocol) is tests/test_families.py."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dopsd"
MAX_LINES = 400


def _python_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_file_is_long():
    long = {
        str(p.relative_to(REPO)): n
        for p in _python_files(PACKAGE, REPO / "tests")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines (split by what each part holds): {long}"


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """dopsd modules imported when `path` is imported: module-level statements (also inside top-level if/try),
    not function bodies and not `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        found.add(f"{base}.{alias.name}")
                    elif base in modules:
                        found.add(base)

    # A package's __init__ being imported while one of its submodules loads is Python's normal order, so a
    # submodule's parent packages are not edges; `from package import name` (not a submodule) is.
    visit(tree.body)
    found.discard(this)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _import_graph() -> dict[str, set[str]]:
    files = _python_files(PACKAGE)
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _top_level_imports(p, modules) for p in files}


def test_no_import_cycles():
    graph = _import_graph()
    assert not _cycles(graph), f"modules that import each other at import time: {_cycles(graph)}"


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_readme_layout_names_every_module():
    """The README's layout block names every top-level module and package of dopsd/ (so the map stays true)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\n+```\n(.*?)```", readme, re.S)
    assert block, "README.md has no '## Layout' code block"
    text = block.group(1).replace("dopsd/", "")
    names = sorted(
        {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" and p.name != "__init__.py"}
        | {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    )
    missing = [n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}", text)]
    assert not missing, f"README.md's layout does not mention: {missing}"
    files = {p.name for folder in (PACKAGE, REPO / "benchmarks") for p in folder.rglob("*.py")}
    named = set(re.findall(r"(?<![\w.])([a-z_]+\.py)", text))
    gone = sorted(n for n in named if not any(f.endswith(n) for f in files))
    assert not gone, f"README.md's layout names modules that no longer exist: {gone}"


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_lint_and_format_are_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    check = subprocess.run([ruff, "check", "dopsd", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-2000:]
    fmt = subprocess.run(
        [ruff, "format", "--check", "dopsd", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, "run `.venv/bin/ruff format dopsd tests benchmarks`:\n" + fmt.stdout[-4000:]
