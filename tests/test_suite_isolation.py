"""The test suite itself: it leaves the user's home alone (issue 20, item 17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_data_folder import make_tree

from snapens.data import user_cache_dir
from snapens.data.folder import load_folder


def test_the_decode_cache_goes_to_pytests_temp_root_not_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    # conftest's session fixture sets SNAPENS_CACHE_DIR (os.environ: subprocesses inherit it) under the temp root.
    cache = Path(os.environ.get("SNAPENS_CACHE_DIR", str(Path.home() / ".cache" / "snapens")))
    assert cache.resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve()), cache
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert Path.home() == home and user_cache_dir() == cache  # the default resolution honours the variable
    load_folder(make_tree(tmp_path / "tree"), val_size=0)  # decodes and writes the cache
    assert list((cache / "folders").glob("*.npz"))
    assert not list(home.rglob("*"))  # nothing under HOME (no .cache/snapens)
