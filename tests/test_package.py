"""The package namespace: ``import snapens`` gives the documented submodules, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import snapens

CHECK = """
import sys
import snapens
lazy = [m for m in ("snapens.models", "snapens.data", "snapens.engine", "snapens.integrations") if m in sys.modules]
assert not lazy, f"imported by 'import snapens' alone: {lazy}"
model = snapens.models.build_model("cnn-small", num_classes=3, in_channels=1)
assert sum(p.numel() for p in model.parameters()) > 0
assert snapens.data.load_dataset is not None and snapens.metrics.error_rate is not None
assert "models" in dir(snapens)
"""


def test_documented_submodules_are_reachable_after_import_snapens():
    # A fresh interpreter: in this one other tests have imported the submodules already.
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'modles'"):
        snapens.modles  # noqa: B018
    assert snapens.models.__name__ == "snapens.models"
