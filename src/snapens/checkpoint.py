"""Snapshots on disk: atomic writes, safetensors weights, a JSON manifest, and the resumable training state.

A snapshot is the full ``state_dict`` (parameters and BatchNorm buffers) of the *unwrapped* model (no ``module.``
from DDP, no ``_orig_mod.`` from ``torch.compile``) in ``snapshot-KK.safetensors``, plus an entry in
``manifest.json`` that describes it (step, epoch, learning rate, metrics, model name and constructor arguments,
sha256 of the file). Loading a snapshot reads only safetensors and JSON, so it can never execute code.

Every file is written atomically: a temporary file in the same folder, flushed and fsync'ed, moved over the target
with :func:`os.replace`, then the folder is fsync'ed. A crash leaves the old file or the new one, never half of one.

Example:
    >>> store = SnapshotStore(run_dir / "snapshots")            # doctest: +SKIP
    >>> store.save(model, index=1, step=390, epoch=10, lr=0.0,  # doctest: +SKIP
    ...            model_name="resnet-20", model_kwargs={"num_classes": 10})
    >>> store.load_into(model, 1)                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import random
import secrets
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors.torch
from safetensors.torch import load as safetensors_from_bytes
import torch
from torch import nn

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotStore",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "to_json",
    "capture_rng_state",
    "load_training_state",
    "load_weights",
    "restore_rng_state",
    "save_training_state",
    "save_weights",
    "snapshot_filename",
    "state_dict_mismatch",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "unwrap_state_dict",
    "verify_state_dict",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: The one safetensors metadata key under which :func:`save_weights` stores its JSON-encoded metadata.
METADATA_KEY = "snapens"
MANIFEST_NAME = "manifest.json"
_WRAPPER_PREFIX = "module."  # DistributedDataParallel / DataParallel
_COMPILED_PART = "_orig_mod"  # torch.compile's OptimizedModule


class SnapshotError(ValueError):
    """A snapshot, manifest or state file is missing, corrupt, or does not fit the model. Names the file."""


# ----------------------------------------------------------------------------------------------------- atomic


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where os.open cannot open a folder.
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) for a writer that insists on a file name.

    When the ``with`` block finishes, the file is fsync'ed and moved over ``path`` with :func:`os.replace`, then
    the folder is fsync'ed; on an exception the temporary file is removed and ``path`` is untouched. For writers
    that take a file object, :func:`atomic_write_bytes` and friends are simpler.

    Example:
        >>> with atomic_path(run_dir / "plots" / "lr.png") as tmp:   # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the whole suffix (".weights.h5", ".png"): some writers pick the format from it
    suffix = "".join(path.suffixes)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` only if the ``with`` block finishes without an exception."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            # os.open with 0o666 honours the umask, unlike tempfile's 0o600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
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
    _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``, fsync folder).

    Missing parent folders are created. On failure the previous file, if any, is left untouched and the
    temporary file is removed.
    """
    with _atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
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
        ValueError: ``obj`` is not JSON-serialisable.
    """
    try:
        text = to_json(obj)
    except ValueError as e:
        raise ValueError(f"cannot write {os.fspath(path)}: {e}") from e
    atomic_write_text(path, text + "\n")


# ----------------------------------------------------------------------------------------------- state dicts


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, _COMPILED_PART, None), nn.Module):
            model = getattr(model, _COMPILED_PART)
        else:
            return model


def _strip_key(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIX):
        key = key[len(_WRAPPER_PREFIX) :]
    # torch.compile may wrap any submodule, so its component can sit anywhere in the key.
    return ".".join(part for part in key.split(".") if part != _COMPILED_PART)


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename keys as the unwrapped model has them: drop leading ``module.`` and every ``_orig_mod`` component.

    Values are kept as they are (no copy).

    Raises:
        ValueError: two keys collapse onto the same name.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = _strip_key(key)
        if new in out:
            raise ValueError(f"state dict keys collide after removing wrapper prefixes: {key!r} -> {new!r}")
        out[new] = value
    return out


def unwrap_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A snapshot of a model's weights and buffers, keyed as in the unwrapped model.

    Strips ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes. Every tensor is detached, copied to
    CPU and made contiguous, so the result no longer changes with the model and shares no storage
    (safetensors refuses aliased tensors, e.g. tied weights).

    Raises:
        ValueError: a value is not a tensor (e.g. a module's ``extra_state``) or keys collide.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = unwrap_model(model_or_state_dict).state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise ValueError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_wrapper_prefixes(state).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Describe why ``state_dict`` does not fit ``model`` (missing/unexpected keys, shape mismatches).

    Returns:
        Human-readable problems, empty if the state dict fits. At most ``limit`` keys are named per kind.
    """
    expected = unwrap_model(model).state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{label} {', '.join(items[:limit])}{more}")
    return problems


def verify_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise :class:`SnapshotError` naming ``source`` if ``state_dict`` does not fit ``model``'s architecture."""
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise SnapshotError(f"{source} does not fit {type(unwrap_model(model)).__name__}: {'; '.join(problems)}")


def _load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    verify_state_dict(model, state_dict, source=source)
    unwrap_model(model).load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------------------------------- safetensors files


def _check_safetensors_bytes(data: bytes, path: Path) -> None:
    """Catch truncation with a clear message before handing the bytes to safetensors."""
    if len(data) < 8:
        raise SnapshotError(f"{path} is truncated or not a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise SnapshotError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise SnapshotError(f"{path} has a corrupt safetensors header: {e}") from e
    if 8 + header_len + end > len(data):
        raise SnapshotError(f"{path} is truncated: expected {8 + header_len + end} bytes, found {len(data)}")


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise SnapshotError(f"{what} {path} is missing") from e


def _decode_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    _check_safetensors_bytes(data, path)
    try:
        tensors = safetensors_from_bytes(data)  # parses tensors only: never runs code
    except Exception as e:  # safetensors raises its own SafetensorError (a plain Exception)
        raise SnapshotError(f"{path} is not a readable safetensors file: {e}") from e
    (header_len,) = struct.unpack("<Q", data[:8])
    raw = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if METADATA_KEY not in raw:
        return tensors, {}
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except ValueError as e:
        raise SnapshotError(f"{path} has corrupt {METADATA_KEY!r} metadata: {e}") from e
    return tensors, metadata


def _encode_safetensors(state_dict: Mapping[str, torch.Tensor] | nn.Module, metadata: Mapping[str, Any]) -> bytes:
    tensors = unwrap_state_dict(state_dict)
    try:
        meta = json.dumps(dict(metadata))
    except TypeError as e:
        raise ValueError(f"snapshot metadata is not JSON-serialisable: {e}") from e
    return safetensors.torch.save(tensors, metadata={METADATA_KEY: meta})


def save_weights(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor] | nn.Module,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write one safetensors file atomically; ``metadata`` is JSON-encoded under the key :data:`METADATA_KEY`.

    Args:
        path: Target file (e.g. ``run_dir/best.safetensors``).
        state_dict: A state dict or a model (unwrapped and copied, see :func:`unwrap_state_dict`).
        metadata: JSON-serialisable description (model name and kwargs, epoch, val_acc, ...).
    """
    atomic_write_bytes(path, _encode_safetensors(state_dict, metadata or {}))
    logger.debug("wrote weights %s", path)


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights` (or any safetensors file; then the metadata is ``{}``).

    Returns:
        ``(state_dict, metadata)``, tensors on CPU.

    Raises:
        SnapshotError: the file is missing, truncated or corrupt.
    """
    path = Path(path)
    return _decode_safetensors(_read_bytes(path, "weights file"), path)


# ---------------------------------------------------------------------------------------------- the store


def snapshot_filename(index: int) -> str:
    """``snapshot-KK.safetensors`` for the 1-based snapshot ``index`` (two digits at least)."""
    return f"snapshot-{index:02d}.safetensors"


@dataclass(frozen=True)
class SnapshotInfo:
    """One manifest entry; ``path`` is the snapshot file's location on disk."""

    index: int
    file: str
    step: int
    epoch: float
    lr: float
    metrics: dict[str, Any]
    sha256: str
    model: dict[str, Any]
    created: str
    path: Path = field(compare=False)

    @property
    def model_name(self) -> str:
        """The model's registry name (``model["name"]``)."""
        return str(self.model["name"])

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The model's constructor keyword arguments (``model["kwargs"]``)."""
        return dict(self.model.get("kwargs", {}))

    def to_entry(self) -> dict[str, Any]:
        """The JSON manifest entry (every field but ``path``)."""
        return {
            "index": self.index,
            "file": self.file,
            "step": self.step,
            "epoch": self.epoch,
            "lr": self.lr,
            "metrics": dict(self.metrics),
            "sha256": self.sha256,
            "model": dict(self.model),
            "created": self.created,
        }


_ENTRY_KEYS = ("index", "file", "step", "epoch", "lr", "metrics", "sha256", "model", "created")


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0:
        kind = "a non-negative integer" if integer else "a finite non-negative number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()  # 0-d tensors / numpy scalars
        if value is not None and not isinstance(value, (int, float, str)):
            raise ValueError(f"metric {key!r} must be a number, string or None, got {value!r}")
        out[str(key)] = value
    return out


class SnapshotStore:
    """A folder of snapshots: ``snapshot-KK.safetensors`` files and ``manifest.json`` describing them.

    Args:
        folder: The folder (created on the first save), e.g. ``run_dir / "snapshots"``.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.manifest_path = self.folder / MANIFEST_NAME

    def __repr__(self) -> str:
        return f"SnapshotStore({os.fspath(self.folder)!r})"

    def _read_manifest(self) -> list[dict[str, Any]] | None:
        """Entries of the manifest, or None if it does not exist."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise SnapshotError(f"{self.manifest_path} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise SnapshotError(f"{self.manifest_path} has unsupported format_version {version!r}")
        entries = manifest.get("snapshots")
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and all(k in e for k in _ENTRY_KEYS) for e in entries
        ):
            raise SnapshotError(f"{self.manifest_path} has malformed 'snapshots' entries")
        return entries

    def _info(self, entry: Mapping[str, Any]) -> SnapshotInfo:
        values = {k: entry[k] for k in _ENTRY_KEYS}
        # The file name is confined to the store's folder: a manifest cannot point elsewhere.
        return SnapshotInfo(**values, path=self.folder / Path(str(entry["file"])).name)

    def list(self) -> list[SnapshotInfo]:
        """All snapshots, sorted by index. Empty for a folder that holds no snapshots yet.

        Raises:
            SnapshotError: the manifest is corrupt, or missing while snapshot files exist.
        """
        entries = self._read_manifest()
        if entries is None:
            orphans = sorted(self.folder.glob("snapshot-*.safetensors")) if self.folder.is_dir() else []
            if orphans:
                raise SnapshotError(
                    f"{self.manifest_path} is missing but {len(orphans)} snapshot file(s) exist, e.g. {orphans[0]}"
                )
            return []
        return sorted((self._info(e) for e in entries), key=lambda i: i.index)

    def __len__(self) -> int:
        return len(self.list())

    def get(self, index: int) -> SnapshotInfo:
        """The manifest entry of snapshot ``index``.

        Raises:
            SnapshotError: the manifest is missing or has no such index.
        """
        entries = self._read_manifest()
        if entries is None:
            raise SnapshotError(f"{self.manifest_path} is missing")
        for entry in entries:
            if entry["index"] == index:
                return self._info(entry)
        raise SnapshotError(f"{self.manifest_path} has no snapshot with index {index!r}")

    def save(
        self,
        model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
        *,
        index: int,
        step: int,
        epoch: float,
        lr: float,
        model_name: str,
        model_kwargs: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
    ) -> SnapshotInfo:
        """Write snapshot ``index`` (file first, then the manifest; both atomic). Re-saving an index replaces it.

        Args:
            model_or_state_dict: The model (unwrapped automatically) or its state dict.
            index: 1-based snapshot number (cycle number + 1).
            step: Optimizer steps done when the snapshot was taken.
            epoch: Epochs done (may be fractional: cycles end on steps, not epochs).
            lr: Learning rate of the last step of the cycle.
            model_name: Name for the model builder, e.g. ``"wrn-16-4"``.
            model_kwargs: The builder's keyword arguments (JSON-serialisable).
            metrics: Optional numbers to remember (e.g. ``{"val_acc": 0.93}``).

        Returns:
            The new manifest entry.
        """
        _check_number("index", index, integer=True)
        if index < 1:
            raise ValueError(f"index must be >= 1 (1-based), got {index!r}")
        _check_number("step", step, integer=True)
        _check_number("epoch", epoch)
        _check_number("lr", lr)
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        try:
            kwargs = json.loads(json.dumps(dict(model_kwargs)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model_kwargs must be JSON-serialisable, got {model_kwargs!r}") from e
        entry = {
            "index": index,
            "file": snapshot_filename(index),
            "step": step,
            "epoch": epoch,
            "lr": float(lr),
            "metrics": _clean_metrics(metrics),
            "sha256": "",
            "model": {"name": model_name, "kwargs": kwargs},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        entries = [e for e in (self._read_manifest() or []) if e["index"] != index]
        # The file describes itself too (everything but its own hash), so it stays meaningful on its own.
        data = _encode_safetensors(
            model_or_state_dict, {"format_version": FORMAT_VERSION, **{k: v for k, v in entry.items() if k != "sha256"}}
        )
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(self.folder / entry["file"], data)
        entries.append(entry)
        entries.sort(key=lambda e: e["index"])
        atomic_write_json(self.manifest_path, {"format_version": FORMAT_VERSION, "snapshots": entries})
        logger.debug("saved snapshot %d (step %d) to %s", index, step, self.folder / entry["file"])
        return self._info(entry)

    def load_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Read snapshot ``index`` after checking its sha256 against the manifest. Tensors on CPU.

        Raises:
            SnapshotError: manifest or file missing, file truncated/corrupt, or sha256 mismatch.
        """
        info = self.get(index)
        data = _read_bytes(info.path, "snapshot file")
        _check_safetensors_bytes(data, info.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise SnapshotError(f"{info.path} is corrupt: sha256 {digest} does not match the manifest's {info.sha256}")
        state, _ = _decode_safetensors(data, info.path)
        return state

    def load_into(self, model: nn.Module, index: int) -> SnapshotInfo:
        """Load snapshot ``index`` into ``model`` (wrappers such as DDP or ``torch.compile`` are looked through).

        Raises:
            SnapshotError: as :meth:`load_state_dict`, or the snapshot does not fit the model's architecture.
        """
        info = self.get(index)
        _load_checked(model, self.load_state_dict(index), str(info.path))
        return info


# --------------------------------------------------------------------------------------------- training state


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """``torch.save`` the resume state (model/optimizer/scheduler state dicts, step, RNG...) atomically.

    Keep to types that ``torch.load(weights_only=True)`` accepts: tensors, dicts, lists, tuples, numbers,
    strings, None (see :func:`capture_rng_state`).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"training state must be a dict, got {type(state).__name__}")
    with _atomic_open(path) as f:
        sink = _WriteErrors(f)
        try:
            torch.save(dict(state), sink)
        except RuntimeError:
            # torch.save reports a failed write (disk full) as "unexpected pos ..."; the OSError behind it
            # (errno, message) is what a user can act on.
            if sink.error is not None:
                raise sink.error from None
            raise
    logger.debug("wrote training state %s", path)


class _WriteErrors:
    """A binary file that remembers the OSError its last failed ``write`` raised."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def load_training_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`save_training_state` with ``torch.load(weights_only=True)``.

    Raises:
        SnapshotError: the file is missing, corrupt, or holds objects that weights-only loading refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"training state {path} is missing")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types
        raise SnapshotError(f"training state {path} is corrupt or unsafe to load: {e}") from e
    if not isinstance(state, dict):
        raise SnapshotError(f"training state {path} holds a {type(state).__name__}, not a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The global random states of Python, NumPy, torch CPU and (if available) CUDA, weights_only-safe.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor, ...] | None}`` holding
        only tensors, lists, ints, floats, strings and None.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng_state` (CUDA only where available and captured).

    Raises:
        ValueError: a part is missing.
    """
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise ValueError(f"RNG state lacks {key!r}; has {sorted(state)}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = np.asarray(torch.as_tensor(npst["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npst["name"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            logger.warning("RNG state has %d CUDA generators, this machine %d: restoring the common ones", len(cuda), n)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(torch.as_tensor(s).cpu().to(torch.uint8), device=i)
    elif cuda is not None:
        logger.warning("RNG state has CUDA generators but CUDA is not available: not restored")
