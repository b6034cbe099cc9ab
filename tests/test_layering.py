"""The README's layering table, checked on the source: which of our modules each module may import; no import
circles; no module over 600 lines and no function body over 100 lines (issue 19)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import snapens

SRC = Path(snapens.__file__).parent

#: Private leaves: import nothing of ours, may serve every layer.
LEAVES = {"_checks", "_io", "_lock", "_precision"}
#: Depend on nothing of ours but the leaves (schedule also reads config's one table of schedule options).
BASE = {"schedule", "metrics", "weighting", "config", "cost", "distill", "distributed"}
BELOW_CLI = LEAVES | BASE | {"models", "data", "checkpoint", "runs", "averaging", "guidance", "report",
                             "ensemble", "engine"}

#: Top-level module or package -> the top-level modules of ours it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    **{name: set(LEAVES) for name in BASE},
    "schedule": LEAVES | {"config"},
    "models": LEAVES | {"config"},
    "data": set(LEAVES),
    "checkpoint": set(LEAVES),
    "runs": LEAVES | {"checkpoint"},
    "averaging": LEAVES | {"checkpoint"},
    "guidance": LEAVES | {"metrics", "weighting"},
    "report": LEAVES | {"metrics", "weighting"},
    # models and data come in through factories, never by import
    "ensemble": LEAVES | BASE | {"checkpoint", "runs"},
    "engine": LEAVES | BASE | {"checkpoint", "runs"},
    "integrations": BELOW_CLI,
    # the library layer: whole runs (train, evaluate, average, distill, export, plot, reproduce)
    "workflows": BELOW_CLI | {"pretrained"},
    # named, sha256-pinned snapshot bundles: loads them as ensembles (library layer, beside workflows)
    "pretrained": BELOW_CLI,
    "cli": BELOW_CLI | {"workflows", "pretrained"},
    "__init__": BELOW_CLI | {"workflows", "pretrained"},
    "__main__": {"cli"},
}
#: The only CLI modules another CLI module may import: the package (the error, main) and the printing helpers.
CLI_SHARED = {"snapens.cli", "snapens.cli._common"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _face_module(name: str) -> str | None:
    """The module of ours behind ``from snapens import name``: ``snapens.<name>`` for a submodule, the module it
    is re-exported from for a name of the package's face (eager or lazy, e.g. ``snapens.train``); None for
    ``__version__``. The package's ``__init__`` is a face, not a room: importing through it is importing that."""
    if (SRC / f"{name}.py").is_file() or (SRC / name / "__init__.py").is_file():
        return f"snapens.{name}"
    if name == "__version__":
        return None
    eager = _eager_names()
    if name in eager:
        return eager[name]
    home = getattr(getattr(snapens, name, None), "__module__", None)
    return home if isinstance(home, str) and home.startswith("snapens.") else "snapens"


def _eager_names() -> dict[str, str]:
    """Name -> module, for the names ``snapens/__init__.py`` binds by a top-level ``from snapens.X import``."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    return {a.asname or a.name: node.module for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("snapens.")
            for a in node.names}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``import``/``from ... import`` of ours in ``path``, in functions too (but not
    the lazy ones inside ``snapens/__init__.py``'s functions: the package face, not a dependency)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if path == SRC / "__init__.py" else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "snapens" or node.module.startswith("snapens.")):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name == "snapens" or a.name.startswith("snapens.")]
    return found


def _ours(path: Path) -> set[str]:
    """The top-level modules of ours that ``path`` imports (``snapens`` alone: the package's own names)."""
    found = set()
    for module, names in _imports(path):
        if module == "snapens":
            for name in names:
                face = _face_module(name)
                if face is not None and face != "snapens":
                    found.add(face.split(".")[1])
                elif face == "snapens":
                    found.add(name)  # not a name of ours: reported as it is
        else:
            found.add(module.split(".")[1])
    return found


def _module_name(path: Path) -> str:
    parts = ("snapens", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _targets(module: str, names: list[str], known: set[str]) -> set[str]:
    """The modules of ours an import statement runs: ``from a.b import c`` is ``a.b.c`` when that is a module."""
    if module == "snapens":  # ``import snapens`` runs the face itself; ``from snapens import x``, x's module
        return {m for m in (_face_module(n) for n in names) if m is not None} if names else {"snapens"}
    subs = {f"{module}.{n}" for n in names} & known
    if subs and len(subs) == len(names):
        return subs
    while module not in known and "." in module:
        module = module.rsplit(".", 1)[0]
    return {module} | subs


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (at module level or in a function)."""
    modules = _modules()
    known = set(modules)
    return {name: {t for module, names in _imports(path) for t in _targets(module, names, known)} - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _function_body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
            body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return (node.end_lineno or body[-1].end_lineno or 0) - body[0].lineno + 1


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"file:line name (N lines)"`` for each function in ``path`` whose body is over ``limit`` lines."""
    return [f"{path.name}:{node.lineno} {node.name} ({n} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := _function_body_lines(node)) > limit]


def test_every_module_is_in_the_table() -> None:
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")}
    assert tops <= set(ALLOWED), f"add {sorted(tops - set(ALLOWED))} to ALLOWED (and the README's Layout)"


def test_imports_follow_the_layering() -> None:
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        top = path.relative_to(SRC).parts[0].removesuffix(".py")
        extra = _ours(path) - ALLOWED[top] - {top}
        if extra:
            broken.append(f"{path.relative_to(SRC)} imports {sorted(extra)}")
    assert not broken, "\n".join(broken)


def test_cli_modules_do_not_import_each_other() -> None:
    # A subcommand calls the library layer (snapens.workflows); it shares only the error and printing helpers.
    graph = import_graph()
    broken = [f"{name} imports {sorted(bad)}" for name, targets in sorted(graph.items())
              if name.startswith("snapens.cli.")
              and (bad := {t for t in targets if t.startswith("snapens.cli.") or t == "snapens.cli"} - CLI_SHARED)]
    assert not broken, "\n".join(broken)


def test_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_over_600_lines() -> None:
    long = [f"{p.relative_to(SRC)} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "split these modules:\n" + "\n".join(long)


def test_no_function_body_over_100_lines() -> None:
    long = [f"{p.relative_to(SRC).parent}/{line}" for p in sorted(SRC.rglob("*.py")) for line in long_functions(p)]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from snapens.models import build_model\n    import snapens.data.loader\n"
                   "    from snapens import SnapshotError, train\n")
    # names of the package's face count as the modules behind them
    assert _ours(bad) == {"models", "data", "checkpoint", "workflows"}


def test_the_circle_finder_sees_a_circle_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_imports_and_the_package_face() -> None:
    graph = import_graph()
    # cli.train imports snapens.workflows.training at module level, snapens.models inside a function
    assert {"snapens.workflows.training", "snapens.models"} <= graph["snapens.cli.train"]
    # the package's lazy names (snapens.train, snapens.workflows) are not edges of its face
    assert "snapens.workflows" not in graph["snapens"] and "snapens.checkpoint" in graph["snapens"]


@pytest.mark.parametrize(("source", "expected"), [
    ('def f():\n    """Doc\n    string."""\n    a = 1\n    return a\n', 2),
    ("def f():\n    a = 1\n\n    # why\n    return a\n", 4),
])
def test_function_bodies_are_counted_without_their_docstring(tmp_path: Path, source: str, expected: int) -> None:
    path = tmp_path / "f.py"
    path.write_text(source)
    assert long_functions(path, limit=expected - 1) == [f"f.py:1 f ({expected} lines)"]
    assert long_functions(path, limit=expected) == []
