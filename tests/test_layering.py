"""The README's layering table, checked on the source: which of our modules each module may import."""

from __future__ import annotations

import ast
from pathlib import Path

import snapens

SRC = Path(snapens.__file__).parent

#: Private leaves: import nothing of ours, may serve every layer.
LEAVES = {"_checks", "_io", "_lock", "_precision"}
#: Depend on nothing of ours but the leaves.
BASE = {"schedule", "metrics", "weighting", "config", "cost", "distill", "distributed"}
BELOW_CLI = LEAVES | BASE | {"models", "data", "checkpoint", "runs", "averaging", "guidance", "report",
                             "ensemble", "engine"}

#: Top-level module or package -> the top-level modules of ours it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    **{name: set(LEAVES) for name in BASE},
    "models": LEAVES | {"config"},
    "data": set(LEAVES),
    "checkpoint": LEAVES | {"runs"},  # only a lazy re-export of the names that moved to runs
    "runs": LEAVES | {"checkpoint"},
    "averaging": LEAVES | {"checkpoint"},
    "guidance": LEAVES | {"metrics", "weighting"},
    "report": LEAVES | {"metrics", "weighting"},
    # models and data come in through factories, never by import
    "ensemble": LEAVES | BASE | {"checkpoint", "runs"},
    "engine": LEAVES | BASE | {"checkpoint", "runs"},
    "integrations": BELOW_CLI,
    "cli": BELOW_CLI,
    "__init__": BELOW_CLI,
    "__main__": {"cli"},
}


def _ours(path: Path) -> set[str]:
    """The top-level modules of ours that ``path`` imports (``snapens`` alone: the package's own names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "snapens":
                found |= {alias.name for alias in node.names if alias.name != "__version__"}
            elif node.module.startswith("snapens."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("snapens.")}
    return found


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


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from snapens.models import build_model\n    import snapens.data.loader\n")
    assert _ours(bad) == {"models", "data"}
