"""The snapshot store: ``snapshot-KK.safetensors`` files and the ``manifest.json`` that describes them."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapens._io import NotARegularFileError, atomic_write_bytes, atomic_write_json, read_json
from snapens.checkpoint.weights import SnapshotError, _decode_safetensors, _encode_safetensors, _load_checked
from snapens.checkpoint.weights import _read_bytes, _refuse_non_finite_weights

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "SnapshotInfo", "SnapshotStore", "snapshot_filename"]

logger = logging.getLogger("snapens.checkpoint")

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one manifest entry (its fields and their types), or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if missing or unknown:
        return f"lacks {missing}" if missing else f"has unknown keys {unknown}"
    try:
        _check_number("index", entry["index"], integer=True)
        _check_number("step", entry["step"], integer=True)
        _check_number("epoch", entry["epoch"])
        _check_number("lr", entry["lr"])
    except ValueError as e:
        return str(e)
    if entry["index"] < 1:
        return f"index must be >= 1, got {entry['index']!r}"
    if entry["file"] != snapshot_filename(entry["index"]):
        return f"file must be {snapshot_filename(entry['index'])!r} for index {entry['index']}, got {entry['file']!r}"
    metrics = entry["metrics"]
    if not isinstance(metrics, dict) or not all(
        v is None or isinstance(v, (int, float, str)) for v in metrics.values()
    ):
        return f"metrics must be an object of numbers, strings or null, got {metrics!r}"
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        return f"sha256 must be 64 lowercase hex digits, got {entry['sha256']!r}"
    model = entry["model"]
    if (
        not isinstance(model, dict)
        or set(model) != {"name", "kwargs"}
        or not isinstance(model["name"], str)
        or not model["name"]
        or not isinstance(model["kwargs"], dict)
    ):
        return f"model must be an object {{'name': <non-empty string>, 'kwargs': <object>}}, got {model!r}"
    if not isinstance(entry["created"], str):
        return f"created must be a string, got {entry['created']!r}"
    return None


def _manifest_entries(manifest: Any, path: Path) -> list[dict[str, Any]]:
    """The entries of a parsed manifest, sorted by index, after checking it against its schema.

    The schema: ``{"format_version": 1, "snapshots": [entry, ...]}``; every entry has exactly the fields of
    :class:`SnapshotInfo` (but ``path``) with their types, ``file`` is :func:`snapshot_filename` of ``index``,
    and the indices are 1..M, each once. A gap, a duplicate or an index 99 would change the ensemble's
    members or which snapshot counts as the last, so they are refused rather than sorted around.

    Raises:
        SnapshotError: naming ``path`` and the first problem found.
    """
    def bad(problem: str) -> SnapshotError:
        return SnapshotError(f"{path} is not a valid snapshot manifest: {problem}")

    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise SnapshotError(f"{path} has unsupported format_version {version!r}")
    if set(manifest) != {"format_version", "snapshots"}:
        raise bad(f"expected the keys ['format_version', 'snapshots'], got {sorted(manifest)}")
    entries = manifest["snapshots"]
    if not isinstance(entries, list):
        raise bad(f"'snapshots' must be a list, got {type(entries).__name__}")
    for n, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem is not None:
            raise bad(f"snapshots[{n}] {problem}")
    indices = [e["index"] for e in entries]
    if sorted(indices) != list(range(1, len(entries) + 1)):
        raise bad(f"the snapshot indices must be 1..{len(entries)}, each once, got {indices}")
    return sorted(entries, key=lambda e: e["index"])


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
        """Entries of the manifest, checked (:func:`_manifest_entries`) and sorted by index; None if it does not
        exist."""
        try:
            manifest = read_json(self.manifest_path)
        except FileNotFoundError:
            return None
        except (ValueError, NotARegularFileError) as e:  # the messages name the file
            raise SnapshotError(str(e)) from e
        return _manifest_entries(manifest, self.manifest_path)

    def _info(self, entry: Mapping[str, Any]) -> SnapshotInfo:
        values = {k: entry[k] for k in _ENTRY_KEYS}
        # The file name is confined to the store's folder: a manifest cannot point elsewhere.
        return SnapshotInfo(**values, path=self.folder / Path(str(entry["file"])).name)

    def list(self) -> list[SnapshotInfo]:
        """All snapshots, sorted by index. Empty for a folder that holds no snapshots yet.

        Raises:
            SnapshotError: the manifest is missing while snapshot files exist, breaks its schema (see
                :func:`_manifest_entries`), or leaves out a snapshot file of the folder (dropping the last
                entry would otherwise shrink the ensemble unnoticed).
        """
        entries = self._read_manifest()
        files = sorted(self.folder.glob("snapshot-*.safetensors")) if self.folder.is_dir() else []
        if entries is None:
            if files:
                raise SnapshotError(
                    f"{self.manifest_path} is missing but {len(files)} snapshot file(s) exist, e.g. {files[0]}"
                )
            return []
        listed = {e["file"] for e in entries}
        unlisted = [f for f in files if f.name not in listed]
        if unlisted:
            raise SnapshotError(
                f"{unlisted[0]} is not listed in {self.manifest_path} (which lists {len(entries)} snapshots): a save "
                "interrupted before its manifest entry (`snapens train --resume` writes it again) or a stray file"
            )
        return [self._info(e) for e in entries]

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

        Indices are 1..M without gaps: ``index`` is at most one more than the number of snapshots stored.

        Args:
            model_or_state_dict: The model (unwrapped automatically) or its state dict.
            index: 1-based snapshot number (cycle number + 1).
            step: Optimizer steps done when the snapshot was taken, counting the step that ended the cycle:
                ``k + 1`` for a snapshot after 0-based step ``k`` (a scheduler's ``steps_done``, not its
                ``last_epoch``). :func:`snapens.engine.fit` and the Lightning/``transformers`` callbacks store this.
            epoch: Epochs done, ``step / steps_per_epoch`` (fractional: cycles end on steps, not epochs).
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
        entries = self._read_manifest() or []
        if index > len(entries) + 1:
            # the manifest's indices are 1..M: a gap would make the store unreadable
            raise ValueError(f"index {index} would leave a gap: {self.manifest_path} holds snapshots "
                             f"1..{len(entries)}, so the next index is {len(entries) + 1}")
        entries = [e for e in entries if e["index"] != index]
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
            SnapshotError: manifest or file missing (or not a regular file), file truncated/corrupt, sha256
                mismatch, the file's own metadata (index, step, model) disagrees with the manifest, or NaN/inf
                values.
        """
        info = self.get(index)
        data = _read_bytes(info.path, "snapshot file")
        state, metadata = _decode_safetensors(data, info.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise SnapshotError(f"{info.path} is corrupt: sha256 {digest} does not match the manifest's {info.sha256}")
        # A renamed or renumbered file keeps its hash: only its own metadata tells which snapshot it is.
        if metadata.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(f"{info.path} has no snapens snapshot metadata (format_version "
                                f"{metadata.get('format_version')!r}): it was not written by SnapshotStore")
        for key in ("index", "step", "model"):
            if metadata.get(key) != getattr(info, key) or type(metadata.get(key)) is not type(getattr(info, key)):
                raise SnapshotError(
                    f"{info.path} says it is snapshot {metadata.get('index')!r} (step {metadata.get('step')!r}, "
                    f"model {metadata.get('model')!r}), but {self.manifest_path} lists it as snapshot {info.index} "
                    f"(step {info.step}, model {info.model!r}): the manifest and the file disagree on {key!r}")
        _refuse_non_finite_weights(state, info.path)
        return state

    def load_into(self, model: nn.Module, index: int) -> SnapshotInfo:
        """Load snapshot ``index`` into ``model`` (wrappers such as DDP or ``torch.compile`` are looked through).

        Raises:
            SnapshotError: as :meth:`load_state_dict`, or the snapshot does not fit the model's architecture.
        """
        info = self.get(index)
        _load_checked(model, self.load_state_dict(index), str(info.path))
        return info
