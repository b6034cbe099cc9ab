"""Fetching, verifying, writing and unpacking data files, without trusting what comes over the wire.

Files are written through :func:`snapens._io.atomic_open` (atomic, honouring the umask).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from snapens._io import atomic_open
from snapens._io import fsync_dir

__all__ = ["file_md5", "download_file", "check_tar_members", "safe_extract", "user_cache_dir"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def user_cache_dir() -> Path:
    """``$SNAPENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/snapens``, else ``~/.cache/snapens`` (not created here)."""
    if os.environ.get("SNAPENS_CACHE_DIR"):
        return Path(os.environ["SNAPENS_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "snapens"
    return Path.home() / ".cache" / "snapens"


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike[str], *, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, checking the MD5 of the bytes received.

    A tqdm progress bar is shown when stderr is a terminal. Nothing is written at ``dest`` unless the whole file
    arrived and its digest matched.

    Raises:
        ValueError: ``url`` is not http(s), or the digest differs from ``md5``.
        ConnectionError: the server could not be reached or answered with an error.
    """
    from tqdm.auto import tqdm

    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"only http(s) downloads are supported, got {url!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_open(dest) as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not sys.stderr.isatty()) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            if md5 is not None and digest.hexdigest() != md5:
                raise ValueError(f"downloaded {url} has MD5 {digest.hexdigest()}, expected {md5}; not saved")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"could not download {url}: {reason}; place {dest.name} in {dest.parent} by hand instead"
        ) from exc
    return dest


def check_tar_members(members: list[tarfile.TarInfo], archive: str | os.PathLike[str]) -> None:
    """Refuse archives that could write outside the target folder or create anything but files and folders.

    Raises:
        ValueError: naming the archive and the first bad member (absolute path, ``..``, link, device, fifo).
    """
    for m in members:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts or "\\" in m.name:
            raise ValueError(f"unsafe path {m.name!r} in archive {archive}")
        if m.issym() or m.islnk():
            raise ValueError(f"archive {archive} contains a link {m.name!r} -> {m.linkname!r}; refusing to extract")
        if not (m.isfile() or m.isdir()):
            raise ValueError(f"archive {archive} contains a special file {m.name!r} (device or fifo); refusing")


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"corrupt archive {archive}: {exc}") from exc


def read_tar_members(archive: str | os.PathLike[str], wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The bytes of the regular-file members whose names satisfy ``wanted``, read without extracting.

    The whole member list is checked with :func:`check_tar_members` first.
    """
    archive = Path(archive)
    out: dict[str, bytes] = {}
    with _open_tar(archive) as tf:
        try:
            members = tf.getmembers()
            check_tar_members(members, archive)
            for m in members:
                if m.isfile() and wanted(m.name):
                    handle = tf.extractfile(m)
                    assert handle is not None  # regular files always have one
                    out[m.name] = handle.read()
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ValueError(f"corrupt archive {archive}: {exc}") from exc
    return out


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract a tar archive into ``dest`` after checking every member.

    Members are written into a temporary folder inside ``dest`` first and each top-level entry is then renamed
    into place, so a failed extraction never leaves a half-filled folder under its final name. Existing
    top-level entries are replaced.

    Returns:
        The top-level paths created in ``dest``.

    Raises:
        ValueError: the archive is corrupt or holds an unsafe member (see :func:`check_tar_members`).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with _open_tar(archive) as tf:
            try:
                members = tf.getmembers()
                check_tar_members(members, archive)
                for m in members:
                    target = staging.joinpath(*PurePosixPath(m.name).parts)
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tf.extractfile(m)
                    assert source is not None
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise ValueError(f"corrupt archive {archive}: {exc}") from exc
        created = []
        for entry in sorted(staging.iterdir()):
            final = dest / entry.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(entry, final)
            created.append(final)
        fsync_dir(dest)
        return created
    finally:
        shutil.rmtree(staging, ignore_errors=True)
