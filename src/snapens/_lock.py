"""One owner per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock`` (a private leaf module).

Every command that writes into a run folder (``train``, ``train --resume``, ``evaluate``, ``plot``, ``average``,
``distill`` and ``reproduce`` into their folders, ``export`` into it) holds the lock from before its first write
until it exits, so two processes can never interleave their files (config.json of one run, snapshots of another).
A folder on read-only media cannot hold a lock file, and cannot be written either: a command that can do without
writing there asks for ``read_only=True`` and runs unlocked. The kernel releases a ``flock`` when its process
dies, also by SIGKILL: a crashed run never leaves a stale lock behind, and ``.lock`` itself carries no state.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunFolderBusy", "run_lock"]

LOCK_FILE = ".lock"
#: open() errors that say the folder cannot be written (read-only media, no permission).
_READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)

logger = logging.getLogger(__name__)


class RunFolderBusy(OSError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str], *, create: bool = False,
             read_only: bool = False) -> Iterator[Path | None]:
    """Hold the exclusive lock of ``run_dir`` for the block; fail at once if another process holds it.

    Args:
        run_dir: the run folder.
        create: make ``run_dir`` (and its parents) if missing; if it was made here and holds nothing but the
            lock file when the block exits, it is removed again (a refused command leaves no folder behind).
            Without ``create`` a missing folder is not locked (yields None): there is nothing to protect, and
            the command fails on its own.
        read_only: for a command that writes into the folder only if it can: when the lock file cannot be
            made or opened because the folder is not writable (read-only media, no permission), yield None
            without locking instead of raising (nobody can write such a folder from here either).

    Raises:
        RunFolderBusy: another process holds the lock (one line, naming the folder).
    """
    import fcntl  # POSIX only; imported here so that importing this module never fails

    folder = Path(run_dir)
    made = False
    if not folder.is_dir():
        if not create:
            yield None
            return
        made = not folder.exists()
    path = folder / LOCK_FILE
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            if not (read_only and exc.errno in _READ_ONLY_ERRORS):
                raise
            logger.debug("%s is not writable (%s): not locked", folder, exc.strerror)
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"{folder} is in use by another snapens process (it holds {path}); wait for "
                                    "it to finish or use another folder") from None
            raise
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the lock is on the file that is there now, not on one removed while we waited
        os.close(fd)
    try:
        yield path
    finally:
        # The lock file is removed (while still locked) only from a folder made here that stayed empty; a
        # process that opened it meanwhile sees the inode change above and starts over.
        if made and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                path.unlink()
                folder.rmdir()
        os.close(fd)
