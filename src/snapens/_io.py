"""Files on disk, one way: atomic writes, strict JSON, and reads that refuse anything but a regular file.

A private leaf module (it imports nothing of ours), so every layer may use it: ``checkpoint``, ``data``,
``report``, ``cli`` and the integrations.

Every write goes through :func:`atomic_open`: a temporary file in the target's folder (created with mode
``0o666`` minus the umask, like any ``open(path, "w")``), flushed and fsync'ed, moved over the target with
:func:`os.replace`, then the folder is fsync'ed so that the rename itself survives a power cut. A crash or an
exception leaves the old file or the new one, never half of one, and no temporary file.

Every read of a file we expect to be ours goes through :func:`read_regular_bytes`: a FIFO, a device or a folder
named like a snapshot is refused before it is opened for reading (reading a FIFO blocks forever).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "NotARegularFileError",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "json_safe",
    "read_json",
    "read_regular_bytes",
    "require_regular_file",
    "to_json",
]


class NotARegularFileError(OSError):
    """A path that should be a regular file is a FIFO, socket, device or folder."""


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, making a rename inside it durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` only if the ``with`` block finishes without an exception.

    The file is a temporary one beside ``path`` (its ``name`` is its path; ``suffix`` ends that name, for
    writers that pick a format from it). Missing parent folders are created. The final file's mode is
    ``0o666`` minus the umask. On an exception the temporary file is removed and ``path`` is untouched.

    Example:
        >>> with atomic_open(run_dir / "state.pt") as f:   # doctest: +SKIP
        ...     torch.save(state, f)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path, suffix)
        try:
            # "xb": O_CREAT | O_EXCL with mode 0o666, so the umask decides the mode (tempfile would give 0o600)
            f = open(tmp, "xb")
            break
        except FileExistsError:
            continue
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:  # e.g. a full disk: say which file
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that insists on a file name; see :func:`atomic_open`.

    The temporary name keeps ``path``'s whole suffix (``.weights.h5``, ``.png``): some writers pick the format
    from it. When the ``with`` block finishes, whatever the writer left at that name is fsync'ed and moved over
    ``path``; on an exception it is removed and ``path`` is untouched.

    Example:
        >>> with atomic_path(run_dir / "plots" / "lr.png") as tmp:   # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    path = Path(path)
    with atomic_open(path, suffix="".join(path.suffixes)) as f:
        tmp = Path(f.name)
        yield tmp
        # The writer may have replaced the file rather than written into it: sync what is at the name now.
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_open`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively through dicts,
    lists and tuples (tuples become lists); other values are returned as they are."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj``: non-finite floats are written as ``null``, never as the invalid ``NaN``.

    Raises:
        ValueError: ``obj`` holds something JSON cannot represent.
    """
    try:
        return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"cannot write as JSON: {exc}") from exc


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON (:func:`to_json`, plus a final newline) to ``path`` atomically.

    Raises:
        ValueError: ``obj`` is not JSON-serialisable (nothing is written).
    """
    try:
        text = to_json(obj)
    except ValueError as e:
        raise ValueError(f"cannot write {os.fspath(path)}: {e}") from e
    atomic_write_text(path, text + "\n")


def read_regular_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, which must be a regular file (a symlink to one is fine).

    A FIFO, socket, device or folder is refused without being opened for reading: reading a FIFO would block
    until someone writes to it, i.e. forever.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotARegularFileError: ``path`` is not a regular file (the message names it and says what it is).
    """
    path = os.fspath(path)
    require_regular_file(path)
    # O_NONBLOCK: should the path have become a FIFO since the stat, opening it still cannot block.
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        _require_regular(os.fstat(fd).st_mode, path)
        if nonblock:
            os.set_blocking(fd, True)
        return f.read()


def require_regular_file(path: str | os.PathLike[str]) -> None:
    """Check, without opening it, that ``path`` is a regular file (or a symlink to one).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotARegularFileError: ``path`` is a FIFO, socket, device or folder.
    """
    _require_regular(os.stat(path).st_mode, os.fspath(path))


def _require_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise NotARegularFileError(f"{path} is {kind}, not a regular file: refusing to read it")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse ``path`` as strict JSON (UTF-8; ``NaN`` and ``Infinity`` are refused); see :func:`read_regular_bytes`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotARegularFileError: ``path`` is not a regular file.
        ValueError: ``path`` is not valid UTF-8 strict JSON (the message names the file).
    """
    data = read_regular_bytes(path)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from e
