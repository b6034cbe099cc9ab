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
