"""Tests for snapens._lock: one owner per run folder, no stale lock after a SIGKILL, no folder left by a refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from snapens._lock import LOCK_FILE, RunFolderBusy, run_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from snapens._lock import run_lock
    with run_lock(sys.argv[1], create=True):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_a_second_owner_is_refused_and_a_killed_owner_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match="in use by another snapens process") as info:
            with run_lock(run, create=True):
                pass
        assert str(run) in str(info.value) and "\n" not in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    with run_lock(run) as path:  # the kernel released the dead process's lock
        assert path == run / LOCK_FILE


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with run_lock(tmp_path, create=True), pytest.raises(RunFolderBusy):
        with run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_a_folder_made_for_a_refused_command_is_removed(tmp_path: Path) -> None:
    run = tmp_path / "new" / "run"
    with pytest.raises(ValueError), run_lock(run, create=True):
        assert (run / LOCK_FILE).is_file()
        raise ValueError("bad input")
    assert not run.exists()
    with run_lock(run, create=True):
        (run / "config.json").write_text("{}")
    assert sorted(os.listdir(run)) == [LOCK_FILE, "config.json"]  # a folder with content stays
    with run_lock(tmp_path / "missing") as path:  # nothing to protect: no folder is made
        assert path is None
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------- issue 20 (round two), item 12


def _read_only_lock_files(monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    """Make opening any ``.lock`` fail as on read-only media (tests run as root, where chmod stops nothing)."""
    import errno as _errno

    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(path).name == LOCK_FILE:
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, flags, *args, **kwargs)

    assert error in (_errno.EROFS, _errno.EACCES)
    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("error", ["EROFS", "EACCES"])
def test_a_read_only_folder_is_not_locked_for_a_command_that_need_not_write(tmp_path: Path, monkeypatch, error) -> None:
    import errno

    _read_only_lock_files(monkeypatch, getattr(errno, error))
    with run_lock(tmp_path, read_only=True) as path:
        assert path is None
    with pytest.raises(OSError) as info, run_lock(tmp_path):  # a writer still fails, with the system's reason
        pass
    assert info.value.errno == getattr(errno, error)
    assert not (tmp_path / LOCK_FILE).exists()


def test_evaluate_works_on_a_read_only_run_folder(tiny_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # `snapens evaluate` of a read-only run failed at once: .lock could not be opened.
    import errno
    import hashlib
    import json
    import shutil

    from snapens.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)

    def files() -> dict[str, str]:
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run.rglob("*")) if p.is_file()}

    before = files()
    _read_only_lock_files(monkeypatch, errno.EROFS)
    assert main(["evaluate", str(run), "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["num_members"] == 2 and summary["ensemble_equal"]["error"] is not None
    assert f"{run} is read-only: the summary is not saved" in captured.err
    assert files() == before  # nothing written: no summary.json, no weights, no lock file
