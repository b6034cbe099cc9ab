"""The library layer for whole runs (snapens.workflows): the README's Python API example, run as it stands, and
the entry points reachable from the package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import snapens

README = Path(__file__).parents[1] / "README.md"


def readme_python_api() -> str:
    """The first ``python`` code block of the README's "## Python API" section."""
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python block"
    return match.group(1)


def test_the_readme_example_runs_as_it_stands(tmp_path: Path) -> None:
    code = readme_python_api()
    # A fresh interpreter in an empty folder: the block must need nothing else (runs/py is relative).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(snapens.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "runs" / "py" / "summary.json").read_text())
    lines = done.stdout.splitlines()
    assert lines == [f"last snapshot: {summary['last_snapshot']['error']:.2f} % test error",
                     f"recommended ({summary['ensemble_recommended']['members_run']} of 2): "
                     f"{summary['ensemble_recommended']['error']:.2f} % test error"]
    assert summary["member_names"] == ["snapshot-01", "snapshot-02"]
    assert not done.stdout.count("snapens train")  # the library announces through logging, it never prints


def test_train_and_evaluate_are_reachable_lazily() -> None:
    check = ("import sys, snapens\n"
             "assert 'snapens.workflows' not in sys.modules\n"
             "from snapens.workflows import evaluate, train\n"
             "assert snapens.train is train and snapens.evaluate is evaluate\n"
             "assert {'train', 'evaluate', 'workflows'} <= set(dir(snapens))\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_library_errors_are_library_exceptions(tmp_path: Path) -> None:
    from snapens.config import TrainConfig

    with pytest.raises(ValueError, match="not a snapens run folder"):
        snapens.evaluate(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        snapens.train(TrainConfig(epochs=1, snapshots=1, device="cpu", threads=1), tmp_path / "file")
    with pytest.raises(ValueError, match="list-models"):
        snapens.train(TrainConfig(model="no-such-net", epochs=1, snapshots=1, device="cpu", threads=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
