"""snapens._io: the one atomic writer (umask, atomicity, kills mid-write), strict JSON, regular-file reads."""

from __future__ import annotations

import ast
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import snapens._io as io_mod
from snapens._io import (
    NotARegularFileError,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    read_regular_bytes,
    to_json,
)


@pytest.fixture()
def umask():
    """``umask(mask)`` sets the process umask for the rest of the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_honours_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    with atomic_open(tmp_path / "c.pt") as f:
        f.write(b"x")
    with atomic_path(tmp_path / "d.weights.h5") as tmp:
        tmp.write_bytes(b"x")
    old = tmp_path / "e.bin"
    old.write_bytes(b"old")
    old.chmod(0o600)
    atomic_write_bytes(old, b"new")  # the final mode is the umask's, as for any file written anew
    for name in ("a.bin", "b.json", "c.pt", "d.weights.h5", "e.bin"):
        assert mode(tmp_path / name) == expected, name


def test_failure_mid_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old contents")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    with pytest.raises(ValueError, match=r"cannot write .*f\.bin"):
        atomic_write_json(target, {"f": object()})
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_failing_replace_or_fsync_leaves_the_old_file(tmp_path, monkeypatch, broken):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old contents")

    def fail(*args):
        raise OSError(f"{broken} failed")

    monkeypatch.setattr(io_mod.os, broken, fail)
    with pytest.raises(OSError, match=f"{broken} failed"):
        atomic_write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]


_KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("_io", sys.argv[1])  # the leaf module alone: no torch to import
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.atomic_open(sys.argv[2]) as f:
    f.write(b"half of the new contents")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old contents")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, io_mod.__file__, str(target)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old contents"
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]  # a hidden temp file, for the next run to clean
    assert leftover.name.startswith(".state.pt.") and leftover.name.endswith(".tmp")


def test_atomic_path_takes_a_writer_that_replaces_the_file(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name.startswith(".plot.png.")
        other = tmp_path / "elsewhere"
        other.write_bytes(b"written elsewhere, renamed onto the temp name")
        os.replace(other, tmp)
    assert target.read_bytes() == b"written elsewhere, renamed onto the temp name"
    assert os.listdir(tmp_path) == ["plot.png"]


def test_strict_json_round_trip_and_refusals(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": float("nan"), "b": [1.5, float("inf")], "c": (1, 2)})
    assert path.read_text() == to_json({"a": None, "b": [1.5, None], "c": [1, 2]}) + "\n"
    assert read_json(path) == {"a": None, "b": [1.5, None], "c": [1, 2]}
    for text, why in ((b'{"a": NaN}', "NaN is not valid JSON"), (b'[Infinity]', "Infinity"),
                      (b"\xff{}", "utf-8"), (b"{", "Expecting")):
        path.write_bytes(text)
        with pytest.raises(ValueError, match=rf"x\.json is not valid JSON: .*{why}"):
            read_json(path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_non_regular_files_are_refused_without_being_read(tmp_path, without_blocking_on):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    for read in (read_json, read_regular_bytes):
        with pytest.raises(NotARegularFileError, match=r"config\.json is a FIFO \(named pipe\), not a regular file"):
            without_blocking_on(fifo, lambda: read(fifo))
    with pytest.raises(NotARegularFileError, match="is a folder"):
        read_regular_bytes(tmp_path)
    real = tmp_path / "real.json"
    real.write_text(json.dumps([1]))
    (tmp_path / "link.json").symlink_to(real)
    assert read_json(tmp_path / "link.json") == [1]  # a symlink to a regular file is fine


def test_io_is_a_leaf_module():
    """_io serves every layer, so it may import only the standard library."""
    tree = ast.parse(Path(io_mod.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
