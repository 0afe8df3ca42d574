"""The code's shape: short files; imports that point down the declared layers, inside functions too, with no
cycles and lazy imports only in light entry points; the trainer's declared interfaces (loss terms see a
StepContext, nothing outside the trainer writes its attributes); a layout map (docs/architecture.md) that names
every module; a clean lint and format (ruff, configured in pyproject.toml). The family boundary (the core reaches
families only through the protocol) is tests/test_families.py."""

import ast
import functools
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


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_file_is_long():
    long = {
        str(p.relative_to(REPO)): n
        for p in _python_files(PACKAGE, REPO / "tests")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines (split by what each part holds): {long}"


# The layers, bottom to top. A module imports its own layer or one below it, never one above, and never inside a
# function either: an import that runs later is still a dependency. errors.py, files.py and version.py are the floor; the
# package's own __init__ (which lazily exposes `dopsd.train`) is the roof.
LAYERS = (
    ("errors", "files", "version"),
    ("core",),
    ("config",),
    ("models",),
    ("data",),
    ("lora",),
    ("methods",),
    ("runs",),
    ("training",),
    ("tools",),
    ("planner",),
    ("mini",),
    ("bench",),
    ("commands",),
    ("ui",),
    ("cli",),
    ("",),
)

# The only files whose functions may import dopsd modules: light entry points that must start (argument parsing,
# --help, the web app's first page) without loading torch: the package (`dopsd.train`), the command line, the
# commands' `main`s, `dopsd bench`, `dopsd mini`, `dopsd ui` (and the web app's one call into the family registry, in
# a child process). Their lazy imports point down like any other.
LAZY_IMPORTS_ALLOWED = (
    "dopsd/__init__.py",
    "dopsd/bench/__init__.py",
    "dopsd/cli.py",
    "dopsd/commands/demo.py",
    "dopsd/commands/evaluate.py",
    "dopsd/commands/plan.py",
    "dopsd/commands/probe.py",
    "dopsd/commands/sample.py",
    "dopsd/commands/train.py",
    "dopsd/mini/cli.py",
    "dopsd/ui/__init__.py",
    "dopsd/ui/adapter.py",
)


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS in {Path(__file__).name}")


def _imports(path: Path, modules: set[str], root: Path = REPO) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) for each import of a dopsd module in `path`: module level (also inside
    if/try/with/class) and function bodies; not `if TYPE_CHECKING:` blocks, which never run."""
    tree = ast.parse(path.read_text(), str(path))
    this = _module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def add(name: str, node: ast.stmt, lazy: bool) -> None:
        if name != this and (name, node.lineno, lazy) not in found:
            found.append((name, node.lineno, lazy))

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    add(name, node, lazy)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}", node, lazy)
                elif base in modules:
                    add(base, node, lazy)
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    # A package's __init__ being imported while one of its submodules loads is Python's normal order, so a
    # submodule's parent packages are not edges; `from package import name` (not a submodule) is.
    visit(tree, False)
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


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))


@functools.cache
def _all_imports() -> dict[Path, list[tuple[str, int, bool]]]:
    files = _python_files(PACKAGE)
    modules = {_module_name(p) for p in files}
    return {p: _imports(p, modules) for p in files}


def _import_graph() -> dict[str, set[str]]:
    return {_module_name(p): {name for name, _, _ in found} for p, found in _all_imports().items()}


def test_imports_point_down_the_layers():
    upward = _upward(_import_graph())
    assert not upward, f"imports of a higher layer (order: {LAYERS}): {upward}"


def test_no_import_cycles():
    cycles = _cycles(_import_graph())
    assert not cycles, f"modules that import each other (counting imports inside functions): {cycles}"


def test_lazy_imports_only_in_light_entry_points():
    assert all((REPO / f).is_file() for f in LAZY_IMPORTS_ALLOWED), "LAZY_IMPORTS_ALLOWED names a file that is gone"
    lazy = sorted(
        f"{p.relative_to(REPO)}:{line} imports {name}"
        for p, found in _all_imports().items()
        for name, line, inside in found
        if inside and str(p.relative_to(REPO)) not in LAZY_IMPORTS_ALLOWED
    )
    assert not lazy, f"imports inside functions outside the light entry points (import at the top): {lazy}"


def test_the_web_app_does_not_import_the_miniature():
    graph = _import_graph()
    ui = {m: targets for m, targets in graph.items() if _layer(m) == _layer("dopsd.ui")}
    reach = sorted(f"{m} -> {t}" for m, targets in ui.items() for t in targets if _layer(t) == _layer("dopsd.mini"))
    assert not reach, f"the web app reaches the miniature only through the family registry: {reach}"


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _upward({"dopsd.core.x": {"dopsd.errors"}, "dopsd.errors": set()}) == []
    assert _upward({"dopsd.models.x": {"dopsd.lora.y"}, "dopsd": {"dopsd.cli"}}) == ["dopsd.models.x -> dopsd.lora.y"]


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    package = tmp_path / "dopsd"
    (package / "core").mkdir(parents=True)
    source = (
        "from typing import TYPE_CHECKING\n"
        "from dopsd.core import a\n"
        "if TYPE_CHECKING:\n    from dopsd import cli\n"
        "def f():\n    from .a import thing\n    import dopsd.errors\n"
    )
    (package / "core" / "b.py").write_text(source)
    modules = {"dopsd", "dopsd.cli", "dopsd.errors", "dopsd.core", "dopsd.core.a", "dopsd.core.b"}
    found = _imports(package / "core" / "b.py", modules, root=tmp_path)
    assert found == [("dopsd.core.a", 2, False), ("dopsd.core.a", 6, True), ("dopsd.errors", 7, True)]


# --- the trainer's declared interfaces ---------------------------------------------------------------------------
TRAINER_FILE = PACKAGE / "training" / "trainer.py"


def _is_trainer(node: ast.expr) -> bool:
    """`trainer`, `t` (the names the package gives a trainer) or `<anything>.trainer`."""
    return (isinstance(node, ast.Name) and node.id in ("trainer", "t")) or (
        isinstance(node, ast.Attribute) and node.attr == "trainer"
    )


def _trainer_writes(source: str) -> list[str]:
    """Assignments to an attribute of a trainer (plain, augmented, annotated, in tuples), and setattr on one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            if node.args and _is_trainer(node.args[0]):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
            continue
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, (ast.Tuple, ast.List)):
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)
            elif isinstance(target, ast.Attribute) and _is_trainer(target.value):
                found.append(f"line {node.lineno}: {ast.unparse(target)} = ...")
    return sorted(found)


def test_nothing_outside_the_trainer_writes_its_attributes():
    """The trainer's state changes only through its own methods (`load_state_dict`, `checkpoint`, `fit`, ...): a
    checkpoint is restored through `load_state_dict`, the monitor returns the health it measured."""
    writes = {
        str(p.relative_to(REPO)): found
        for p in _python_files(PACKAGE)
        if p != TRAINER_FILE and (found := _trainer_writes(p.read_text()))
    }
    assert not writes, f"trainer attributes written outside {TRAINER_FILE.relative_to(REPO)}: {writes}"


def test_the_write_check_sees_a_write():
    source = "def f(trainer, t, self):\n    trainer.step = 1\n    t.a, x = 2, 3\n    self.trainer.b += 1\n"
    assert _trainer_writes(source) == [
        "line 2: trainer.step = ...",
        "line 3: t.a = ...",
        "line 4: self.trainer.b = ...",
    ]
    assert _trainer_writes(source + "    setattr(trainer, 'c', 4)\n")[-1] == "line 5: setattr(trainer, 'c', 4)"
    assert _trainer_writes("def f(trainer):\n    trainer.history.append(1)\n    x = trainer.step\n") == []


def _context_uses(source: str, context: str = "StepContext") -> tuple[list[tuple[str, int]], list[str]]:
    """(member, line) for each `ctx.member` where `ctx` is a parameter annotated `context`; and the functions that
    take a parameter named `trainer` (a term given the trainer itself)."""
    uses, trainers = [], []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        trainers += [f"{fn.name}({a.arg})" for a in params if a.arg == "trainer"]
        names = {a.arg for a in params if a.annotation is not None and ast.unparse(a.annotation) == context}
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
                uses.append((node.attr, node.lineno))
    return sorted(uses, key=lambda use: use[1]), trainers


def test_loss_terms_see_only_the_declared_step_context():
    from dopsd.methods.step import StepContext

    members = set(StepContext.__annotations__) | {n for n in vars(StepContext) if not n.startswith("_")}
    undeclared, trainers, used = {}, {}, set()
    for p in _python_files(PACKAGE / "methods"):
        uses, takes_trainer = _context_uses(p.read_text())
        used |= {m for m, _ in uses}
        if bad := sorted({f"{m} (line {line})" for m, line in uses if m not in members}):
            undeclared[p.name] = bad
        if takes_trainer:
            trainers[p.name] = takes_trainer
    assert not undeclared, f"members of the step context that StepContext does not declare: {undeclared}"
    assert not trainers, f"loss terms given the trainer instead of a StepContext: {trainers}"
    assert {"backward", "contexts", "velocity", "sync", "student", "feats", "teacher", "prior"} <= used


def test_the_context_check_sees_an_undeclared_member():
    source = "def f(ctx: StepContext, trainer):\n    ctx.acc.backward(1)\n    ctx.cfg\n"
    assert _context_uses(source) == ([("acc", 2), ("cfg", 3)], ["f(trainer)"])


def test_the_architecture_page_layout_names_every_module():
    """docs/architecture.md's layout block names every top-level module and package of dopsd/ (so the map stays
    true)."""
    page = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"## Layout\n+```\n(.*?)```", page, re.S)
    assert block, "docs/architecture.md has no '## Layout' code block"
    text = block.group(1).replace("dopsd/", "")
    names = sorted(
        {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" and p.name != "__init__.py"}
        | {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    )
    missing = [n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}", text)]
    assert not missing, f"docs/architecture.md's layout does not mention: {missing}"
    files = {p.name for folder in (PACKAGE, REPO / "benchmarks") for p in folder.rglob("*.py")}
    named = set(re.findall(r"(?<![\w.])([a-z_]+\.py)", text))
    gone = sorted(n for n in named if not any(f.endswith(n) for f in files))
    assert not gone, f"docs/architecture.md's layout names modules that no longer exist: {gone}"


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_lint_and_format_are_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    check = subprocess.run([ruff, "check", "dopsd", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-2000:]
    fmt = subprocess.run(
        [ruff, "format", "--check", "dopsd", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, "run `.venv/bin/ruff format dopsd tests benchmarks`:\n" + fmt.stdout[-4000:]
