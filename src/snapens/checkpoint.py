"""Snapshots on disk: atomic writes, safetensors weights and a JSON manifest.

A snapshot is the full ``state_dict`` (parameters and BatchNorm buffers) of the *unwrapped* model (no ``module.``
from DDP, no ``_orig_mod.`` from ``torch.compile``) in ``snapshot-KK.safetensors``, plus an entry in
``manifest.json`` that describes it (step, epoch, learning rate, metrics, model name and constructor arguments,
sha256 of the file). Loading a snapshot reads only safetensors and JSON, so it can never execute code.

Every file is written atomically (:mod:`snapens._io`): a temporary file in the same folder, flushed and fsync'ed,
moved over the target with :func:`os.replace`, then the folder is fsync'ed. A crash leaves the old file or the new
one, never half of one. Reading refuses what does not fit: a manifest that breaks its schema (indices 1..M,
unique, file names that match them), a file whose own metadata disagrees with its manifest entry, non-finite
weights, tensors of another dtype kind than the model's, and anything that is not a regular file (a FIFO would
block the reader forever).

Example:
    >>> store = SnapshotStore(run_dir / "snapshots")            # doctest: +SKIP
    >>> store.save(model, index=1, step=390, epoch=10, lr=0.0,  # doctest: +SKIP
    ...            model_name="resnet-20", model_kwargs={"num_classes": 10})
    >>> store.load_into(model, 1)                               # doctest: +SKIP
"""

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

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
import torch
from torch import nn

# The atomic writers and strict JSON live in the private leaf module _io; re-exported here, where they were public.
from snapens._io import (
    NotARegularFileError,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_safe,
    read_json,
    read_regular_bytes,
    require_regular_file,
    to_json,
)

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


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating point"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Describe why ``state_dict`` does not fit ``model`` (missing/unexpected keys, shape mismatches, a tensor
    of another dtype kind than the model's: integer or bool where the model has floating point, or the reverse).

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
    # A float model loading int or bool weights (or the reverse) would be cast silently into nonsense; float16
    # vs float32 is only a precision choice and is cast as usual.
    dtypes = [
        f"{k}: file {state_dict[k].dtype} vs model {expected[k].dtype}"
        for k in expected
        if k in state_dict and isinstance(state_dict[k], torch.Tensor)
        and _dtype_kind(state_dict[k].dtype) != _dtype_kind(expected[k].dtype)
    ]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes),
                         ("dtype mismatch", dtypes)):
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


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return read_regular_bytes(path)
    except FileNotFoundError as e:
        raise SnapshotError(f"{what} {path} is missing") from e
    except NotARegularFileError as e:
        raise SnapshotError(f"{what} {e}") from e


def _decode_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_safetensors_bytes(data)  # parses tensors only: never runs code
    except Exception as e:  # safetensors raises its own SafetensorError (a plain Exception), truncation included
        raise SnapshotError(f"{path} is truncated or not a safetensors file: {e}") from e
    # safetensors has no public call for the metadata of bytes in memory; load() has just validated the
    # header (8-byte little-endian length, then JSON), so reading it back cannot go wrong.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    raw = header.get("__metadata__") or {}
    if METADATA_KEY not in raw:
        return tensors, {}
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except ValueError as e:
        raise SnapshotError(f"{path} has corrupt {METADATA_KEY!r} metadata: {e}") from e
    if not isinstance(metadata, dict):
        raise SnapshotError(f"{path} has corrupt {METADATA_KEY!r} metadata: not a JSON object")
    return tensors, metadata


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    # NaN/inf weights would only surface later as NaN probabilities, far from the file that holds them.
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise SnapshotError(f"{path} holds non-finite values (NaN/inf) in tensor {key!r} "
                                f"({n_bad} of {tensor.numel()}): refusing to load it")


def _encode_safetensors(state_dict: Mapping[str, torch.Tensor] | nn.Module, metadata: Mapping[str, Any]) -> bytes:
    tensors = unwrap_state_dict(state_dict)
    try:
        meta = json.dumps(dict(metadata))
    except TypeError as e:
        raise ValueError(f"snapshot metadata is not JSON-serialisable: {e}") from e
    return save_safetensors_bytes(tensors, metadata={METADATA_KEY: meta})


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
        SnapshotError: the file is missing, not a regular file, truncated or corrupt, or holds NaN/inf values.
    """
    path = Path(path)
    tensors, metadata = _decode_safetensors(_read_bytes(path, "weights file"), path)
    _check_finite(tensors, path)
    return tensors, metadata


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
        _check_finite(state, info.path)
        return state

    def load_into(self, model: nn.Module, index: int) -> SnapshotInfo:
        """Load snapshot ``index`` into ``model`` (wrappers such as DDP or ``torch.compile`` are looked through).

        Raises:
            SnapshotError: as :meth:`load_state_dict`, or the snapshot does not fit the model's architecture.
        """
        info = self.get(index)
        _load_checked(model, self.load_state_dict(index), str(info.path))
        return info


# The resume state (save/load_training_state) and the RNG capture moved to snapens.runs, which imports this
# module; the old names stay importable from here, resolved on first use so that there is no import cycle.
_MOVED_TO_RUNS = ("capture_rng_state", "load_training_state", "restore_rng_state", "save_training_state")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_RUNS:
        from snapens import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
